"""Hostile inputs and places around a run (issue 22): a shard rewritten under a run, credentials on the command line,
a forged manifest, huge instructions and special placeholders, a FIFO among the shards, a full or vanished output.

Each case makes its hostile input in the test, bounds its waits, and checks the error, that the other rows commit,
and that no secret leaks."""

from __future__ import annotations

import io
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tiny import write_tiny_checkpoint

from blipbatch import read_output
from blipbatch.jobs.cli import main
from blipbatch.pipeline.shards import ShardChanged, plan_units, read_unit
from blipbatch.pipeline.sink import failed_units
from blipbatch.schemas import ColumnMapping

MAPPING = ColumnMapping(id_column="key")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("model")))


def png_bytes(k: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32 + k, 28), (30 * k % 255, 140, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def write_shard(
    path: Path, keys: list[str], images: list[object] | None = None, row_group_size: int | None = None
) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = images if images is not None else [png_bytes(i) for i in range(len(keys))]
    pq.write_table(pa.table({"image_url": images, "key": keys}), path, row_group_size=row_group_size)
    return str(path)


def run_args(inputs: str, output: str, model: str, *extra: str) -> list[str]:
    return [
        "run",
        "--input",
        inputs,
        "--output",
        output,
        "--model",
        model,
        "--prompt",
        "a photo of",
        "--id-column",
        "key",
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
        "--quiet",
        *extra,
    ]


# ---------------------------------------------------------------- a shard rewritten under a run (item 8)


@pytest.mark.parametrize("how", ["in place", "replaced by a rename"])
def test_a_unit_refuses_a_shard_rewritten_after_planning(tmp_path, how):
    shard = write_shard(tmp_path / "a.parquet", ["k0", "k1", "k2", "k3"], row_group_size=2)
    units = plan_units([shard], MAPPING, 2)
    assert [len(read_unit(u, MAPPING, ["q"])) for u in units] == [2, 2]
    # Same row counts, same row groups, other rows: the count alone would not notice.
    new = pa.table({"image_url": [png_bytes(i + 7) for i in range(4)], "key": ["x0", "x1", "x2", "x3"]})
    if how == "in place":
        pq.write_table(new, shard, row_group_size=2)
    else:
        pq.write_table(new, tmp_path / ".a.tmp", row_group_size=2)
        os.replace(tmp_path / ".a.tmp", shard)
    for unit in units:
        with pytest.raises(
            ShardChanged, match=f"{shard}: its content changed after planning .*{unit.unit_id} is not committed"
        ):
            read_unit(unit, MAPPING, ["q"])


def test_a_unit_refuses_a_shard_rewritten_while_it_is_read(tmp_path):
    """A thread rewrites the shard in a loop while units read it: each read gives the planned rows or ShardChanged,
    never the other content's rows under the planned unit."""
    shard = tmp_path / "a.parquet"
    old = pa.table({"image_url": [b"x" * 5000] * 400, "key": [f"old{i}" for i in range(400)]})
    new = pa.table({"image_url": [b"y" * 5000] * 400, "key": [f"new{i}" for i in range(400)]})
    pq.write_table(old, shard, row_group_size=100)
    units = plan_units([str(shard)], MAPPING, 100)
    stop = threading.Event()

    def rewrite() -> None:
        while not stop.is_set():
            for table in (new, old):
                pq.write_table(table, tmp_path / ".a.tmp", row_group_size=100)
                os.replace(tmp_path / ".a.tmp", shard)

    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    outcomes = {"read": 0, "refused": 0}
    try:
        for _ in range(60):
            for unit in units:
                try:
                    rows = read_unit(unit, MAPPING, ["q"])
                except ShardChanged:
                    outcomes["refused"] += 1
                    continue
                outcomes["read"] += 1
                assert {row.id[:3] for row in rows} == {"old"}
    finally:
        stop.set()
        writer.join(timeout=10)
    assert outcomes["refused"] > 0, outcomes


class RewritingHandler(BaseHTTPRequestHandler):
    """Serves a picture; the first request rewrites the shard the server was given (once the run has planned it)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        rewrite = self.server.rewrite
        if rewrite is not None:
            self.server.rewrite = None
            rewrite()
        body = png_bytes(3)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.slow
def test_a_shard_rewritten_during_a_run_never_commits_an_id_twice(ray_local, tmp_path, checkpoint, capsys):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RewritingHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    inputs, output = tmp_path / "in", str(tmp_path / "out")
    url = f"http://127.0.0.1:{httpd.server_address[1]}/a.png"
    write_shard(inputs / "a.parquet", ["a0", "a1"], [url, url])
    shard_b = inputs / "b.parquet"
    write_shard(shard_b, ["b0", "b1"])
    # While shard a's unit fetches its images (b's unit waits behind it on the one worker), b is rewritten: the same
    # ids with one more row, as a producer fixing a shard in place would.
    httpd.rewrite = lambda: write_shard(shard_b, ["b0", "b1", "b2"])
    try:
        args = run_args(str(inputs), output, checkpoint, "--allow-host", "127.0.0.1", "--workers", "1")
        assert main(args) == 1
        captured = capsys.readouterr()
        (failed,) = [line for line in captured.out.splitlines() if line.startswith("failed unit ")]
        assert f"{shard_b}: its content changed after planning" in failed
        assert failed_units(output) == {}  # given up at once, unmarked: its content is gone, nothing could retry it
        assert sorted(read_output(output).column("id").to_pylist()) == ["a0", "a1"]  # a's rows committed

        assert main(args) == 0  # the next run plans b's new content: each id once
        ids = read_output(output).column("id").to_pylist()
        assert sorted(ids) == ["a0", "a1", "b0", "b1", "b2"]

        # Rewritten between runs, after its units committed: refused, since its rows would be committed again.
        write_shard(shard_b, ["b0", "b1", "b2", "b3"])
        capsys.readouterr()
        assert main(args) == 3
        err = capsys.readouterr().err
        assert f"rewritten in place since units of their earlier content were committed, e.g. {shard_b}" in err
        assert "--force" in err and len(err.strip().splitlines()) == 1
        assert sorted(read_output(output).column("id").to_pylist()) == sorted(ids)
    finally:
        httpd.shutdown()


# ---------------------------------------------------------------- locations with credentials (item 9)

SECRET = "hostile-canary-SECRET-42"


class CountingHandler(BaseHTTPRequestHandler):
    """/K.png: a picture; anything else 404. Counts the requests it gets."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests += 1
        name = self.path.rsplit("/", 1)[-1]
        body, status = (png_bytes(int(name[:-4])), 200) if name[:-4].isdigit() else (b"no such thing", 404)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def image_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    httpd.requests = 0
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()


@pytest.fixture(scope="module")
def finished_output(ray_local, tmp_path_factory, checkpoint, image_server):
    """An output made with --allow-host 127.0.0.1 and --local-root: its manifest records both."""
    base = tmp_path_factory.mktemp("finished")
    private = base / "private"
    private.mkdir()
    (private / "face.png").write_bytes(png_bytes(5))
    url = f"http://127.0.0.1:{image_server.server_address[1]}/3.png"
    write_shard(base / "in" / "a.parquet", ["net", "disk"], [url, str(private / "face.png")])
    output = str(base / "out")
    assert (
        main(run_args(str(base / "in"), output, checkpoint, "--allow-host", "127.0.0.1", "--local-root", str(private)))
        == 0
    )
    assert read_output(output).column("status").to_pylist() == ["ok", "ok"]
    return output


def one_secret_free_line(args: list[str], capsys, expected_code: int = 3) -> str:
    """Run the CLI; its exit code must be `expected_code`, SECRET must appear nowhere, stderr must be one line."""
    code = main(args)
    captured = capsys.readouterr()
    assert code == expected_code, captured
    assert SECRET not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["status", f"s3://AKIAHOSTILE:{SECRET}@bucket/out"],
        ["report", f"s3://AKIAHOSTILE:{SECRET}@bucket/out"],
        ["retry-failed", f"s3://AKIAHOSTILE:{SECRET}@bucket/out"],
        [
            "run",
            "--input",
            f"s3://AKIAHOSTILE:{SECRET}@bucket/in/",
            "--output",
            "OUT",
            "--model",
            "MODEL",
            "--prompt",
            "x",
        ],
        [
            "run",
            "--input",
            "IN",
            "--output",
            "OUT",
            "--model",
            f"s3://AKIAHOSTILE:{SECRET}@bucket/model",
            "--prompt",
            "x",
        ],
    ],
)
def test_credentials_in_a_location_on_the_command_line_are_never_printed(
    moto_endpoint, tmp_path, checkpoint, command, capsys
):
    write_shard(tmp_path / "in" / "a.parquet", ["k0"])
    args = [{"OUT": str(tmp_path / "out"), "MODEL": checkpoint, "IN": str(tmp_path / "in")}.get(a, a) for a in command]
    line = one_secret_free_line(args, capsys)
    assert line.startswith(f"blipbatch {command[0]}: ") and "REDACTED@bucket" in line, line


def test_an_http_input_with_a_password_is_never_printed(image_server, tmp_path, checkpoint, capsys):
    url = f"http://reader:{SECRET}@127.0.0.1:{image_server.server_address[1]}/shards/a.parquet"
    line = one_secret_free_line(run_args(url, str(tmp_path / "out"), checkpoint), capsys)
    assert f"http://REDACTED@127.0.0.1:{image_server.server_address[1]}/shards/a.parquet" in line, line


def test_a_report_written_to_a_location_with_credentials_never_prints_them(
    finished_output, moto_endpoint, tmp_path, capsys
):
    code = main(["report", finished_output, "--html", f"s3://AKIAHOSTILE:{SECRET}@bucket/report.html"])
    captured = capsys.readouterr()
    assert code == 3 and "Traceback" not in captured.err, captured.err
    assert SECRET not in captured.out + captured.err
    assert captured.err.strip().splitlines()[-1].startswith("blipbatch report: ")


# ---------------------------------------------------------------- a forged manifest beside the output (item 10)


def test_report_trusts_the_recorded_fetch_settings_only_of_a_local_output_only_the_caller_can_write(
    finished_output, image_server, tmp_path, capsys
):
    import shutil

    shared = tmp_path / "shared-out"  # the same output where others may write: anyone could have forged its manifest
    shutil.copytree(finished_output, shared)
    shared.chmod(0o777)
    before = image_server.requests
    assert main(["report", str(shared), "--html", str(tmp_path / "shared.html")]) == 0
    out = capsys.readouterr().out
    assert "thumbnails fetched with the default [fetch] settings" in out
    assert image_server.requests == before  # the recorded allow_hosts did not let it connect to 127.0.0.1
    page = (tmp_path / "shared.html").read_text()
    assert "data:image/jpeg;base64" not in page  # nor the recorded local_roots embed the private file
    assert page.count("blocked_address") >= 2

    assert main(["report", finished_output, "--html", str(tmp_path / "own.html")]) == 0
    assert "thumbnails fetched with the [fetch] settings the output's manifest recorded" in capsys.readouterr().out
    assert image_server.requests > before
    assert (tmp_path / "own.html").read_text().count("data:image/jpeg;base64") == 2


# ---------------------------------------------------------------- secret-like parameter names (item 11)

SECRET_NAMES = (
    "sessionid",
    "jsessionid",
    "JSESSIONID",
    "passcode",
    "userpass",
    "pwdhash",
    "authcode",
    "oauth",
    "mykey",
    "keyid",
    "sigv4",
    "xsig",
    "Authorization",
    "jwt",
    "bearer",
    "hmac",
    "hdnts",
    "otp",
    "x-otp",
    "apiKey",
    "X-Amz-Signature",
    "access_token",
)


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_redaction_covers_secret_like_parameter_names_by_rule(name):
    from blipbatch.pipeline.errors import RowError
    from blipbatch.pipeline.redact import redact

    for text in (
        f"https://cdn.example/a.png?w=1&{name}={SECRET}&h=2",
        f"https://cdn.example/a.png;{name}={SECRET}",
        f"HTTP 403 from https://cdn.example/a.png?{name}={SECRET}#top",
    ):
        redacted = redact(text)
        assert SECRET not in redacted and f"{name}=REDACTED" in redacted and "cdn.example/a.png" in redacted
        assert SECRET not in str(RowError("fetch_http", text))


def test_redaction_keeps_ordinary_parameters():
    from blipbatch.pipeline.redact import redact

    text = "https://cdn.example/a.png?width=3&format=webp&q=80&id=7&page=2&photo=1&v=2"
    assert redact(text) == text


# ---------------------------------------------------------------- special files among the shards (item 7)


@pytest.mark.parametrize("named", ["folder", "glob", "file"])
def test_a_fifo_named_like_a_shard_is_refused_at_planning_without_opening_it(tmp_path, named, capsys):
    import subprocess
    import sys

    from blipbatch.pipeline.shards import ShardError, discover_shards

    write_shard(tmp_path / "in" / "a.parquet", ["k0"])
    fifo = tmp_path / "in" / "x.parquet"
    os.mkfifo(fifo)
    entry = {"folder": tmp_path / "in", "glob": tmp_path / "in" / "*.parquet", "file": fifo}[named]
    with pytest.raises(ShardError, match=f"{fifo}: a named pipe \\(FIFO\\), not a regular file"):
        discover_shards(str(entry))
    if named != "folder":
        return
    # The CLI, in a process of its own so that a hang cannot hang the test: one line, exit 3, at once.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "blipbatch",
            "run",
            "--input",
            str(entry),
            "--output",
            str(tmp_path / "out"),
            "--model",
            "jobs/demo_data/shapes-instructblip",
            "--prompt",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"blipbatch: {fifo}: a named pipe (FIFO), not a regular file; only "
        "regular files are read as shards: remove it from the input"
    ]


# ---------------------------------------------------------------- instructions and spec values (items 6, 13, 14)

DEMO_MODEL = str(Path(__file__).resolve().parents[1] / "jobs" / "demo_data" / "shapes-instructblip")


def test_a_huge_instruction_is_refused_before_tokenizing_and_placeholders_are_plain_text(tmp_path):
    """One unit: a 10 MB instruction is an invalid_input row, refused by size (never tokenized: that took +1.4 GB and
    seconds); "<video>" and "<image>" are text to the model, as transformers' processor reads "<video>", so their rows
    are ok, not model errors that re-run the micro-batch row by row."""
    import time

    from blipbatch.model.engine import EngineConfig
    from blipbatch.pipeline.worker import ModelWorker, WorkerConfig

    instructions = [
        "<video> What shape is it?",
        "x" * 10_000_000,
        "What color is the shape?",
        "<image> What shape is it? <video>",
        "é" * 9000,
    ]
    shard = write_shard(tmp_path / "in" / "a.parquet", [f"k{i}" for i in range(5)])
    pq.write_table(pq.read_table(shard).append_column("question", pa.array(instructions)), shard)
    mapping = ColumnMapping(id_column="key", instruction_column="question")
    [unit] = plan_units([shard], mapping, 100)
    config = WorkerConfig(
        engine=EngineConfig(model=DEMO_MODEL, device="cpu", generation={"max_new_tokens": 3}),
        mapping=mapping,
        output=str(tmp_path / "out"),
        batch_size=8,
    )
    worker = ModelWorker(config)
    start = time.monotonic()
    worker.process_unit(unit, 1)
    assert time.monotonic() - start < 30
    rows = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert [rows[f"k{i}"]["status"] for i in range(5)] == ["ok", "error", "ok", "ok", "error"]
    for key, characters in (("k1", "10,000,000"), ("k4", "9,000")):  # 9,000 characters are 18,000 bytes
        assert rows[key]["error_kind"] == "invalid_input"
        assert rows[key]["error"] == (
            f"the instruction has {characters} characters, over the 16,384 bytes (UTF-8) an "
            "instruction may take ([run] max_instruction_bytes); shorten it"
        )


def test_video_placeholder_text_keeps_its_own_token_as_in_transformers():
    """Our prompts are tokenized without "<image>" as an added token; the tokens added after it keep their ids, so
    "<video>" is the checkpoint's <video> token (as transformers reads it), never a stray image placeholder."""
    import transformers
    from PIL import Image

    from blipbatch.model.processor import InstructBlipProcessor

    ours = InstructBlipProcessor.from_pretrained(DEMO_MODEL)
    theirs = transformers.InstructBlipProcessor.from_pretrained(DEMO_MODEL)
    video = theirs.tokenizer.convert_tokens_to_ids("<video>")
    assert video != ours.image_token_id
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    for text, videos in (("<video> What shape is it?", 1), ("What <video><video> is it?", 2)):
        got = ours(images=image, text=text)["input_ids"]
        expected = theirs(images=image, text=text, return_tensors="pt")["input_ids"]
        assert int((got == video).sum()) == int((expected == video).sum()) == videos
        assert int((got == ours.image_token_id).sum()) == ours.num_query_tokens


def spec_file(tmp_path: Path, body: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(f'''[job]
kind = "caption"
[input]
path = "in"
[output]
path = "out"
[model]
path = "{DEMO_MODEL}"
{body}''')
    return str(path)


@pytest.mark.parametrize(
    "body, line, message",
    [
        ("[generation]\nnum_beams = 1000000\n", 10, "[generation] num_beams: at most 64, got 1000000"),
        (
            "[generation]\nmax_new_tokens = 1000000000\n",
            10,
            "[generation] max_new_tokens: at most 247: the model's language model has 256 positions, 8 of them for the "
            "image; got 1000000000",
        ),
        ("[generation]\nmax_length = 257\n", 10, "[generation] max_length: at most 256"),
        (
            '[prompt]\ntext = "' + "A photo " * 700_000 + '"\n',
            10,
            "[prompt] text: the instruction has 5,600,000 characters, over the 16,384 bytes (UTF-8) an instruction "
            "may take",
        ),
        (
            '[run]\nmax_instruction_bytes = 8\n[prompt]\ntext = "A short caption:"\n',
            12,
            "[prompt] text: the instruction has 16 characters, over the 8 bytes",
        ),
        (
            "[job2]\nx = " + "[" * 5000 + "]" * 5000 + "\n",
            10,
            "arrays or inline tables nested too deeply; a job spec needs at most 100 levels",
        ),
    ],
)
def test_spec_values_no_run_can_use_are_refused_at_load_with_file_and_line(tmp_path, body, line, message):
    import time

    from blipbatch.jobs.spec import SpecError, load_spec

    path = spec_file(tmp_path, body)
    start = time.monotonic()
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert time.monotonic() - start < 10
    assert str(caught.value).startswith(f"{path}:{line}: {message}"), str(caught.value)[:300]


# ---------------------------------------------------------------- reading an output, then exiting (item 17)

READ_AND_EXIT = "import sys\nfrom blipbatch import read_output\nprint(read_output(sys.argv[1]).num_rows)\n"


@pytest.mark.slow
def test_read_output_never_aborts_the_interpreter_at_exit(tmp_path):
    """Read through a Python file object, about 1 process in 20 died at exit with "terminate called without an active
    exception" (rc 134): an Arrow thread holding a Python object when the interpreter finalized. 30 processes."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from blipbatch.pipeline.shards import WorkUnit
    from blipbatch.pipeline.sink import commit_unit, record_for, write_part

    output = str(tmp_path / "out")
    rows = 0
    for u in range(4):
        n = 10_000
        table = pa.table(
            {
                "id": [f"{u}-{i}" for i in range(n)],
                "text": [f"caption {i} " * 3 for i in range(n)],
                "status": ["ok"] * n,
                "error_kind": pa.nulls(n, pa.string()),
            }
        )
        unit = WorkUnit(f"unit{u}", "shard.parquet", (0,), 0, n)
        write_part(output, unit, table)
        commit_unit(output, record_for(unit, table, 1))
        rows += n

    def read_and_exit(_: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", READ_AND_EXIT, output], capture_output=True, text=True, timeout=120
        )

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(read_and_exit, range(30)))
    assert [(r.returncode, r.stderr.strip()) for r in runs if r.returncode != 0] == []
    assert {r.stdout.strip() for r in runs} == {str(rows)}


# ---------------------------------------------------------------- the output's disk full, its folder deleted (15, 16)


class HookHandler(BaseHTTPRequestHandler):
    """Serves a picture; the first request runs the server's hook (deletes or fills the output mid-run)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        hook, self.server.hook = self.server.hook, None
        if hook is not None:
            hook()
        body = png_bytes(4)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def run_with_hook(tmp_path: Path, output: str, checkpoint: str, hook, capsys) -> tuple[int, str, str]:
    """Shard 0 (images as bytes) commits first; shard 1's images come from a server whose first request runs `hook`
    (one worker: shard 1's unit starts after shard 0's committed)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), HookHandler)
    httpd.hook = hook
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/p.png"
    write_shard(tmp_path / "in" / "0.parquet", ["a0", "a1"])
    write_shard(tmp_path / "in" / "1.parquet", ["b0", "b1"], [url, url])
    try:
        code = main(run_args(str(tmp_path / "in"), output, checkpoint, "--allow-host", "127.0.0.1", "--workers", "1"))
    finally:
        httpd.shutdown()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_an_output_folder_deleted_during_the_run_is_said_and_is_not_exit_0(ray_local, tmp_path, checkpoint, capsys):
    import shutil

    output = str(tmp_path / "out")
    code, out, err = run_with_hook(tmp_path, output, checkpoint, lambda: shutil.rmtree(output), capsys)
    assert code == 1, out + err
    assert (
        "output problem: the output lost 1 of its 2 committed units and its manifest during the run (was the "
        "folder deleted or moved?)"
    ) in out
    assert "Traceback" not in out + err


@pytest.mark.slow
def test_a_full_output_disk_ends_the_run_with_one_line_and_a_summary(ray_local, tmp_path, checkpoint, capsys):
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root): no full disk to write to")
    output = str(disk / "out")

    def fill() -> None:
        with open(disk / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass

    try:
        code, out, err = run_with_hook(tmp_path, output, checkpoint, fill, capsys)
        assert code == 1, out + err
        assert "Traceback" not in out + err and "During handling" not in out + err
        problems = [line for line in out.splitlines() if line.startswith("output problem:")]
        assert len(problems) == 1 and "No space left on device" in problems[0], out
        assert "rows: 2 ok, 0 error" in out  # the summary counts what was committed before the disk filled
        assert sorted(read_output(output).column("id").to_pylist()) == ["a0", "a1"]  # and it reads whole
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_report_reads_an_input_shard_named_by_a_commit_marker_only_under_the_callers_settings(
    finished_output, tmp_path, capsys
):
    """A forged marker names a private Parquet file whose rows hold image bytes, and a forged part says its image was
    given as bytes: the report would read that file and embed its picture; under the caller's settings (no local
    roots) it shows why it did not."""
    import json
    import shutil

    private = write_shard(tmp_path / "private" / "faces.parquet", ["p0", "p1"], [png_bytes(6), png_bytes(7)])
    shared = tmp_path / "shared-out"
    shutil.copytree(finished_output, shared)
    shared.chmod(0o777)
    (marker,) = (shared / "_progress").glob("*.json")
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "shard": private}))
    part = shared / record["part"]
    table = pq.read_table(part)
    pq.write_table(
        table.set_column(
            table.schema.get_field_index("image_url"), "image_url", pa.array(["<1000 bytes>"] * table.num_rows)
        ),
        part,
    )
    assert main(["report", str(shared), "--html", str(tmp_path / "page.html")]) == 0
    capsys.readouterr()
    page = (tmp_path / "page.html").read_text()
    assert "data:image/jpeg;base64" not in page
    assert page.count("no [fetch] local_roots are set") >= 2
