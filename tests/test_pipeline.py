"""The pipeline end to end on real Ray (in-process), a real HTTP server and moto S3, with a tiny model."""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tiny import write_tiny_checkpoint

from blipbatch import pipeline
from blipbatch.jobs.cli import main
from blipbatch.model import InstructBlipForConditionalGeneration, InstructBlipProcessor
from blipbatch.pipeline.fetch import FetchConfig
from blipbatch.pipeline.job import job_from_keywords
from blipbatch.pipeline.manifest import ManifestMismatch
from blipbatch.pipeline.run import run_job
from blipbatch.pipeline.shards import discover_shards, plan_units
from blipbatch.pipeline.sink import committed_units, failed_units, progress_records, read_output
from blipbatch.pipeline.worker import FaultInjection
from blipbatch.schemas import ColumnMapping

NEW_TOKENS = 4
PROMPTS = ("A short image caption:", "What color is the shape?")
COLOURS = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 200, 40), (150, 60, 170), (240, 140, 30)]


def png(index: int) -> bytes:
    image = Image.new("RGB", (40 + index, 32), (235, 235, 225))
    image.paste(COLOURS[index % len(COLOURS)], (5 + index, 5, 25 + index, 25))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A valid one-colour PNG of any size, a few KB long (the pixels are never held in memory)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * width
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


class ImageHandler(BaseHTTPRequestHandler):
    """/img/K.png images; /flaky/K.png answers 503 the first time; /down always 503; plus bad inputs."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        server: ImageServer = self.server  # type: ignore[assignment]
        with server.lock:
            server.hits[self.path] += 1
            hits = server.hits[self.path]
        kind, _, name = self.path.strip("/").partition("/")
        if kind == "img" or (kind == "flaky" and hits > 1):
            self.reply(200, png(int(name.split(".")[0])), "image/png")
        elif kind in ("flaky", "down"):
            self.reply(503, b"busy", "text/plain")
        elif kind == "hang":
            time.sleep(2)  # past the client's timeout
        elif kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        elif self.path in server.files:
            self.reply(200, server.files[self.path], "application/octet-stream")
        else:
            self.reply(404, b"not found", "text/plain")

    def reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ImageHandler)
        self.hits: Counter = Counter()
        self.lock = threading.Lock()
        jpeg = io.BytesIO()
        Image.new("RGB", (64, 64), (10, 200, 10)).save(jpeg, "JPEG")
        self.files = {
            "/page.html": b"<!DOCTYPE html><html><body>not an image</body></html>",
            "/truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
            "/empty.png": b"",
            "/bomb.png": huge_png(20000, 20000),
            "/drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        }

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture(scope="module")
def server():
    httpd = ImageServer()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model")))


def write_shard(path: Path, columns: dict, row_group_size: int = 50) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def generate_alone(checkpoint: str, image: bytes, prompt: str) -> str:
    """What model/'s public API answers for one image and one instruction (no engine, no batching)."""
    processor = InstructBlipProcessor.from_pretrained(checkpoint)
    model = InstructBlipForConditionalGeneration.from_pretrained(checkpoint)
    inputs = processor(images=Image.open(io.BytesIO(image)).convert("RGB"), text=prompt)
    ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
    return processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def rows_by_id(table: pa.Table) -> dict[str, dict]:
    rows = table.to_pylist()
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "an id appears twice in the output"
    return {row["id"]: row for row in rows}


def test_end_to_end_http_and_s3(ray_local, server, checkpoint, s3fs_clean, tmp_path, capsys):
    s3fs_clean.mkdir("e2e-images")
    for k in range(12):
        s3fs_clean.pipe(f"e2e-images/{k}.png", png(k))
    expected_refs = {}
    for s in range(3):
        ids, urls, prompts = [], [], []
        for r in range(200):
            k = (r * 7 + s) % 12
            ids.append(f"s{s}-r{r}")
            urls.append(server.url(f"/img/{k}.png") if r % 2 else f"s3://e2e-images/{k}.png")
            prompts.append(PROMPTS[r % 3 % 2])
            expected_refs[ids[-1]] = (k, prompts[-1], urls[-1])
        write_shard(tmp_path / "in" / f"part-{s}.parquet", {"key": ids, "image_url": urls, "question": prompts})
    output = str(tmp_path / "out")
    settings = dict(
        instruction_column="question",
        id_column="key",
        rows_per_unit=64,
        batch_size=8,
        max_new_tokens=NEW_TOKENS,
        progress=False,
        fetch=FetchConfig(allow_hosts=("127.0.0.1",)),
    )

    summary = pipeline.run(str(tmp_path / "in"), output, checkpoint, **settings)
    assert (summary.units_done, summary.units_failed, summary.rows_ok, summary.rows_error) == (12, 0, 600, 0)

    rows = rows_by_id(read_output(output))
    assert set(rows) == set(expected_refs)
    # every text equals what model/ generates for that image and instruction on its own
    alone = {(k, prompt): generate_alone(checkpoint, png(k), prompt) for k in range(12) for prompt in PROMPTS}
    for row_id, row in rows.items():
        k, prompt, url = expected_refs[row_id]
        assert (row["status"], row["instruction"], row["image_url"]) == ("ok", prompt, url)
        assert row["text"] == alone[(k, prompt)], row_id
    assert len(set(alone.values())) > 1, "the tiny model must not answer everything alike"

    # running again over a finished output does nothing and says so
    capsys.readouterr()
    again = pipeline.run(str(tmp_path / "in"), output, checkpoint, **settings)
    assert (again.units_done, again.units_skipped, again.rows) == (0, 12, 0)
    assert "nothing to do: all 12 units" in capsys.readouterr().err
    # and other settings into the same output are refused
    with pytest.raises(ManifestMismatch, match="max_new_tokens"):
        pipeline.run(str(tmp_path / "in"), output, checkpoint, **(settings | {"max_new_tokens": NEW_TOKENS + 1}))


def local_images(folder: Path, count: int = 6) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        (folder / f"{k}.png").write_bytes(png(k))
        paths.append(str(folder / f"{k}.png"))
    return paths


def local_files(tmp_path: Path) -> FetchConfig:
    """Local image paths are read only inside the job's roots: the test's folder."""
    return FetchConfig(local_roots=(str(tmp_path),))


def local_input(tmp_path: Path, shards: int, rows: int) -> str:
    images = local_images(tmp_path / "images")
    for s in range(shards):
        write_shard(
            tmp_path / "in" / f"part-{s}.parquet",
            {"image_url": [images[(r + s) % len(images)] for r in range(rows)]},
            row_group_size=10,
        )
    return str(tmp_path / "in")


def test_workers_of_the_in_process_ray_run_at_this_process_priority(ray_local):
    """Not at Ray's default nice 15, which starves the model workers beside any other busy process."""
    import ray

    assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == os.nice(0)


def test_cpu_worker_uses_the_cores_ray_has(ray_local, checkpoint, tmp_path, capsys):
    """Ray starts a fractional-CPU actor with OMP_NUM_THREADS=1; the model worker takes the cores back
    (the in-process Ray here has 2 CPUs and one worker)."""
    source = local_input(tmp_path, shards=1, rows=4)
    summary = pipeline.run(
        source,
        str(tmp_path / "out"),
        checkpoint,
        prompt=PROMPTS[0],
        batch_size=4,
        max_new_tokens=NEW_TOKENS,
        fetch=local_files(tmp_path),
        workers=1,
    )
    assert summary.rows_ok == 4
    assert "1 model worker(s) on cpu (2 threads)" in capsys.readouterr().err


def run_with_fault(input, output, model, *, fault, progress=True, **settings):
    """pipeline.run with the tests' crash hook, which its public signature leaves out."""
    return run_job(job_from_keywords(input, output, model, **settings), fault=fault, progress=progress)


def test_worker_killed_mid_unit_loses_and_duplicates_nothing(ray_local, checkpoint, tmp_path):
    source = local_input(tmp_path, shards=2, rows=40)
    units = plan_units(discover_shards(source), ColumnMapping(), 20)
    marker = tmp_path / "crashed-once"
    fault = FaultInjection(unit_ids=(units[1].unit_id,), after_rows=8, once_marker=str(marker))
    output = str(tmp_path / "out")
    summary = run_with_fault(
        source,
        output,
        checkpoint,
        prompt=PROMPTS[0],
        rows_per_unit=20,
        batch_size=8,
        max_new_tokens=NEW_TOKENS,
        fault=fault,
        progress=False,
        fetch=local_files(tmp_path),
    )
    assert marker.exists(), "the fault was never injected"
    assert (summary.units_done, summary.units_failed, summary.rows_ok) == (len(units), 0, 80)
    rows = rows_by_id(read_output(output))
    assert len(rows) == 80 and all(row["status"] == "ok" for row in rows.values())


def test_unit_that_always_kills_its_worker_is_marked_failed(ray_local, checkpoint, tmp_path):
    source = local_input(tmp_path, shards=1, rows=60)
    units = plan_units(discover_shards(source), ColumnMapping(), 20)
    poison = units[1].unit_id
    output = str(tmp_path / "out")
    summary = run_with_fault(
        source,
        output,
        checkpoint,
        prompt=PROMPTS[0],
        rows_per_unit=20,
        batch_size=8,
        max_new_tokens=NEW_TOKENS,
        max_attempts=2,
        fault=FaultInjection(unit_ids=(poison,)),
        progress=False,
        fetch=local_files(tmp_path),
    )
    assert (summary.units_done, summary.units_failed) == (len(units) - 1, 1)
    assert "worker died" in summary.failed[poison]
    assert failed_units(output)[poison]["attempts"] == 2
    assert committed_units(output) == {u.unit_id for u in units} - {poison}
    assert len(rows_by_id(read_output(output))) == 40


def test_bad_inputs_become_error_rows(ray_local, server, checkpoint, tmp_path):
    long_prompt = " ".join(["unusual"] * 600)
    cases = [  # (image reference, instruction, expected error kind or None, a fragment of the message)
        (server.url("/img/1.png"), PROMPTS[0], None, None),
        (server.url("/missing.png"), PROMPTS[0], "fetch_http", "404"),
        (server.url("/page.html"), PROMPTS[0], "decode_error", "not an image: HTML, 53 bytes"),  # never its bytes
        (server.url("/truncated.jpg"), PROMPTS[0], "decode_error", "truncated"),
        (server.url("/empty.png"), PROMPTS[0], "decode_error", "empty"),
        (server.url("/bomb.png"), PROMPTS[0], "too_large", "20000x20000"),
        (server.url("/drawing.svg"), PROMPTS[0], "decode_error", "SVG"),
        (None, PROMPTS[0], "invalid_input", "empty image reference"),
        ("", PROMPTS[0], "invalid_input", "empty image reference"),
        ("gopher://example/x.png", PROMPTS[0], "invalid_input", "gopher"),
        (server.url("/img/2.png"), None, "invalid_input", "must be a string"),
        (server.url("/img/3.png"), long_prompt, "invalid_input", "tokens"),
        (server.url("/flaky/4.png"), PROMPTS[1], None, None),
        (server.url("/down/5.png"), PROMPTS[1], "fetch_http", "attempts"),
        (server.url("/hang/6.png"), PROMPTS[1], "fetch_timeout", "attempts"),
        (server.url("/reset/7.png"), PROMPTS[1], "fetch_connection", "attempts"),
    ]
    write_shard(
        tmp_path / "in" / "bad.parquet",
        {
            "image_url": pa.array([c[0] for c in cases], pa.string()),
            "prompt": pa.array([c[1] for c in cases], pa.string()),
        },
    )
    output = str(tmp_path / "out")
    summary = pipeline.run(
        str(tmp_path / "in"),
        output,
        checkpoint,
        instruction_column="prompt",
        max_new_tokens=NEW_TOKENS,
        progress=False,
        fetch=FetchConfig(retries=2, backoff_s=0.01, timeout_s=0.5, allow_hosts=("127.0.0.1",)),
    )
    assert summary.units_failed == 0
    rows = sorted(read_output(output).to_pylist(), key=lambda row: int(row["id"].rsplit("-", 1)[1]))
    assert len(rows) == len(cases)
    for row, (_, _, kind, fragment) in zip(rows, cases):
        if kind is None:
            assert row["status"] == "ok" and row["text"] is not None, row
        else:
            assert (row["status"], row["error_kind"]) == ("error", kind), row
            assert fragment.lower() in row["error"].lower(), row
    assert server.hits["/flaky/4.png"] == 2
    assert server.hits["/down/5.png"] == server.hits["/hang/6.png"] == server.hits["/reset/7.png"] == 3


def cli_args(source: str, output: str, checkpoint: str, tmp_path: Path) -> list[str]:
    """`blipbatch run` arguments for a caption job over local files under tmp_path, 10 rows a unit."""
    # Flags alone cannot name local roots: a spec holds them, and the flags give the rest.
    spec = tmp_path / "local-files.toml"
    spec.write_text(f'[job]\nkind = "caption"\n[fetch]\nlocal_roots = ["{tmp_path}"]\n')
    return [
        "run",
        str(spec),
        "--input",
        source,
        "--output",
        output,
        "--model",
        checkpoint,
        "--prompt",
        PROMPTS[0],
        "--rows-per-unit",
        "10",
        "--batch-size",
        "5",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--quiet",
    ]


def cli_run(source: str, output: str, checkpoint: str, tmp_path: Path) -> subprocess.Popen:
    """`blipbatch run` in a process (and process group) of its own, its output in tmp_path/run-*.log."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / f"run-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "blipbatch", *cli_args(source, output, checkpoint, tmp_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_driver_killed_then_rerun_resumes_exactly_once(ray_local, checkpoint, tmp_path, capsys):
    source = local_input(tmp_path, shards=3, rows=100)
    output = str(tmp_path / "out")
    total_units = len(plan_units(discover_shards(source), ColumnMapping(), 10))
    first = cli_run(source, output, checkpoint, tmp_path)
    deadline = time.monotonic() + 120
    while len(committed_units(output)) < 3:
        assert first.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no unit committed within 120 s"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray processes of its process group
    first.wait(timeout=30)
    # A Ray worker outside the process group may still finish the unit it holds before it notices the
    # driver is gone (harmless: a unit's part is rewritten whole); wait until the commits stop.
    committed_before = committed_units(output)
    stable_since = time.monotonic()
    while time.monotonic() - stable_since < 3:
        time.sleep(0.5)
        now = committed_units(output)
        if now != committed_before:
            committed_before, stable_since = now, time.monotonic()
    assert 3 <= len(committed_before) < total_units

    # the same command again, here in this process on the tests' Ray
    assert main(cli_args(source, output, checkpoint, tmp_path)) == 0
    log = capsys.readouterr().out
    done_now = total_units - len(committed_before)
    assert f"{done_now} done now, {len(committed_before)} already done" in log
    # committed units were not recomputed: this run generated only the rows of the other units
    assert f"rows: {done_now * 10} ok, 0 error" in log
    rows = rows_by_id(read_output(output))
    assert len(rows) == 300


def test_annotate_encodes_each_image_once(ray_local, checkpoint, tmp_path):
    """4 named questions over 50 rows of 10 images: 200 output rows, 10 vision-encoder passes per unit of 25 rows
    (counted in the actor): each image once for all its questions, and once for all the rows of a unit naming it."""
    questions = {"caption": PROMPTS[0], "colour": PROMPTS[1], "shape": "What shape is it?", "count": "How many?"}
    images = local_images(tmp_path / "images", count=10)
    write_shard(tmp_path / "in" / "part.parquet", {"image_url": [images[r % 10] for r in range(50)]}, row_group_size=25)
    output = str(tmp_path / "out")
    summary = pipeline.run(
        str(tmp_path / "in"),
        output,
        checkpoint,
        prompt=questions,
        rows_per_unit=25,
        batch_size=6,
        max_new_tokens=NEW_TOKENS,
        progress=False,
        fetch=local_files(tmp_path),
    )
    assert (summary.rows_ok, summary.images_encoded) == (200, 20)
    assert sum(record.duplicate_images for record in progress_records(output)) == 30
    rows = read_output(output).to_pylist()
    assert Counter(row["question_id"] for row in rows) == dict.fromkeys(questions, 50)
    assert {(row["question_id"], row["instruction"]) for row in rows} == set(questions.items())
    # the shared vision pass changes nothing: each answer is the model's own for that image and question
    first = next(row for row in rows if row["question_id"] == "shape")
    assert first["text"] == generate_alone(checkpoint, Path(first["image_url"]).read_bytes(), questions["shape"])


def test_second_run_on_a_held_output_is_refused(ray_local, checkpoint, tmp_path):
    from blipbatch.pipeline.lock import OutputLock, OutputLocked

    source = local_input(tmp_path, shards=1, rows=10)
    output = str(tmp_path / "out")
    with OutputLock(output):  # another run, alive, holds the output
        with pytest.raises(OutputLocked, match="being written by another run"):
            pipeline.run(source, output, checkpoint, prompt=PROMPTS[0], max_new_tokens=NEW_TOKENS, progress=False)
    assert not committed_units(output)


def test_incremental_run_processes_only_new_shards(ray_local, checkpoint, tmp_path):
    source = local_input(tmp_path, shards=2, rows=20)
    output = str(tmp_path / "out")
    options = dict(
        prompt=PROMPTS[0], rows_per_unit=20, max_new_tokens=NEW_TOKENS, progress=False, fetch=local_files(tmp_path)
    )
    first = pipeline.run(source, output, checkpoint, **options)
    images = local_images(tmp_path / "images")
    for s in (2, 3):  # the input prefix gains two shards (of their own content: a copy of a shard is refused)
        write_shard(tmp_path / "in" / f"part-{s}.parquet", {"image_url": images[s - 2 : s + 3] * 4}, row_group_size=10)
    second = pipeline.run(source, output, checkpoint, **options)
    assert (first.units_done, second.units_done, second.units_skipped) == (2, 2, 2)
    assert (second.rows_ok, second.images_encoded) == (40, 10)  # 5 distinct images in each new unit of 20 rows
    assert len(rows_by_id(read_output(output))) == 80


def test_status_and_retry_failed_commands(ray_local, checkpoint, tmp_path, capsys):
    from blipbatch.jobs.cli import main

    source = local_input(tmp_path, shards=1, rows=40)
    units = plan_units(discover_shards(source), ColumnMapping(), 20)
    output = str(tmp_path / "out")
    run_with_fault(
        source,
        output,
        checkpoint,
        prompt=PROMPTS[0],
        rows_per_unit=20,
        max_new_tokens=NEW_TOKENS,
        max_attempts=1,
        fault=FaultInjection(unit_ids=(units[0].unit_id,)),
        progress=False,
        fetch=local_files(tmp_path),
    )
    capsys.readouterr()
    assert main(["status", output]) == 1
    out = capsys.readouterr().out
    assert "units: 1 done, 1 failed, 0 pending" in out
    assert f"failed unit {units[0].unit_id} after 1 attempts: worker died" in out
    assert "rows: 20 ok, 0 error" in out

    assert main(["retry-failed", output, "--quiet"]) == 0
    assert "1 done now, 1 already done, 0 failed" in capsys.readouterr().out
    assert main(["status", output]) == 0
    assert "units: 2 done, 0 failed, 0 pending" in capsys.readouterr().out
    assert len(rows_by_id(read_output(output))) == 40
    assert main(["status", str(tmp_path / "nothing")]) == 3
