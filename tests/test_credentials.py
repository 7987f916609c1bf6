"""A credential planted in the environment, and tokens carried in image URLs, must appear nowhere in the output
folder (parts, markers, manifest, lock) nor in the run's stdout, stderr or Ray's log files, even for rows that fail.

The run is the real CLI in a subprocess, with real images from an HTTP server on 127.0.0.1 and from moto S3."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tiny import write_tiny_checkpoint

from blipbatch.pipeline.errors import RowError
from blipbatch.pipeline.redact import redact

SECRET = "blipbatch-canary-secret-123"  # AWS_SECRET_ACCESS_KEY
SESSION_TOKEN = "blipbatch-canary-session-456"  # AWS_SESSION_TOKEN
URL_TOKEN = "blipbatch-canary-urltoken-789"  # in the query of presigned-style URLs
URL_PASSWORD = "blipbatch-canary-password-0"  # in the userinfo of a URL
CANARIES = (SECRET, SESSION_TOKEN, URL_TOKEN, URL_PASSWORD)
BUCKET = "credentials"
REPO = Path(__file__).resolve().parents[1]


def png(k: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32 + k, 28), (30 * k % 255, 140, 90)).save(buffer, "PNG")
    return buffer.getvalue()


class Handler(BaseHTTPRequestHandler):
    """/img/K.png: an image; anything else: 404 (or 403 under /private/), answered with the request's headers and
    URL in the body, as some servers do."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/img/"):
            body, status = png(int(path[5:].split(".")[0])), 200
        else:
            body = f"no such object: {self.path}\n{self.headers}".encode()
            status = 403 if path.startswith("/private/") else 404
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def presigned(base: str, path: str) -> str:
    """A URL shaped like an S3 presigned GET URL whose credential parts carry the canary."""
    return (
        f"{base}{path}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1"
        f"%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
        f"&X-Amz-Security-Token={URL_TOKEN}&X-Amz-Signature={URL_TOKEN}"
    )


def files_under(folder: Path) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                found.append(path)
        except OSError:
            continue  # removed while we walk (another run's Ray cleaning up)
    return found


def keep_ray_logs(temp: Path, held: dict[Path, Path], hold: Path) -> None:
    """Hard-link each file of the run's Ray temp dir (under `temp`, the run's own $TMPDIR: no other process's files
    are read) into `hold`: the run removes its temp dir when it exits, and a link keeps the file (and what is still
    written to it) for the check afterwards."""
    for folder in temp.glob("bb-ray-*"):
        for path in files_under(folder):
            if path not in held:
                try:
                    os.link(path, hold / str(len(held)))
                except OSError:
                    continue  # removed meanwhile, or a socket
                held[path] = hold / str(len(held))


def leaks_in_bytes(data: bytes) -> set[str]:
    return {canary for canary in CANARIES if canary.encode() in data}


def leaks_in_parquet(path: Path) -> set[str]:
    """Canaries in any cell of a Parquet file (its bytes may be compressed, so the values are read too)."""
    table = pq.read_table(path)
    text = repr(table.to_pylist()) + repr(table.schema.metadata)
    return {canary for canary in CANARIES if canary in text}


def test_no_credential_in_output_or_logs(moto_endpoint, server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True)
    fs.mkdir(BUCKET, exist_ok=True)
    fs.pipe_file(f"{BUCKET}/ok.png", png(1))
    fs.pipe_file(f"{BUCKET}/bad.png", b"<html>this is not an image</html>")
    refs = [
        f"{server}/img/2.png",  # ok
        f"s3://{BUCKET}/ok.png",  # ok
        f"s3://{BUCKET}/bad.png",  # decode_error
        f"s3://{BUCKET}/missing.png",  # invalid_input: no such object
        presigned(server, "/missing.png"),  # fetch_http 404
        presigned(server, "/private/x.png"),  # fetch_http 403
        f"http://reader:{URL_PASSWORD}@127.0.0.1:{server.rsplit(':', 1)[1]}/missing.png",  # fetch_http 404
        f"{server}/missing.png?token={URL_TOKEN}&sig={URL_TOKEN}",  # fetch_http 404
    ]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image_url": refs}), tmp_path / "in" / "rows.parquet")
    output = tmp_path / "out"
    checkpoint = str(write_tiny_checkpoint(tmp_path / "model"))
    env = dict(
        os.environ,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_SESSION_TOKEN=SESSION_TOKEN,
        AWS_ACCESS_KEY_ID="testing",
        AWS_ENDPOINT_URL=moto_endpoint,
        PYTHONUNBUFFERED="1",
    )
    env.pop("RAY_ADDRESS", None)
    # The run's own temp folder, short (Ray's socket paths below it must fit in 107 bytes), on the file system of
    # tmp_path's hold folder, so that its files can be hard-linked there.
    ray_temp = Path(tempfile.mkdtemp(prefix="bbc", dir="/tmp"))
    env["TMPDIR"] = str(ray_temp)
    spec = tmp_path / "job.toml"
    spec.write_text(f"""
[job]
kind = "caption"
[input]
path = "in"
[output]
path = "out"
[model]
path = "{checkpoint}"
[prompt]
text = "A short image caption:"
[generation]
max_new_tokens = 3
[fetch]
allow_hosts = ["127.0.0.1"]
""")
    command = [sys.executable, "-m", "blipbatch", "run", str(spec)]
    locks = set()
    ray_logs: dict[Path, Path] = {}
    (tmp_path / "ray-logs").mkdir()
    with open(tmp_path / "stdout.log", "wb") as out, open(tmp_path / "stderr.log", "wb") as err:
        run = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + 240
        try:
            while run.poll() is None:  # keep what the lock file holds while the run has it
                assert time.monotonic() < deadline, "the run did not finish within 240 s"
                try:
                    locks.add((output / "_lock.json").read_bytes())
                except FileNotFoundError:
                    pass
                keep_ray_logs(ray_temp, ray_logs, tmp_path / "ray-logs")
                time.sleep(0.05)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)  # the run and the Ray processes of its session
                run.wait(timeout=30)
            shutil.rmtree(ray_temp, ignore_errors=True)  # what torch leaves there (the run removes Ray's own)
    stdout, stderr = (tmp_path / "stdout.log").read_text(), (tmp_path / "stderr.log").read_text()
    assert run.returncode == 0, stdout + stderr
    assert "rows: 2 ok, 6 error" in stdout, stdout

    rows = pq.read_table(next(output.glob("part-*.parquet"))).to_pylist()
    kinds = sorted(row["error_kind"] or "ok" for row in rows)
    assert kinds == sorted(["ok", "ok", "decode_error", "invalid_input"] + ["fetch_http"] * 4), rows
    # The rows still say which host and path failed; only the secrets are gone.
    for row in rows:
        if row["error_kind"] == "fetch_http":
            assert "REDACTED" in row["image_url"] and "REDACTED" in row["error"], row
            assert "127.0.0.1" in row["error"] and ("/missing.png" in row["error"] or "/private/" in row["error"]), row
    assert locks, "never saw the lock file"

    leaks: dict[str, set[str]] = {}
    for path in files_under(output):
        found = leaks_in_bytes(path.read_bytes()) | (leaks_in_parquet(path) if path.suffix == ".parquet" else set())
        if found:
            leaks[str(path.relative_to(output))] = found
    for i, lock in enumerate(locks):
        if leaks_in_bytes(lock):
            leaks[f"_lock.json (version {i})"] = leaks_in_bytes(lock)
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        if leaks_in_bytes(text.encode()):
            leaks[name] = leaks_in_bytes(text.encode())
    assert any(path.name.endswith((".out", ".err", ".log")) for path in ray_logs), "no Ray log file from the run"
    for path, kept in ray_logs.items():
        if found := leaks_in_bytes(kept.read_bytes()):
            leaks[str(path)] = found
    assert leaks == {}


@pytest.mark.parametrize(
    "text, kept, secret",
    [
        (
            f"HTTP 404 from https://b.s3.amazonaws.com/k.png?X-Amz-Credential=AKIA%2Fx&X-Amz-Security-Token={URL_TOKEN}"
            f"&X-Amz-Signature={URL_TOKEN} (gave up after 4 attempts)",
            "https://b.s3.amazonaws.com/k.png?",
            URL_TOKEN,
        ),
        (f"cannot connect for 'http://user:{URL_PASSWORD}@10.0.0.1/x.png'", "@10.0.0.1/x.png'", URL_PASSWORD),
        (f"https://acct.blob.core.windows.net/c/x.png?sv=2024-01-01&sig={URL_TOKEN}&se=2026", "&se=2026", URL_TOKEN),
        (f"https://maps.example/x.png?key={URL_TOKEN}#top", "#top", URL_TOKEN),
        (
            f"headers: Authorization: AWS4-HMAC-SHA256 Credential=AKIA/x, Signature={URL_TOKEN}\nnext",
            "\nnext",
            URL_TOKEN,
        ),
        (f"aws_session_token = {SESSION_TOKEN}", "aws_session_token = ", SESSION_TOKEN),
    ],
)
def test_redact_removes_secrets_and_keeps_the_rest(text, kept, secret):
    redacted = redact(text)
    assert secret not in redacted and kept in redacted and "REDACTED" in redacted
    assert redact(redacted) == redacted


def test_redact_leaves_plain_references_alone():
    for text in (
        "s3://bucket/images/1.png",
        "http://127.0.0.1:8000/img/1.png?size=large&v=2",
        "data:image/png;base64,iVBORw0KGgo=",
        "/data/images/x.png",
        "<svg xmlns='http://www.w3.org/2000/svg'>",
    ):
        assert redact(text) == text


def test_row_error_messages_are_redacted_and_survive_pickling():
    import pickle

    error = RowError("fetch_http", f"HTTP 403 from http://h/x.png?token={URL_TOKEN}")
    assert URL_TOKEN not in error.message and URL_TOKEN not in str(pickle.loads(pickle.dumps(error)))
