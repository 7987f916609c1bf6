"""Deadlines that hold against hostile servers and slow storage: a row ends within its attempt/row deadline whatever
the other side does (headers dripped a byte at a time, one header line every so often, an object store that never
answers, a FIFO inside an allowed root), and a whole run over such rows ends on time.

Every server here listens on 127.0.0.1 and every loop in it is bounded."""

from __future__ import annotations

import io
import os
import socket
import socketserver
import ssl
import threading
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from PIL import Image

from blipbatch.pipeline import deadline
from blipbatch.pipeline.errors import RowError
from blipbatch.pipeline.fetch import FetchConfig, Fetcher
from blipbatch.pipeline.sink import progress_records
from tests.test_guard import make_certificates

# Each hostile answer sends its next piece after this pause: below the per-read timeout (timeout_s), so only the
# attempt and row deadlines can end the fetch.
PAUSE_S = 0.5
MAX_PIECES = 240  # 2 minutes at most per connection, so a server thread never outlives the test session by much


class HostileHandler(socketserver.BaseRequestHandler):
    """/drip: `HTTP/1.1 200 OK\\r\\nX-Drip: ` and then one byte per pause; /lines: one header line per pause;
    /stall: nothing at all after the request. Records when the client hung up (a send failed, or the read ended)."""

    def handle(self) -> None:
        request = self.request.recv(65536).decode("latin-1")
        path = request.split(" ", 2)[1] if request.count(" ") >= 2 else ""
        start = {"/drip": b"HTTP/1.1 200 OK\r\nX-Drip: ", "/lines": b"HTTP/1.1 200 OK\r\n"}.get(path.split("?")[0])
        try:
            if start is not None:
                self.request.sendall(start)
            for n in range(MAX_PIECES):
                if start is None:  # /stall and anything else: wait for the client to hang up
                    if self.request.recv(1) == b"":
                        break
                    continue
                time.sleep(PAUSE_S)
                self.request.sendall(b"x" if path.startswith("/drip") else f"X-Line-{n}: v\r\n".encode())
        except OSError:
            pass  # the client hung up: what the test wants
        finally:
            with self.server.lock:
                self.server.hung_up.append(time.monotonic())


class HostileServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HostileHandler)
        self.lock = threading.Lock()
        self.hung_up: list[float] = []

    def url(self, path: str, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.server_address[1]}{path}"


@pytest.fixture(scope="module")
def hostile():
    server = HostileServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def config(**overrides) -> FetchConfig:
    settings = {
        "timeout_s": 5.0,
        "attempt_deadline_s": 1.5,
        "retries": 0,
        "backoff_s": 0.01,
        "allow_hosts": ("127.0.0.1", "localhost"),
    }
    settings.update(overrides)
    return FetchConfig(**settings)


def timed_error(fetcher: Fetcher, ref: str) -> tuple[RowError, float]:
    start = time.monotonic()
    with pytest.raises(RowError) as caught:
        fetcher.fetch(ref)
    return caught.value, time.monotonic() - start


def wait_for_hang_ups(server: HostileServer, count: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with server.lock:
            if len(server.hung_up) >= count:
                return
        time.sleep(0.05)
    pytest.fail(
        f"the server saw {len(server.hung_up)} of {count} connections closed within {within_s} s: a "
        "timed-out attempt left its socket open"
    )


@pytest.mark.parametrize("path", ["/drip", "/lines"])
def test_header_drip_ends_at_the_attempt_deadline(hostile, path):
    with hostile.lock:
        before = len(hostile.hung_up)
    err, elapsed = timed_error(Fetcher(config()), hostile.url(path))
    assert err.kind == "fetch_timeout" and "took longer than 1.5 s" in err.message, err
    assert elapsed < 1.5 + 2, f"{path}: the row took {elapsed:.1f} s"
    # The socket was shut from outside, so the server sees the hang-up at its next send (not after 2 minutes).
    wait_for_hang_ups(hostile, before + 1, within_s=2 * PAUSE_S + 1)


def test_a_connect_that_is_never_answered_ends_at_the_attempt_deadline():
    """A listening socket whose backlog is full drops further SYNs: the connect waits, as for a black-holed host."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as server, socket.socket() as filler:
        filler.connect(server.getsockname())  # fills the backlog of 0 (+1)
        err, elapsed = timed_error(Fetcher(config(timeout_s=30.0)), f"http://127.0.0.1:{server.getsockname()[1]}/x")
    assert err.kind == "fetch_timeout", err
    assert elapsed < 1.5 + 2, f"the connect held the row {elapsed:.1f} s"


def test_retries_stop_at_the_row_deadline(hostile):
    err, elapsed = timed_error(Fetcher(config(retries=10, row_deadline_s=4.0)), hostile.url("/drip"))
    assert err.kind == "fetch_timeout" and "row deadline of 4s" in err.message, err
    assert elapsed < 4.0 + 2, f"the row took {elapsed:.1f} s"


def test_https_header_drip_ends_at_the_attempt_deadline(tmp_path, monkeypatch):
    """The deadline shuts a TLS socket too: a TLS proxy in front of the drip server holds the handshake's
    certificate, then relays the dripped header block."""
    ca, cert, key = make_certificates(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", ca)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def relay() -> None:
        with listener, context.wrap_socket(listener.accept()[0], server_side=True) as client:
            client.recv(65536)
            client.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            for _ in range(MAX_PIECES):
                time.sleep(PAUSE_S)
                client.sendall(b"x")

    thread = threading.Thread(target=lambda: _quietly(relay), daemon=True)
    thread.start()
    err, elapsed = timed_error(Fetcher(config()), f"https://localhost:{port}/drip")
    assert err.kind == "fetch_timeout", err
    assert elapsed < 1.5 + 2
    thread.join(timeout=2 * PAUSE_S + 1)
    assert not thread.is_alive(), "the TLS connection was left open after the deadline"


def _quietly(call) -> None:
    try:
        call()
    except OSError:
        pass  # the client hung up


def test_a_stalled_object_store_ends_at_the_attempt_deadline(hostile, s3fs_clean, monkeypatch):
    """s3:// against an endpoint that accepts the connection and never answers."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", hostile.url("/stall"))
    err, elapsed = timed_error(Fetcher(config()), "s3://bucket/x.jpg")
    assert err.kind == "fetch_timeout" and "s3://bucket/x.jpg took longer than 1.5 s" in err.message, err
    assert elapsed < 1.5 + 2


class SlowFile(AbstractBufferedFile):
    def _fetch_range(self, start: int, end: int) -> bytes:
        self.fs.release.wait(timeout=30)  # a disk or network file system that stops answering (bounded)
        return b"x" * (end - start)


class SlowFileSystem(AbstractFileSystem):
    """A storage backend whose reads block: what a hung NFS mount or a stalled store does to a reader."""

    protocol = "slowfs"
    release = threading.Event()

    def info(self, path, **kwargs):
        return {"name": path, "size": 100, "type": "file"}

    def _open(self, path, mode="rb", **kwargs):
        return SlowFile(self, path, mode, size=100)


def test_a_blocking_storage_read_ends_at_the_attempt_deadline():
    fsspec.register_implementation("slowfs", SlowFileSystem, clobber=True)
    try:
        fetcher = Fetcher(config(allowed_schemes=("slowfs",)))
        err, elapsed = timed_error(fetcher, "slowfs://volume/x.jpg")
        assert err.kind == "fetch_timeout" and "took longer than 1.5 s" in err.message, err
        assert elapsed < 1.5 + 2
    finally:
        SlowFileSystem.release.set()  # the abandoned read ends now


def test_a_fifo_or_device_inside_a_root_is_refused_before_opening(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    fetcher = Fetcher(config(local_roots=(str(tmp_path), "/dev")))
    err, elapsed = timed_error(fetcher, str(fifo))
    assert (err.kind, err.message) == (
        "invalid_input",
        f"not a file: {fifo} is a named pipe (FIFO); only regular files are read",
    )
    assert elapsed < 0.5
    err, _ = timed_error(fetcher, "/dev/zero")
    assert (err.kind, err.message) == (
        "invalid_input",
        "not a file: /dev/zero is a character device; only regular files are read",
    )
    # a symlink inside the root to a FIFO inside the root: the resolved path is judged
    (tmp_path / "link.png").symlink_to(fifo)
    assert "named pipe" in timed_error(fetcher, f"file://{tmp_path}/link.png")[0].message


# -- a run over hostile rows -----------------------------------------------------------------------------------------


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.slow
def test_a_run_over_twenty_dripping_rows_ends_on_time(hostile, ray_local, tmp_path):
    from tiny import write_tiny_checkpoint

    from blipbatch import pipeline

    good = tmp_path / "images" / "ok.png"
    good.parent.mkdir()
    good.write_bytes(png())
    refs = [hostile.url(f"/drip?row={i}") if i % 2 else hostile.url(f"/lines?row={i}") for i in range(20)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image_url": [*refs, str(good)]}), tmp_path / "in" / "rows.parquet")
    checkpoint = str(write_tiny_checkpoint(tmp_path / "model"))
    fetch = FetchConfig(
        attempt_deadline_s=2.0, row_deadline_s=4.0, allow_hosts=("127.0.0.1",), local_roots=(str(good.parent),)
    )  # the default 16 fetch threads: two waves of rows, each ended by the row deadline
    start = time.monotonic()
    summary = pipeline.run(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        checkpoint,
        prompt="Caption:",
        max_new_tokens=2,
        fetch=fetch,
        progress=False,
    )
    elapsed = time.monotonic() - start
    [marker] = progress_records(str(tmp_path / "out"))
    print(f"20 dripping rows, row_deadline_s = 4: the unit took {marker.timing.seconds:.1f} s, the run {elapsed:.1f} s")
    # Each row held to its deadline: their fetch times add up to about 20 x 4 s, whatever the load.
    assert 20 * 2.0 < marker.timing.fetch_s < 20 * (4.0 + 1.0), marker.timing
    # Two waves of rows, each ended by its deadline (8 s). Timed: the unit less its model time, which a loaded machine
    # stretches most (the first call of a one-row unit took 11 s at a load average of 14).
    waited = marker.timing.seconds - marker.timing.model_s
    assert waited < 20, f"20 dripping rows with row_deadline_s = 4 held the unit {waited:.0f} s"
    rows = pq.read_table(next(Path(tmp_path / "out").rglob("part-*.parquet"))).to_pylist()
    kinds = sorted(row["error_kind"] or "ok" for row in rows)
    assert kinds == ["fetch_timeout"] * 20 + ["ok"], kinds
    assert (summary.rows_ok, summary.rows_error) == (1, 20)


def test_a_retry_cut_by_the_row_deadline_reports_what_made_the_row_retry():
    """The first attempt fails fast (nothing listens), the retry hangs (the port now listens with a full backlog) and
    is cut by the row deadline: the row says why it retried, not that its last attempt ran out of time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket is closed
    opened: list[socket.socket] = []

    def sleep(seconds: float) -> None:
        if not opened:  # from now on a connect to the port waits: SYNs beyond the backlog are dropped
            opened.append(socket.create_server(("127.0.0.1", port), backlog=0))
            opened.append(socket.create_connection(("127.0.0.1", port)))
        time.sleep(0.5)

    fetcher = Fetcher(config(retries=3, row_deadline_s=1.5, attempt_deadline_s=5.0, backoff_s=0.0), sleep=sleep)
    try:
        err, elapsed = timed_error(fetcher, f"http://127.0.0.1:{port}/x")
    finally:
        for sock in opened:
            sock.close()
    assert len(opened) == 2, "the first attempt did not fail fast"
    assert err.kind == "fetch_connection" and "cannot connect" in err.message, err
    assert "gave up after 2 attempts, row deadline of 1.5s" in err.message, err
    assert elapsed < 1.5 + 2


def test_attempts_one_after_another_reuse_one_thread():
    """An attempt is handed to an idle attempt thread rather than a new one (a thread start cost as much as a
    local read); one still blocked past its deadline is not handed another attempt."""
    deadline.run_within(1.0, threading.get_native_id, TimeoutError, 64)  # at least one idle attempt thread now
    # (attempt threads of earlier tests may rejoin the idle ones meanwhile and be taken too: which one is not the point)
    before = {thread.native_id for thread in threading.enumerate() if thread.name == "fetch-attempt"}
    seen = {deadline.run_within(1.0, threading.get_native_id, TimeoutError, 64) for _ in range(20)}
    assert seen <= before  # no thread started for them
    release = threading.Event()
    blocked: list[int] = []

    def hang() -> None:
        blocked.append(threading.get_native_id())
        release.wait(10)

    with pytest.raises(TimeoutError):
        deadline.run_within(0.1, hang, TimeoutError, 64)
    try:
        assert deadline.run_within(1.0, threading.get_native_id, TimeoutError, 64) != blocked[0]
    finally:
        release.set()


ATTEMPTS_THEN_EXIT = """
import atexit, threading

def alive() -> None:  # registered first, so it runs after blipbatch's own exit handlers
    print(sum(thread.name == "fetch-attempt" and thread.is_alive() for thread in threading.enumerate()))

atexit.register(alive)
from blipbatch.pipeline import deadline
threads = [threading.Thread(target=deadline.run_within, args=(5.0, lambda: None, TimeoutError, 64)) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


def test_idle_attempt_threads_end_when_the_interpreter_exits():
    """Idle attempt threads do not wait on into the interpreter's finalization: they end at exit."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ATTEMPTS_THEN_EXIT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
