"""Signals of a running job: Ray metrics scraped from a local Ray's metrics export port while `blipbatch run` works,
its JSON log line per unit, and a report made part-way through. Real Ray, a real (slow) HTTP server, the shapes
model."""

from __future__ import annotations

import io
import json
import re
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from blipbatch.jobs.cli import main
from blipbatch.jobs.demo import DEMO_MODEL
from blipbatch.jobs.report import run_state
from blipbatch.jobs.report_facts import collect
from blipbatch.pipeline.sink import progress_records
from tests.conftest import free_port

MODEL = DEMO_MODEL
UNITS, ROWS_PER_UNIT, BROKEN = 12, 4, 3
DELAY_S = 0.15  # per image: units take long enough to watch the counters move


class SlowHandler(BaseHTTPRequestHandler):
    """/img/K.png: a picture, after DELAY_S; anything else: 404."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        time.sleep(DELAY_S)
        if self.path.startswith("/img/"):
            k = int(self.path.removeprefix("/img/").removesuffix(".png"))
            buffer = io.BytesIO()  # a colour per K: identical bytes would share one model call
            Image.new("RGB", (64, 48), (40 + 4 * k, 80, 200)).save(buffer, "PNG")
            body, status = buffer.getvalue(), 200
        else:
            body, status = b"not found", 404
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def metrics_port():
    """A local Ray whose metrics agent serves Prometheus text on a known port, exporting every half second."""
    import ray

    port = free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="bb-ray-", dir="/tmp"),
        _metrics_export_port=port,
        # workers at normal priority, as blipbatch's own in-process Ray runs them (Ray's nice 15 made this test take
        # 394 s instead of ~15 beside two CPU-bound processes)
        _system_config={"metrics_report_interval_ms": 500, "worker_niceness": 0},
        configure_logging=False,
    )
    yield port
    ray.shutdown()


@pytest.fixture(scope="module")
def slow_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def scrape(port: int) -> dict[str, float]:
    """Prometheus samples summed over their labels but the ones named,
    e.g. {'ray_blipbatch_rows_total{status="ok"}': 9}."""
    keep = ("status", "error_kind", "outcome", "le")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    except OSError:
        return {}  # the agent may not be listening yet
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"(ray_blipbatch_\w+)(?:\{(.*)\})? (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            kept = ",".join(f'{k}="{labels[k]}"' for k in keep if k in labels)
            name = f"{match.group(1)}{{{kept}}}" if kept else match.group(1)
            samples[name] = samples.get(name, 0.0) + float(match.group(3))
    return samples


def rows_total(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("ray_blipbatch_rows_total"))


@pytest.mark.slow
def test_metrics_and_unit_logs_while_running(metrics_port, slow_server, tmp_path, capsys):
    urls = [f"{slow_server}/img/{k}.png" for k in range(UNITS * ROWS_PER_UNIT - BROKEN)]
    urls += [f"{slow_server}/gone/{k}.png" for k in range(BROKEN)]  # 404: fetch_http rows
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image_url": urls}), tmp_path / "in" / "images.parquet", row_group_size=ROWS_PER_UNIT)
    output = tmp_path / "out"
    spec = tmp_path / "job.toml"
    spec.write_text(f"""
[job]
kind = "caption"
[input]
path = "{tmp_path / "in"}"
[output]
path = "{output}"
[model]
path = "{MODEL}"
[generation]
max_new_tokens = 4
[fetch]
allow_hosts = ["127.0.0.1"]
retries = 0
[run]
rows_per_unit = {ROWS_PER_UNIT}
batch_size = 2
""")
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(main(["run", str(spec), "--log-json"])))
    seen: list[float] = []
    report_states: list[tuple[str, int]] = []
    runner.start()
    while runner.is_alive():
        if samples := scrape(metrics_port):
            seen.append(rows_total(samples))
        if not report_states and 2 <= len(progress_records(str(output))) < UNITS - 2:
            data = collect(str(output), sample=4)  # a report of the run part-way through
            report_states.append((run_state(data)[0], len(data.records)))
        time.sleep(0.25)
    runner.join()
    assert codes == [0]

    total = UNITS * ROWS_PER_UNIT
    deadline = time.monotonic() + 15  # the last commits reach the endpoint at the next export
    while rows_total(final := scrape(metrics_port)) < total and time.monotonic() < deadline:
        time.sleep(0.25)
    assert rows_total(final) == total
    during = [value for value in seen if 0 < value < total]
    assert len(set(during)) >= 2, f"the rows counter did not move while the job ran: {seen}"
    assert seen == sorted(seen), "a counter went down"
    assert final['ray_blipbatch_rows_total{status="ok"}'] == total - BROKEN
    assert final['ray_blipbatch_rows_total{status="error"}'] == BROKEN
    assert final['ray_blipbatch_row_errors_total{error_kind="fetch_http"}'] == BROKEN
    assert final['ray_blipbatch_units_total{outcome="committed"}'] == UNITS
    # Micro-batches of 2 rows; the broken rows (the last unit's last 3) never reach the model: 22 + 1 calls.
    # (Ray estimates a histogram's _sum from bucket midpoints: the buckets are what is exact.)
    assert final["ray_blipbatch_batch_size_count"] == 23
    assert final['ray_blipbatch_batch_size_bucket{le="1.0"}'] == 1
    assert final['ray_blipbatch_batch_size_bucket{le="2.0"}'] == 23
    assert final["ray_blipbatch_unit_seconds_count"] == UNITS
    assert final["ray_blipbatch_queue_depth"] == 0 and "ray_blipbatch_units_in_flight" in final
    assert final["ray_blipbatch_images_per_second"] > 0

    assert report_states and report_states[0][0] == "running" and 2 <= report_states[0][1] < UNITS

    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    events = [json.loads(line) for line in lines]
    committed = [e for e in events if e["event"] == "unit_committed"]
    assert len(committed) == len(events) == UNITS
    assert sum(e["rows_ok"] for e in committed) == total - BROKEN
    assert sum(e["errors_by_kind"].get("fetch_http", 0) for e in committed) == BROKEN
    for event in committed:
        assert event["output"] == str(output) and event["worker"] == "0" and event["attempt"] == 1
        assert event["seconds"] >= DELAY_S and event["images_per_s"] > 0 and event["rows_per_s"] > 0
        assert event["images"] == event["rows_ok"] and event["model_s"] > 0
