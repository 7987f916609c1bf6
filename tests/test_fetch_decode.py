"""Fetching (a real HTTP server on 127.0.0.1, local files, data: URIs, moto S3) and decoding (real image files)."""

from __future__ import annotations

import base64
import collections
import email.utils
import importlib.util
import io
import pickle
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import fsspec
import PIL.Image
import pytest
from fsspec.spec import AbstractFileSystem

from blipbatch.pipeline.decode import DecodeConfig, decode_image
from blipbatch.pipeline.errors import ERROR_KINDS, RowError
from blipbatch.pipeline.fetch import FetchConfig, Fetcher


def image_bytes(fmt: str = "PNG", size=(32, 24), color=(200, 30, 30), **save) -> bytes:
    out = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(out, fmt, **save)
    return out.getvalue()


PNG = image_bytes()
HTML = b"<!DOCTYPE html>\n<html><body>Not found</body></html>"


def fast(**overrides) -> FetchConfig:
    """Test defaults: short timeouts and backoff, so retries cost milliseconds; the test server's address allowed."""
    settings = {"timeout_s": 2.0, "backoff_s": 0.01, "max_backoff_s": 0.05, "allow_hosts": ("127.0.0.1",)}
    settings.update(overrides)
    return FetchConfig(**settings)


def expect_error(fetcher: Fetcher, ref, kind: str, *fragments: str) -> RowError:
    with pytest.raises(RowError) as caught:
        fetcher.fetch(ref)
    assert caught.value.kind == kind, caught.value
    for fragment in fragments:
        assert fragment in caught.value.message, caught.value.message
    return caught.value


# -- the HTTP server -------------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """Routes: /img/T, /status/CODE/T, /fail/CODE/N/T (CODE N times, then the image), /retry-after/VALUE/T (429 once),
    /reset/N/T, /hang/T, /hang-body/T, /drip/T, /redirect/N/T, /redirect-file/T, /big/N/T[?cl=0], /page/T, /slow/I,
    /keep/img and /keep/CODE (HTTP/1.1 keep-alive).
    T is a tag that keeps each test's request counts apart."""

    protocol_version = "HTTP/1.0"  # one request per connection: counts are exact, no stale pooled sockets

    def log_message(self, *args) -> None:
        pass

    def send(self, status: int, body: bytes = b"", headers: dict | None = None, length: bool = True) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reset(self) -> None:
        # SO_LINGER 0: close() sends a TCP RST instead of a FIN
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        with self.server.lock:
            self.server.hits[path] += 1
            count = self.server.hits[path]
        parts = path.strip("/").split("/")
        route = parts[0]
        if route == "img":
            self.send(200, PNG, {"Content-Type": "image/png"})
        elif route == "status":
            self.send(int(parts[1]), b"error page")
        elif route == "fail":
            code, times = int(parts[1]), int(parts[2])
            if count <= times:
                self.send(code, b"try again")
            else:
                self.send(200, PNG)
        elif route == "retry-after":
            if count == 1:
                self.send(429, b"slow down", {"Retry-After": parts[1].replace("_", " ")})
            else:
                self.send(200, PNG)
        elif route == "reset":
            if count <= int(parts[1]):
                self.reset()
            else:
                self.send(200, PNG)
        elif route == "hang":
            time.sleep(1.0)
            self.send(200, PNG)
        elif route == "hang-body":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            time.sleep(1.0)
        elif route == "drip":
            self.send_response(200)
            self.send_header("Content-Length", "10000")
            self.end_headers()
            try:
                for _ in range(60):  # 3 s at most
                    self.wfile.write(b"x")
                    time.sleep(0.05)
            except OSError:
                pass  # the client gave up
        elif route == "redirect":
            hops = int(parts[1])
            if hops == 0:
                self.send(200, PNG)
            else:
                self.send(302, headers={"Location": f"/redirect/{hops - 1}/{parts[2]}"})
        elif route == "redirect-file":
            self.send(302, headers={"Location": "file:///etc/passwd"})
        elif route == "big":
            self.send(200, b"x" * int(parts[1]), length=query != "cl=0")
        elif route == "keep":  # keep-alive: the client may send its next request on this connection
            self.protocol_version = "HTTP/1.1"
            self.close_connection = False
            with self.server.lock:
                self.server.client_ports.append(self.client_address[1])
            if parts[1] == "img":
                self.send(200, PNG)
            else:
                self.send(int(parts[1]), b"error page")
        elif route == "page":
            self.send(200, HTML, {"Content-Type": "text/html"})
        elif route == "slow":
            time.sleep(0.2)
            self.send(200, f"slow-{parts[1]}".encode())
        else:
            self.send(404, b"no such route")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.hits: collections.Counter[str] = collections.Counter()
        self.client_ports: list[int] = []

    def handle_error(self, request, client_address) -> None:
        pass  # clients that hang up on purpose (timeouts, size limits) are expected here

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture(scope="module")
def server():
    httpd = Server()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


# -- http ------------------------------------------------------------------------------------------------------------


def test_http_image(server):
    assert Fetcher(fast()).fetch(server.url("/img/ok")) == PNG


def test_connections_are_reused(server):
    fetcher = Fetcher(fast())
    for path in ["/keep/img", "/keep/404", "/keep/503", "/keep/img"]:
        try:
            fetcher.fetch(server.url(path))
        except RowError:
            pass
    assert len(server.client_ports) == 4 + 3  # 503 is retried 3 times
    assert len(set(server.client_ports)) == 1, "every request, error answers included, went on one connection"


def test_404_is_not_retried(server):
    expect_error(Fetcher(fast()), server.url("/status/404/a"), "fetch_http", "HTTP 404 from http://127.0.0.1")
    assert server.hits["/status/404/a"] == 1


def test_500_then_success_is_retried(server):
    assert Fetcher(fast(retries=3)).fetch(server.url("/fail/500/2/a")) == PNG
    assert server.hits["/fail/500/2/a"] == 3


def test_503_forever_exhausts_retries(server):
    err = expect_error(
        Fetcher(fast(retries=3)), server.url("/status/503/a"), "fetch_http", "HTTP 503", "gave up after 4 attempts"
    )
    assert "/status/503/a" in err.message
    assert server.hits["/status/503/a"] == 4


def test_row_deadline_stops_retrying(server):
    fetcher = Fetcher(
        fast(retries=50, backoff_s=0.1, max_backoff_s=0.1, row_deadline_s=0.5), rng=random.Random(0), sleep=time.sleep
    )
    start = time.monotonic()
    expect_error(fetcher, server.url("/status/503/deadline"), "fetch_http", "row deadline of 0.5s")
    assert time.monotonic() - start < 1.5
    assert 2 <= server.hits["/status/503/deadline"] < 50


def test_backoff_is_exponential_with_full_jitter(server):
    sleeps: list[float] = []
    config = fast(retries=3, backoff_s=1.0, max_backoff_s=1.5)
    fetcher = Fetcher(config, sleep=sleeps.append, rng=random.Random(0))
    expect_error(fetcher, server.url("/status/502/a"), "fetch_http", "gave up after 4 attempts")
    assert len(sleeps) == 3
    for n, delay in enumerate(sleeps):
        assert 0 <= delay <= min(1.5, 2**n)
    assert len(set(sleeps)) == 3  # jittered, not a fixed schedule


def test_429_honours_retry_after_seconds(server):
    sleeps: list[float] = []
    assert Fetcher(fast(max_backoff_s=5), sleep=sleeps.append).fetch(server.url("/retry-after/2/a")) == PNG
    assert sleeps == [2.0]
    assert server.hits["/retry-after/2/a"] == 2


def test_retry_after_is_capped_and_may_be_a_date(server):
    sleeps: list[float] = []
    fetcher = Fetcher(fast(max_backoff_s=3), sleep=sleeps.append)
    assert fetcher.fetch(server.url("/retry-after/3600/a")) == PNG
    assert sleeps == [3.0]
    date = email.utils.formatdate(time.time() + 30, usegmt=True).replace(" ", "_")
    sleeps.clear()
    assert Fetcher(fast(max_backoff_s=100), sleep=sleeps.append).fetch(server.url(f"/retry-after/{date}/b")) == PNG
    assert len(sleeps) == 1 and 25 <= sleeps[0] <= 31


def test_connection_reset_is_retried(server):
    assert Fetcher(fast(retries=3)).fetch(server.url("/reset/2/a")) == PNG
    assert server.hits["/reset/2/a"] == 3
    expect_error(Fetcher(fast(retries=2)), server.url("/reset/99/b"), "fetch_connection", "gave up after 3 attempts")
    assert server.hits["/reset/99/b"] == 3


def test_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket is closed
    expect_error(
        Fetcher(fast(retries=1)),
        f"http://127.0.0.1:{port}/x.jpg",
        "fetch_connection",
        "cannot connect",
        "gave up after 2 attempts",
    )


def test_hanging_server_times_out(server):
    start = time.monotonic()
    expect_error(
        Fetcher(fast(timeout_s=0.3, retries=1)),
        server.url("/hang/a"),
        "fetch_timeout",
        "timed out after 0.3 s",
        "gave up after 2 attempts",
    )
    assert time.monotonic() - start < 1.5
    assert server.hits["/hang/a"] == 2


def test_body_that_stalls_times_out(server):
    expect_error(
        Fetcher(fast(timeout_s=0.3, retries=0)), server.url("/hang-body/a"), "fetch_timeout", "gave up after 1 attempt"
    )


def test_dripping_body_hits_the_attempt_deadline(server):
    start = time.monotonic()
    expect_error(
        Fetcher(fast(timeout_s=0.3, attempt_deadline_s=0.5, retries=0)),
        server.url("/drip/a"),
        "fetch_timeout",
        "longer than 0.5 s",
    )
    assert time.monotonic() - start < 1.5


def test_redirects_are_bounded(server):
    fetcher = Fetcher(fast(max_redirects=5))
    assert fetcher.fetch(server.url("/redirect/5/a")) == PNG
    expect_error(fetcher, server.url("/redirect/6/b"), "fetch_http", "more than 5 redirects")
    assert sum(n for path, n in server.hits.items() if path.startswith("/redirect/") and path.endswith("/b")) == 6
    assert server.hits["/redirect/0/b"] == 0


def test_redirect_to_a_local_file_is_refused(server):
    expect_error(Fetcher(fast()), server.url("/redirect-file/a"), "fetch_http", "non-HTTP URL", "file:///etc/passwd")
    assert server.hits["/redirect-file/a"] == 1


@pytest.mark.parametrize("with_length", [True, False])
def test_body_over_the_byte_limit(server, with_length):
    fetcher = Fetcher(fast(max_bytes=1000))
    assert fetcher.fetch(server.url("/big/1000/exact")) == b"x" * 1000
    path = f"/big/5000/{with_length}" + ("" if with_length else "?cl=0")
    expect_error(
        fetcher,
        server.url(path),
        "too_large",
        "1000 bytes limit",
        "Content-Length" if with_length else "sent more than",
    )
    assert server.hits[path.partition("?")[0]] == 1  # never retried


def test_html_page_fetches_but_does_not_decode(server):
    data = Fetcher(fast()).fetch(server.url("/page/a"))
    with pytest.raises(RowError) as caught:
        decode_image(data)
    assert caught.value.kind == "decode_error"
    assert caught.value.message == f"not an image: HTML, {len(HTML)} bytes (supported: JPEG, PNG, WEBP, GIF, BMP, TIFF)"


def test_fetch_all_keeps_order_and_runs_concurrently(server):
    fetcher = Fetcher(fast(concurrency=8))
    refs = [server.url(f"/slow/{i}") for i in range(8)]
    start = time.monotonic()
    results = fetcher.fetch_all(refs)
    elapsed = time.monotonic() - start
    assert results == [f"slow-{i}".encode() for i in range(8)]
    assert elapsed < 1.0, f"8 requests of 0.2 s took {elapsed:.2f} s with concurrency 8"


def test_fetch_all_returns_errors_in_place(server):
    results = Fetcher(fast()).fetch_all([server.url("/img/all"), None, server.url("/status/404/all"), PNG])
    assert results[0] == PNG and results[3] == PNG
    assert [r.kind for r in results[1:3]] == ["invalid_input", "fetch_http"]
    assert Fetcher(fast()).fetch_all([]) == []


# -- other references ------------------------------------------------------------------------------------------------


def test_local_path_and_file_url(tmp_path):
    path = tmp_path / "a b.png"
    path.write_bytes(PNG)
    fetcher = Fetcher(fast(local_roots=(str(tmp_path),)))
    assert fetcher.fetch(str(path)) == PNG
    assert fetcher.fetch(f"file://{path}") == PNG
    expect_error(fetcher, str(tmp_path / "missing.png"), "invalid_input", "no such file or object")
    expect_error(fetcher, str(tmp_path), "invalid_input", "not a file")


def test_local_file_over_the_byte_limit(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 5000)
    expect_error(
        Fetcher(fast(max_bytes=1000, local_roots=(str(tmp_path),))),
        str(path),
        "too_large",
        "4.9 KiB",
        "1000 bytes limit",
    )


def test_data_uris():
    fetcher = Fetcher(fast())
    assert fetcher.fetch("data:image/png;base64," + base64.b64encode(PNG).decode()) == PNG
    assert fetcher.fetch("data:image/png," + quote(PNG)) == PNG
    assert fetcher.fetch("data:text/plain,http://not-a-url") == b"http://not-a-url"
    expect_error(fetcher, "data:image/png;base64,@@@", "invalid_input", "not valid base64")
    expect_error(fetcher, "data:image/png;base64", "invalid_input", "malformed data: URI")
    small = Fetcher(fast(max_bytes=50))
    assert len(PNG) > 50
    expect_error(small, "data:image/png;base64," + base64.b64encode(PNG).decode(), "too_large", "50 bytes limit")
    expect_error(small, "data:image/png," + quote(PNG), "too_large", "50 bytes limit")


def test_raw_bytes():
    fetcher = Fetcher(fast())
    assert fetcher.fetch(PNG) == PNG
    assert fetcher.fetch(memoryview(PNG)) == PNG
    expect_error(Fetcher(fast(max_bytes=10)), PNG, "too_large", "image bytes is", "10 bytes limit")


@pytest.mark.parametrize("ref", [None, "", "   \n"])
def test_empty_reference(ref):
    expect_error(Fetcher(fast()), ref, "invalid_input", "empty image reference")


def test_unsupported_and_disallowed_references(tmp_path):
    fetcher = Fetcher(fast())
    expect_error(fetcher, "ftp://host/x.jpg", "invalid_input", "scheme 'ftp'", "allowed schemes: http, https, s3")
    expect_error(fetcher, 12, "invalid_input", "must be a string or bytes, got int")
    expect_error(fetcher, "memory://x::s3://bucket/key", "invalid_input", "scheme 'memory'")
    expect_error(fetcher, f"file://{tmp_path}/a::http://127.0.0.1/", "invalid_input", "URL chaining")
    web_only = Fetcher(fast(allowed_schemes=("https",)))
    expect_error(web_only, str(tmp_path / "x.png"), "invalid_input", "local paths not allowed")
    expect_error(web_only, "http://127.0.0.1/x.png", "invalid_input", "scheme 'http' not allowed")
    expect_error(fetcher, "http://", "invalid_input", "malformed URL")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed, gs:// has a backend")
def test_missing_fsspec_backend():
    expect_error(Fetcher(fast()), "gs://bucket/x.jpg", "invalid_input", "needs a package that is not installed")


def test_config_is_validated():
    with pytest.raises(ValueError, match="retries"):
        FetchConfig(retries=-1)
    with pytest.raises(ValueError, match="concurrency"):
        FetchConfig(concurrency=0)
    with pytest.raises(ValueError, match="SVG"):
        DecodeConfig(formats=("PNG", "SVG"))


def test_row_error_kinds_and_pickling():
    err = RowError("fetch_http", "HTTP 404 from http://x/y.jpg")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.kind, copy.message, str(copy)) == (
        "fetch_http",
        "HTTP 404 from http://x/y.jpg",
        "fetch_http: HTTP 404 from http://x/y.jpg",
    )
    with pytest.raises(ValueError, match="unknown error kind"):
        RowError("oops", "x")
    assert "model_error" in ERROR_KINDS


# -- s3 (moto server) ------------------------------------------------------------------------------------------------


@pytest.fixture
def s3(s3fs_clean):
    if not s3fs_clean.exists("images"):
        s3fs_clean.mkdir("images")
    return s3fs_clean


def test_s3(s3):
    s3.pipe("images/a.png", PNG)
    s3.pipe("images/big.bin", b"x" * 5000)
    assert Fetcher(fast()).fetch("s3://images/a.png") == PNG
    expect_error(
        Fetcher(fast()), "s3://images/missing.png", "invalid_input", "no such file or object", "s3://images/missing.png"
    )
    expect_error(Fetcher(fast(max_bytes=1000)), "s3://images/big.bin", "too_large", "4.9 KiB")


# -- decoding --------------------------------------------------------------------------------------------------------


def decode_error(data: bytes, kind: str = "decode_error", config: DecodeConfig = DecodeConfig()) -> str:
    with pytest.raises(RowError) as caught:
        decode_image(data, config)
    assert caught.value.kind == kind, caught.value
    return caught.value.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_decodes_to_rgb(fmt):
    image = decode_image(image_bytes(fmt, size=(40, 30), color=(10, 200, 30)))
    assert image.mode == "RGB" and image.size == (40, 30)
    assert all(abs(a - b) <= 8 for a, b in zip(image.getpixel((20, 15)), (10, 200, 30)))


def test_animated_gif_gives_its_first_frame():
    frames = [PIL.Image.new("RGB", (20, 20), color) for color in [(255, 0, 0), (0, 0, 255)]]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = decode_image(out.getvalue())
    assert image.mode == "RGB"
    assert image.getpixel((10, 10)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    base = PIL.Image.new("RGB", (40, 20), (255, 0, 0))
    base.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    out = io.BytesIO()
    base.save(out, "JPEG", exif=exif, quality=95)
    image = decode_image(out.getvalue())
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50  # the left (red) side is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_transparent_pixels_go_onto_white():
    rgba = PIL.Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.putpixel((5, 5), (0, 128, 0, 255))
    out = io.BytesIO()
    rgba.save(out, "PNG")
    image = decode_image(out.getvalue())
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((5, 5)) == (0, 128, 0)


def test_truncated_jpeg():
    noisy = PIL.Image.frombytes("RGB", (128, 128), random.Random(0).randbytes(128 * 128 * 3))
    out = io.BytesIO()
    noisy.save(out, "JPEG", quality=90)
    data = out.getvalue()
    assert decode_image(data).size == (128, 128)
    assert decode_error(data[: len(data) // 2]).startswith("truncated or corrupt JPEG: ")


def test_empty_svg_html_and_unknown_formats():
    assert decode_error(b"") == "empty file (0 bytes)"
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    assert decode_error(svg) == "SVG is not supported (raster formats only: JPEG, PNG, WEBP, GIF, BMP, TIFF)"
    assert decode_error(HTML) == f"not an image: HTML, {len(HTML)} bytes (supported: JPEG, PNG, WEBP, GIF, BMP, TIFF)"
    assert decode_error(b"\x00\x01\x02garbage" * 10) == (
        "not an image: binary data of unknown type, 100 bytes (supported: JPEG, PNG, WEBP, GIF, BMP, TIFF)"
    )
    # a real image in a format left out of the list is refused before any plugin parses it
    gif = image_bytes("GIF")
    assert (
        decode_error(gif, config=DecodeConfig(formats=("PNG",)))
        == f"not an image: a GIF image, {len(gif)} bytes (supported: PNG)"
    )


def one_colour_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG, compressed row block by row block: a few tens of KB, never a full bitmap."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits, all zero
    compressor = zlib.compressobj(9)
    idat = [compressor.compress(row * min(256, height - y)) for y in range(0, height, 256)]
    idat.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = one_colour_png(20000, 20000)
    assert len(data) < 100_000
    return data


def test_decompression_bomb_is_too_large_and_fast(bomb):
    start = time.monotonic()
    assert decode_error(bomb, "too_large") == "image is 20000x20000 = 400 MP, above the 40 MP limit"
    assert time.monotonic() - start < 1.0


def test_pixel_limit_does_not_rely_on_pillows_global(bomb, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)  # Pillow's own guard off
    start = time.monotonic()
    assert decode_error(bomb, "too_large") == "image is 20000x20000 = 400 MP, above the 40 MP limit"
    assert time.monotonic() - start < 1.0
    # below Pillow's default 89 MP but above ours
    monkeypatch.undo()
    assert decode_error(one_colour_png(8000, 6000), "too_large") == "image is 8000x6000 = 48 MP, above the 40 MP limit"
    assert decode_image(one_colour_png(100, 100), DecodeConfig(max_pixels=10_000)).size == (100, 100)
    assert "above the 0.01 MP limit" in decode_error(
        one_colour_png(101, 100), "too_large", DecodeConfig(max_pixels=10_000)
    )


# -- malformed references, messages, imports -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref, fragments",
    [
        (
            "htp:/not a url",
            [
                "malformed image reference 'htp:/not a url'",
                "it starts with 'htp:'",
                "needs '://'",
                "did you mean 'http'?",
            ],
        ),
        ("http:/images.example/a.jpg", ["it starts with 'http:'", "needs '://'"]),
        ("htp://images.example/a.jpg", ["scheme 'htp' not allowed", "did you mean 'http'?"]),
        ("http:///a.jpg", ["malformed URL 'http:///a.jpg': no host after '//'"]),
        ("https://images example/a.jpg", ["the host contains white space"]),
        (
            "http://user:pa/ss@images.example/a.jpg",
            ["malformed URL 'http://REDACTED@images.example/a.jpg'", "must be percent-encoded"],
        ),
        ("s3:///a.jpg", ["no bucket after 's3://'"]),
        ("s3://AKIAEXAMPLEKEY:SECRETVALUE123@bucket/x.jpg", ["'s3://REDACTED@bucket/x.jpg' carries credentials"]),
    ],
)
def test_malformed_references_are_invalid_input_saying_what_is_wrong(tmp_path, ref, fragments):
    # local roots set, so a mistyped URL is not merely "a local file outside the roots"
    err = expect_error(Fetcher(fast(local_roots=(str(tmp_path),))), ref, "invalid_input", *fragments)
    assert "local_roots" not in err.message and "SECRETVALUE" not in err.message and "pa/ss" not in err.message


def test_a_windows_drive_or_relative_path_is_still_a_local_path(tmp_path):
    fetcher = Fetcher(fast(local_roots=(str(tmp_path),)))
    expect_error(fetcher, "C:/images/a.jpg", "blocked_address", "outside [fetch] local_roots")


def test_not_an_image_never_quotes_the_file(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$saltsalt$hashhashhash:20228:0:99999:7:::\n")
    data = Fetcher(fast(local_roots=(str(tmp_path),))).fetch(str(secret))
    message = decode_error(data)
    assert message == f"not an image: text, {len(data)} bytes (supported: JPEG, PNG, WEBP, GIF, BMP, TIFF)"
    assert decode_error(b"%PDF-1.7\n...").startswith("not an image: a PDF document, 12 bytes")
    assert decode_error(b'{"token": "x"}').startswith("not an image: JSON, 14 bytes")


def test_importing_fetch_and_decode_has_no_side_effects():
    """A fresh interpreter: no Ray, and Pillow's process-wide pixel limit as Pillow set it."""
    code = (
        "import sys, PIL.Image; before = PIL.Image.MAX_IMAGE_PIXELS; "
        "import blipbatch.pipeline.fetch, blipbatch.pipeline.decode, blipbatch.pipeline.guard; "
        "assert 'ray' not in sys.modules, 'ray imported'; "
        "assert PIL.Image.MAX_IMAGE_PIXELS == before, PIL.Image.MAX_IMAGE_PIXELS; "
        "from blipbatch.pipeline import run; assert callable(run)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


class GrownFileSystem(AbstractFileSystem):
    """Opens `grown://` objects whose known size (an object store's, from open) is that of an older, shorter
    version: the object grew after it was listed."""

    protocol = "grown"
    data = b""

    def _open(self, path, mode="rb", **kwargs):
        f = io.BytesIO(self.data)
        f.size = len(self.data) // 2
        return f


def test_an_object_longer_than_its_known_size_is_read_whole_up_to_the_limit():
    fsspec.register_implementation("grown", GrownFileSystem, clobber=True)
    GrownFileSystem.data = PNG + b"\0" * 5000
    assert Fetcher(fast(allowed_schemes=("grown",))).fetch("grown://bucket/a.png") == GrownFileSystem.data
    expect_error(Fetcher(fast(allowed_schemes=("grown",), max_bytes=4000)), "grown://bucket/a.png", "too_large")
