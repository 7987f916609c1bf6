"""A real Ray cluster on this machine (`ray start --head`, more nodes with `ray start --address`), each node declaring
one GPU, S3 (moto on 127.0.0.1) as the storage the nodes share: a run with workers "auto" starts a worker per GPU, gets
one more when a third node joins mid-run, and when the second node's raylet is killed (with the worker processes it
started) its units go back to the queue free of charge; every row ends in the output exactly once."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tiny import write_tiny_checkpoint

from blipbatch.pipeline.sink import progress_records, read_output
from tests.conftest import RAY_NODE_ENV, agent_port_flags, free_port, ray_bin, stop_cluster

pytestmark = pytest.mark.slow

ROWS_PER_UNIT = 4
ELASTIC_ROWS = 240  # 60 units: work left while a node joins and another leaves
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]


def start_node(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(
        [ray_bin(), "start", "--disable-usage-stats", "--node-ip-address=127.0.0.1", *agent_port_flags(), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def raylet_of(node_manager_port: int) -> psutil.Process:
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].endswith("raylet") and f"--node_manager_port={node_manager_port}" in cmdline:
            return process
    raise AssertionError(f"no raylet with node manager port {node_manager_port}")


@pytest.fixture
def three_nodes(moto_endpoint):
    """(address, a call that adds a third node, the second node's node-manager port): each node declares one GPU."""
    temp = Path("/tmp") / f"bb-3node-{os.getpid()}"
    env = {**os.environ, **RAY_NODE_ENV}
    port, second, third = free_port(), free_port(), free_port()
    one_gpu = ["--num-cpus=1", "--num-gpus=1"]
    try:
        start_node(["--head", f"--port={port}", *one_gpu, "--include-dashboard=false", f"--temp-dir={temp}"], env)
        start_node([f"--address=127.0.0.1:{port}", *one_gpu, f"--node-manager-port={second}"], env)
        yield (
            f"127.0.0.1:{port}",
            lambda: start_node([f"--address=127.0.0.1:{port}", *one_gpu, f"--node-manager-port={third}"], env),
            second,
        )
    finally:
        stop_cluster(str(temp))
        for node in (second, third):
            try:
                raylet_of(node).kill()
            except AssertionError:
                pass


class SlowImages(BaseHTTPRequestHandler):
    """/K.png: picture K, after `server.delay` seconds (0 once the test lets the run finish)."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        time.sleep(self.server.delay)  # type: ignore[attr-defined]
        index = int(self.path.strip("/").split(".")[0])
        buffer = io.BytesIO()
        Image.new("RGB", (40 + index % 7, 30), COLOURS[index % 4]).save(buffer, "PNG")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(buffer.getvalue())))
        self.end_headers()
        self.wfile.write(buffer.getvalue())


def test_gpus_that_join_get_workers_and_a_node_that_leaves_charges_no_attempt(three_nodes, s3fs_clean, tmp_path):
    """Workers "auto" on nodes that declare one GPU each (`ray start --num-gpus=1`; the model runs on CPU): a third
    node joins mid-run and its worker commits units; then the second node goes down whole. Its units go back to the
    queue free of charge (every marker says attempt 1), and every row is in the output exactly once."""

    address, add_third_node, second_node = three_nodes
    checkpoint = str(write_tiny_checkpoint(tmp_path / "model"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowImages)
    server.delay = 0.5  # each image: the run lasts while nodes come and go
    threading.Thread(target=server.serve_forever, daemon=True).start()
    table = pa.table(
        {
            "key": [f"row-{i:03d}" for i in range(ELASTIC_ROWS)],
            "image_url": [f"http://127.0.0.1:{server.server_address[1]}/{i}.png" for i in range(ELASTIC_ROWS)],
        }
    )
    s3fs_clean.mkdir("elastic")
    with s3fs_clean.open("elastic/in/shard-0.parquet", "wb") as f:
        pq.write_table(table, f)  # one row group: cut into units of ROWS_PER_UNIT rows
    output = "s3://elastic/out/"
    events: dict[str, threading.Event] = {name: threading.Event() for name in ("joined", "killed")}

    def committed_by() -> set[str]:
        try:
            markers = s3fs_clean.ls("elastic/out/_progress", refresh=True)
        except FileNotFoundError:
            return set()
        return {
            json.loads(s3fs_clean.cat_file(marker))["timing"]["worker"]
            for marker in markers
            if not marker.endswith(".failed.json")
        }

    def grow_then_shrink() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not {"0", "1"} <= committed_by():
            time.sleep(0.2)
        add_third_node()
        while time.monotonic() < deadline and "2" not in committed_by():
            time.sleep(0.2)
        events["joined"].set()
        raylet = raylet_of(second_node)  # the node goes down whole: its raylet and the worker processes it started
        for process in [*raylet.children(recursive=True), raylet]:
            process.send_signal(signal.SIGKILL)
        events["killed"].set()
        server.delay = 0.0

    changer = threading.Thread(target=grow_then_shrink, daemon=True)
    changer.start()
    # `blipbatch run` in a process of its own: the driver of this cluster is not the test process, whose in-process
    # Ray of earlier tests would otherwise be its past.
    command = [
        sys.executable,
        "-m",
        "blipbatch",
        "run",
        "--input",
        "s3://elastic/in/",
        "--output",
        output,
        "--model",
        checkpoint,
        "--prompt",
        "A short image caption:",
        "--id-column",
        "key",
        "--rows-per-unit",
        str(ROWS_PER_UNIT),
        "--max-workers",
        "3",
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
        "--allow-host",
        "127.0.0.1",
        "--address",
        address,
        "--quiet",
    ]
    try:
        run = subprocess.run(
            command, capture_output=True, text=True, timeout=400, env={**os.environ, "RAY_AUTH_MODE": "disabled"}
        )
    finally:
        server.delay = 0.0
        changer.join(timeout=30)
        server.shutdown()
    assert run.returncode == 0, run.stdout + run.stderr
    assert events["joined"].is_set() and events["killed"].is_set(), "the run ended before the cluster changed"
    summary = run.stdout
    assert re.search(
        r"workers: [1-9]\d* joined as GPUs joined the cluster, 1 dropped with the node they ran on", summary
    ), summary

    rows = read_output(output).to_pylist()
    assert sorted(row["id"] for row in rows) == [f"row-{i:03d}" for i in range(ELASTIC_ROWS)]  # exactly once
    assert [row for row in rows if row["status"] != "ok"] == []
    records = progress_records(output)
    assert len(records) == ELASTIC_ROWS // ROWS_PER_UNIT and "0 failed" in summary
    assert "2" in {record.timing.worker for record in records}  # the joined node's worker committed units
    # The lost node's units went back free: no attempt charged, and the summary says so.
    assert [record.attempt for record in records] == [1] * len(records)
    assert re.search(r"units: [1-9]\d* re-queued free of charge \(their node left\), 0 charged an attempt", summary), (
        summary
    )
