"""Secrets planted in every form an image reference can carry them must appear in no error message, no output row,
no report and no log line: URL passwords (raw '@', '/', '#', '?' included), bare tokens, secret-like query parameters,
credentials before an s3:// or gs:// bucket, and references that are malformed on top of that.

Each secret is built from distinctive segments joined by URL delimiters, and every segment is searched for, so a
secret cut in half by a delimiter still counts as a leak. Servers listen on 127.0.0.1 only."""

from __future__ import annotations

import io
import logging
import random
import string
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from blipbatch.pipeline.errors import RowError
from blipbatch.pipeline.fetch import FetchConfig, Fetcher
from blipbatch.pipeline.redact import redact

SEGMENT_ALPHABET = string.ascii_letters + string.digits
USERINFO_DELIMITERS = "@/#?:!$*+,;=~-._"  # raw in a password, as users paste them
QUERY_DELIMITERS = "/@?:=+,~-.!$*()"  # inside one query value ('&', '#', ';' end it)
SECRET_PARAMETERS = (
    "pass",
    "password",
    "passwd",
    "token",
    "access_token",
    "key",
    "api_key",
    "apiKey",
    "secret",
    "client_secret",
    "signature",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "X-Goog-Signature",
    "sig",
)


class EchoHandler(BaseHTTPRequestHandler):
    """404 for everything, echoing the request line and headers in the body (as some servers do)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = f"no such object: {self.path}\n{self.headers}".encode()
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def echo():
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def references(host: str, segments: list[str], delimiters: str, parameter: str) -> list[str]:
    """The secret (segments joined by `delimiters`) planted in each reference form."""
    raw = "".join(s + d for s, d in zip(segments, delimiters)) + segments[-1]
    query = "".join(s + d for s, d in zip(segments, delimiters.translate(str.maketrans("#&;", "/@?")))) + segments[-1]
    token = "".join(segments)  # a bare token in the user info: no delimiters (it would read as the host)
    return [
        f"http://reader:{raw}@{host}/missing.png",
        f"https://reader:{raw}@{host}/missing.png",  # TLS to a plain-HTTP server: a TLS error
        f"http://{token}@{host}/missing.png",
        f"http://{host}/missing.png?w=1&{parameter}={query}&h=2",
        f"http://{host}/missing.png;{parameter}={query}",
        f"s3://AKIAEXAMPLEKEY:{raw}@bucket/x.jpg",
        f"gs://AKIAEXAMPLEKEY:{raw}@bucket/x.jpg",
        f"file://reader:{raw}@localhost/tmp/x.png",
        f"htp://reader:{raw}@{host}/x.jpg",  # unknown scheme
        f"htp:/reader:{raw}@{host}/x.jpg",  # no '//'
        f"http:/reader:{raw}@{host}/x.jpg",
        f"HTTP://reader:{raw}@{host}/x.jpg",
        f"data:image/png;{parameter}={query};base64,@@@",  # not base64: the message quotes the URI's start
    ]


def leaks(text: str, segments: list[str]) -> list[str]:
    return [segment for segment in segments if segment in text]


segment = st.text(SEGMENT_ALPHABET, min_size=7, max_size=12).map(lambda s: "Q" + s)  # never a host or port alone


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    segments=st.lists(segment, min_size=2, max_size=4),
    delimiters=st.text(USERINFO_DELIMITERS, min_size=3, max_size=3),
    parameter=st.sampled_from(SECRET_PARAMETERS),
)
def test_no_secret_in_any_error_message(echo, segments, delimiters, parameter):
    fetcher = Fetcher(FetchConfig(retries=0, timeout_s=2.0, allow_hosts=("127.0.0.1",)))
    for reference in references(echo, segments, delimiters, parameter):
        assert leaks(redact(reference), segments) == [], reference
        with pytest.raises(RowError) as caught:
            fetcher.fetch(reference)
        assert leaks(str(caught.value), segments) == [], (reference, str(caught.value))


@pytest.mark.parametrize(
    "reference, kept",
    [
        ("s3://AKIAEXAMPLEKEY:SECRETVALUE123@bucket/x.jpg", "s3://REDACTED@bucket/x.jpg"),
        ("https://u:p@ss/w#rd?x@images.example/a.jpg", "https://REDACTED@images.example/a.jpg"),
        ("https://images.example/a.jpg?pass=hunter2&w=3", "https://images.example/a.jpg?pass=REDACTED&w=3"),
        ('Invalid bucket name "AKIAEXAMPLEKEY:SECRETVALUE123@bucket"', 'Invalid bucket name "REDACTED@bucket"'),
        ("https://cdn.example/img@2x.png?width=3", "https://cdn.example/img@2x.png?width=3"),  # an '@' in a path stays
    ],
)
def test_redact_examples(reference, kept):
    assert redact(reference) == kept
    assert redact(kept) == kept


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    "://",
                    "s3://",
                    "@",
                    ":",
                    "/",
                    "?",
                    "#",
                    "&",
                    "=",
                    ";",
                    "token=",
                    "key=",
                    "user:",
                    "pass",
                    " ",
                    '"',
                    "Authorization: ",
                    "\n",
                    "REDACTED",
                ]
            ),
            st.text(SEGMENT_ALPHABET, max_size=6),
        ),
        max_size=20,
    ).map("".join)
)
def test_redact_is_idempotent(text):
    once = redact(text)
    assert redact(once) == once


@pytest.mark.parametrize(
    "text",
    [
        "data:image/png;base64," + "QUJD+/" * 700_000,  # a 4 MB data: URI
        ",a:" * 30_000,
        "a://" * 30_000 + "@x",
        "key=" * 40_000,
        ",a" * 60_000 + "@x",
        "x@" * 60_000,
        "a:/" * 40_000 + "@b",
    ],
)
def test_redact_takes_linear_time(text):
    start = time.monotonic()
    redact(text)
    assert time.monotonic() - start < 1.0, "redact is not linear in its input (a hostile reference could stall a row)"


# -- a whole run: outputs, report and logs ---------------------------------------------------------------------------


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (20, 120, 200)).save(out, "PNG")
    return out.getvalue()


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and not path.is_symlink()]


@pytest.mark.slow
def test_no_secret_in_outputs_report_or_logs(echo, ray_local, tmp_path, caplog, capfd):
    from tiny import write_tiny_checkpoint

    from blipbatch import pipeline
    from blipbatch.jobs.report import write_report

    rng = random.Random(15)
    planted: list[str] = []
    refs = []
    for parameter in SECRET_PARAMETERS[:8]:
        segments = ["Q" + "".join(rng.choices(SEGMENT_ALPHABET, k=10)) for _ in range(3)]
        delimiters = "".join(rng.choices(USERINFO_DELIMITERS, k=2))
        planted += segments
        refs += references(echo, segments, delimiters, parameter)
    good = tmp_path / "images" / "ok.png"
    good.parent.mkdir()
    good.write_bytes(png())
    refs.append(str(good))
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"image_url": refs}), tmp_path / "in" / "rows.parquet")
    output = tmp_path / "out"
    fetch = FetchConfig(retries=0, timeout_s=2.0, allow_hosts=("127.0.0.1",), local_roots=(str(good.parent),))
    caplog.set_level(logging.DEBUG)
    summary = pipeline.run(
        str(tmp_path / "in"),
        str(output),
        str(write_tiny_checkpoint(tmp_path / "model")),
        prompt="Caption:",
        max_new_tokens=2,
        fetch=fetch,
        progress=True,
    )
    assert (summary.rows_ok, summary.rows_error) == (1, len(refs) - 1)
    report = write_report(str(output), str(tmp_path / "report.html"), fetch=fetch)
    captured = capfd.readouterr()

    found: dict[str, list[str]] = {}
    for path in files_under(output):
        text = path.read_bytes().decode("latin-1")
        if path.suffix == ".parquet":  # compressed pages: the values are read back too
            table = pq.read_table(path)
            text += repr(table.to_pylist()) + repr(table.schema.metadata)
        found[str(path.relative_to(output))] = leaks(text, planted)
    found["report.html"] = leaks(Path(report).read_text(), planted)
    found["stdout"] = leaks(captured.out, planted)
    found["stderr"] = leaks(captured.err, planted)
    found["log records"] = leaks("\n".join(record.getMessage() for record in caplog.records), planted)
    assert {where: what for where, what in found.items() if what} == {}
    rows = pq.read_table(output).to_pylist()
    assert sum("REDACTED" in (row["error"] or "") for row in rows) >= len(refs) // 2  # the rows still say what failed
