"""`blipbatch report`: real runs of the shapes model on real Ray, images from a real HTTP server and moto S3, the page
rendered by headless Chromium (driven through the DevTools protocol) and looked at: no console errors, the gallery's
images decoded, the captions the model wrote on the page."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from blipbatch import pipeline
from blipbatch.jobs import shapes
from blipbatch.jobs.cli import EXIT_REFUSED, main
from blipbatch.jobs.demo import DEMO_MODEL
from blipbatch.jobs.report import render, write_report
from blipbatch.jobs.report_facts import ReportError, collect
from blipbatch.pipeline.fetch import FetchConfig
from blipbatch.pipeline.lock import OutputLock
from blipbatch.pipeline.sink import PROGRESS_DIR, progress_records, read_output

MODEL = str(DEMO_MODEL)
PICTURES = 20
QUESTIONS = {"caption": shapes.CAPTION_PROMPT, **shapes.QUESTIONS}
LOCALHOST = FetchConfig(allow_hosts=("127.0.0.1",), retries=0)


class PictureHandler(BaseHTTPRequestHandler):
    """/pic/K.png: shapes picture K; /page.html: not an image; anything else: 404."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        pictures: list[bytes] = self.server.pictures  # type: ignore[attr-defined]
        kind, _, name = self.path.strip("/").partition("/")
        if kind == "pic" and name.removesuffix(".png").isdigit() and int(name.removesuffix(".png")) < len(pictures):
            body, status, content_type = pictures[int(name.removesuffix(".png"))], 200, "image/png"
        elif kind == "page.html":
            body, status, content_type = b"<!DOCTYPE html><p>not an image</p>", 200, "text/html"
        else:
            body, status, content_type = b"not found", 404, "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def pictures() -> list[shapes.ShapeSample]:
    return shapes.make_dataset(PICTURES, seed=4242)


@pytest.fixture(scope="module")
def server(pictures):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), PictureHandler)
    httpd.daemon_threads = True
    httpd.pictures = [p.png() for p in pictures]  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def finished_run(ray_local, server, tmp_path_factory) -> str:
    """An annotate job (a caption and three questions per image) over 20 pictures and 4 broken references."""
    root = tmp_path_factory.mktemp("report-run")
    urls = [f"{server}/pic/{k}.png" for k in range(PICTURES)]
    urls[3:3] = [f"{server}/missing.png", f"{server}/page.html"]
    urls[11:11] = [f"{server}/also-missing.png", "http://10.255.0.1/private.png"]
    ids = [f"img-<{k}>" for k in range(len(urls))]  # "<" and ">": the page must escape them
    (root / "in").mkdir()
    pq.write_table(pa.table({"key": ids, "image_url": urls}), root / "in" / "part-0.parquet", row_group_size=4)
    output = str(root / "out")
    summary = pipeline.run(
        str(root / "in"),
        output,
        MODEL,
        prompt=QUESTIONS,
        id_column="key",
        rows_per_unit=8,
        batch_size=16,
        max_new_tokens=6,
        progress=False,
        fetch=LOCALHOST,
    )
    assert (summary.units_done, summary.rows_ok, summary.rows_error) == (3, 80, 16)
    return output


def test_units_record_their_timing(finished_run):
    records = progress_records(finished_run)
    assert len(records) == 3
    for record in records:
        timing = record.timing
        assert timing is not None
        assert record.finished_at and 0 < timing.started <= timing.finished <= time.time()
        assert (timing.worker, timing.images_fetched) == ("0", 8 - sum(record.errors_by_kind.values()) // 4)
        assert timing.model_s > 0 and timing.fetch_s > 0 and timing.decode_s > 0 and timing.pid > 0 and timing.node


# ---------------------------------------------------------------------------------------------- headless Chromium


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.events: list[dict] = []
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            assert time.monotonic() < deadline, f"no {event} within {timeout:.0f}s"
            self.events.append(json.loads(self.ws.recv()))

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, and browser log errors (failed loads, CSP refusals)."""
        found = []
        for e in self.events:
            params = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif e.get("method") == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning", "assert"):
                found.append(json.dumps(params["args"])[:500])
            elif e.get("method") == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                found.append(params["entry"]["text"][:500])
        return found


@pytest.fixture
def chromium(tmp_path):
    """Headless Chromium (Debian's package, installed by the README's test command) with DevTools on a free port."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (the README's test command installs Debian's chromium package)")
    profile = tmp_path / "chromium-profile"
    process = subprocess.Popen(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--window-size=1280,1000",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it chose here
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, f"chromium exited with {process.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port within 60s"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as answer:
            page = next(t for t in json.load(answer) if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.ws.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


PAGE_FACTS = """JSON.stringify({
  images: [...document.querySelectorAll('#gallery img.thumb')].map(i => [i.complete, i.naturalWidth]),
  cards: [...document.querySelectorAll('#gallery figure')].map(f => [f.dataset.rowId, f.innerText]),
  placeholders: [...document.querySelectorAll('#gallery .placeholder')].map(p => p.innerText),
  charts: document.querySelectorAll('svg.chart').length,
  errorKinds: [...document.querySelectorAll('tr.error-kind')].map(r => r.dataset.kind),
  state: document.querySelector('.state').innerText,
  spec: document.querySelector('#spec pre').innerText,
})"""


@pytest.mark.slow
def test_report_renders_in_chromium(finished_run, chromium, tmp_path):
    page = tmp_path / "report.html"
    code = main(["report", finished_run, "--html", str(page), "--sample", "24", "--allow-host", "127.0.0.1"])
    assert code == 0
    chromium.call("Page.enable")
    chromium.call("Runtime.enable")
    chromium.call("Log.enable")
    chromium.call("Page.navigate", url=page.as_uri())
    chromium.wait_for("Page.loadEventFired")
    facts = json.loads(chromium.call("Runtime.evaluate", expression=PAGE_FACTS, returnByValue=True)["result"]["value"])
    assert chromium.problems() == []

    # All 24 images sampled: the 20 pictures decoded on the page, the 4 broken references as placeholders saying why.
    assert len(facts["images"]) == PICTURES and all(complete and width > 0 for complete, width in facts["images"])
    assert sorted(p.split("\n")[0] for p in facts["placeholders"]) == ["image unavailable"] * 4
    reasons = " ".join(facts["placeholders"])
    assert "fetch_http: HTTP 404" in reasons and "decode_error" in reasons and "blocked_address" in reasons
    # Each card shows its image's instructions and the model's answers, as the output holds them.
    answers: dict[str, list[str]] = {}
    for row in read_output(finished_run).to_pylist():
        answers.setdefault(row["id"], []).append(row["text"] if row["status"] == "ok" else row["error_kind"])
    cards = dict(facts["cards"])
    assert set(cards) == set(answers)
    for row_id, text in cards.items():
        for answer in answers[row_id]:
            assert answer in text, (row_id, answer, text)
        failed_image = answers[row_id][0] in ("fetch_http", "decode_error", "blocked_address")
        assert ("all 4 instructions" in text) if failed_image else all(q in text for q in QUESTIONS)
    assert facts["charts"] == 2  # throughput over time, and per worker
    assert facts["errorKinds"] == ["fetch_http", "blocked_address", "decode_error"]
    assert facts["state"].startswith("Finished: all 3 units committed")
    assert json.loads(facts["spec"])["model"] == MODEL

    metrics = chromium.call("Page.getLayoutMetrics")["cssContentSize"]
    shot = chromium.call(
        "Page.captureScreenshot",
        format="png",
        captureBeyondViewport=True,
        clip={"x": 0, "y": 0, "width": metrics["width"], "height": metrics["height"], "scale": 1},
    )
    png = base64.b64decode(shot["data"])
    (tmp_path / "report.png").write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.height > 1000
    assert len(image.getcolors(maxcolors=1 << 20) or range(1 << 20)) > 50, "the screenshot is (nearly) blank"


# ---------------------------------------------------------------------------------------------- the page's content


def test_report_without_access_shows_placeholders_not_a_crash(finished_run):
    # No allow-list: the address guard refuses the test server, as it would in the pipeline.
    data = collect(finished_run, sample=5, fetch=FetchConfig(retries=0))
    assert len(data.gallery) == 5
    assert all(item.thumbnail is None and item.problem.startswith("blocked_address") for item in data.gallery)
    assert render(data).count('class="placeholder"') == 5


def test_report_escapes_user_text(finished_run):
    page = render(collect(finished_run, sample=24, fetch=LOCALHOST))
    assert "img-&lt;3&gt;" in page and "img-<3>" not in page


def test_report_of_a_run_in_progress(finished_run, tmp_path):
    # The output as a run sees it part-way: one unit not committed yet, and the lock held by a live process (us).
    output = tmp_path / "partial"
    shutil.copytree(finished_run, output)
    records = progress_records(str(output))
    (output / PROGRESS_DIR / f"{records[-1].unit_id}.json").unlink()
    with OutputLock(str(output)):
        data = collect(str(output), sample=100, fetch=LOCALHOST)
        page = render(data)
    assert "In progress: a run holds this output" in page
    assert len(data.records) == 2 and data.units_planned == 3
    assert len(data.gallery) == 16  # every image of the two committed units, and no other
    assert "units committed" in page and "2 of 3" in page
    # With the lock gone, the same output is an interrupted run that can be resumed.
    assert "Incomplete: 1 of 3 units not committed yet" in render(collect(str(output), sample=0))


def test_report_of_markers_without_timing(finished_run, tmp_path):
    """Outputs written before timing was recorded still get a report, without the plots and saying why."""
    output = tmp_path / "old"
    shutil.copytree(finished_run, output)
    for marker in (output / PROGRESS_DIR).glob("*.json"):
        record = json.loads(marker.read_text())
        del record["timing"], record["images_encoded"]
        marker.write_text(json.dumps(record))
    page = render(collect(str(output), sample=3, fetch=LOCALHOST))
    assert "no throughput plot" in page and "<svg" not in page
    assert "80" in page and "16" in page  # rows ok and in error still counted
    assert page.count('class="thumb"') + page.count('class="placeholder"') == 3  # the gallery is unaffected


def test_report_refuses_what_is_not_an_output(tmp_path, capsys):
    (tmp_path / "not-an-output").mkdir()
    with pytest.raises(ReportError, match="not a blipbatch output"):
        write_report(str(tmp_path / "not-an-output"), str(tmp_path / "r.html"))
    assert main(["report", str(tmp_path / "nowhere"), "--html", str(tmp_path / "r.html")]) == EXIT_REFUSED
    assert "not a blipbatch output" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_report_of_an_object_store_output_with_image_bytes(ray_local, s3fs_clean, pictures, tmp_path):
    """Output and input on S3; the images are bytes in the input, so the report reads them from the input shard."""
    s3fs_clean.mkdir("report-bucket")
    table = pa.table({"image": pa.array([p.png() for p in pictures[:6]], pa.binary())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=2)
    s3fs_clean.pipe("report-bucket/in/pictures.parquet", buffer.getvalue())
    output = "s3://report-bucket/out"
    summary = pipeline.run(
        "s3://report-bucket/in",
        output,
        MODEL,
        prompt=shapes.CAPTION_PROMPT,
        image_column="image",
        rows_per_unit=4,
        max_new_tokens=6,
        progress=False,
    )
    assert (summary.units_done, summary.rows_ok) == (2, 6)
    code = main(["report", output, "--html", "s3://report-bucket/report.html", "--sample", "6"])
    assert code == 0
    page = s3fs_clean.cat("report-bucket/report.html").decode()
    assert page.count('class="thumb" src="data:image/jpeg;base64,') == 6
    for row in read_output(output).to_pylist():
        assert re.fullmatch(r"<\d+ bytes>", row["image"])  # the output holds no image to show
        assert f'<dd class="text">{row["text"]} <span class="score" ' in page  # the answer, then its score
        assert f">({row['score']:.2f})</span></dd>" in page
