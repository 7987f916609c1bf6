"""A fault-injecting HTTP proxy on 127.0.0.1 for tests: put it in front of an S3 endpoint (the moto server) and
point the S3 client at it.

Requests are forwarded to the upstream server as they came (the Host header included, so signatures still
match what the client signed). A share `rate` of the requests whose method is in `methods` (PUT and POST: object
writes, multipart steps, bulk deletes) gets a fault instead, drawn from `kinds` by a random.Random(seed), so a run
makes the same sequence of decisions for the same seed:
- status_500 / status_503: an S3-style error answer (InternalError / SlowDown); nothing reaches the upstream.
- reset: the client's connection is reset (TCP RST) after its request arrived; nothing reaches the upstream.
- cut_body: the upstream gets the headers (with the full Content-Length) and half the body, then end of stream;
  the client's connection is reset. A store must not keep a partial object from this.
- reset_after: the request is forwarded whole and applied, then the client's connection is reset before it
  sees the answer (the write happened, yet the client must assume it failed).
`counts` says what the proxy did: one count per fault kind, `forwarded` for the requests in `methods` passed
through, `other` for the requests of other methods (always passed through).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULT_KINDS = ("status_500", "status_503", "reset", "cut_body", "reset_after")
# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself.
_NOT_FORWARDED = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "expect",
    "content-length",
}
_ERROR_BODIES = {
    500: b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
    b"<Message>We encountered an internal error. Please try again.</Message></Error>",
    503: b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>",
}
_UPSTREAM_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class FaultPlan:
    rate: float = 0.3  # share of the requests in `methods` that get a fault
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    methods: tuple[str, ...] = ("PUT", "POST")
    # A request to one path is faulted at most this many times in a row, so a client that tries one more time than
    # this always gets through: a test then checks what retries do, not the odds of rate ** attempts.
    max_in_a_row: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"FaultPlan.rate must be in [0, 1], got {self.rate!r}")
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"FaultPlan.kinds: {sorted(unknown) or 'empty'}; choose from {FAULT_KINDS}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect; also answers Expect: 100-continue

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _handle(self) -> None:
        proxy: FaultyProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._read_body()
        fault = proxy.draw(self.command, self.path)
        if fault in ("status_500", "status_503"):
            self._answer(int(fault[-3:]), [("Content-Type", "application/xml")], _ERROR_BODIES[int(fault[-3:])])
        elif fault == "reset":
            self._reset()
        elif fault == "cut_body":
            self._forward_half(body)
            self._reset()
        else:
            status, headers, data = self._forward(body)
            if fault == "reset_after":
                self._reset()
            else:
                self._answer(status, headers, data)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _upstream_request(self, declared_length: int) -> http.client.HTTPConnection:
        proxy: FaultyProxy = self.server.proxy  # type: ignore[attr-defined]
        conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=_UPSTREAM_TIMEOUT_S)
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _NOT_FORWARDED:
                conn.putheader(name, value)
        if declared_length or self.command in ("PUT", "POST"):
            conn.putheader("Content-Length", str(declared_length))
        conn.endheaders()
        return conn

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = self._upstream_request(len(body))
        try:
            conn.send(body)
            response = conn.getresponse()
            data = response.read()
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _NOT_FORWARDED]
            if self.command == "HEAD":  # a HEAD answer declares the object's length, with no body
                headers += [(k, v) for k, v in response.getheaders() if k.lower() == "content-length"]
            return response.status, headers, data
        finally:
            conn.close()

    def _forward_half(self, body: bytes) -> None:
        """Send the upstream the full Content-Length but half the body, then end the stream; read its answer so the
        upstream has settled the request before the client retries."""
        conn = self._upstream_request(len(body))
        try:
            conn.send(body[: len(body) // 2])
            conn.sock.shutdown(socket.SHUT_WR)
            try:
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                pass  # the upstream may just drop the connection: either way it has seen the end
        finally:
            conn.close()

    def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout: close() sends RST instead of FIN, as a dropped connection does.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True


class FaultyProxy:
    """Start with `start()` (or as a context manager); `url` is the endpoint to give the client."""

    def __init__(self, upstream: str, plan: FaultPlan = FaultPlan()) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://HOST:PORT, got {upstream!r}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.plan = plan
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(plan.seed)
        self._in_a_row: Counter[str] = Counter()  # path -> faults answered to it since it last went through
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def faults(self) -> int:
        return sum(self.counts[kind] for kind in FAULT_KINDS)

    def set_rate(self, rate: float) -> None:
        """Change the share of faulty requests from now on (0 to pass everything through)."""
        with self._lock:
            self.plan = replace(self.plan, rate=rate)

    def draw(self, method: str, path: str) -> str | None:
        """The fault for the next request with `method` to `path`, or None to forward it; counted either way."""
        with self._lock:
            if method not in self.plan.methods:
                self.counts["other"] += 1
                return None
            fault = self._rng.choice(self.plan.kinds) if self._rng.random() < self.plan.rate else None
            if fault and self._in_a_row[path] >= self.plan.max_in_a_row:
                fault = None
            self._in_a_row[path] = self._in_a_row[path] + 1 if fault else 0
            self.counts[fault or "forwarded"] += 1
            return fault

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
