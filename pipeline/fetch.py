"""Fetch image bytes from a row's image reference: http(s), object stores and local files, data: URIs, raw bytes.

References and how they are fetched:
- `http://`, `https://`: urllib3, one connection pool per Fetcher, a connect and a read timeout per request,
  redirects followed by hand (at most `max_redirects`), the body streamed under `max_bytes`.
  Every connection, redirect hops included, goes through the address guard (pipeline.guard): the host is resolved,
  every address checked, and the socket opened to a checked address; `allow_hosts` admits trusted hosts/networks.
- `file://` and plain local paths: only regular files inside `local_roots` (symlinks and ".." resolved first;
  FIFOs, devices and sockets refused before opening; opened without following links, pipeline.guard.LocalRoots);
  none by default. Resolving and opening run under the attempt's deadline, as the read does.
- `s3://`, `gs://`, and any other scheme listed in `allowed_schemes`: fsspec, allowed by scheme alone, with the
  worker's own credentials for the store.
- `data:` URIs, base64 or percent-encoded.
- raw bytes (a binary column, as img2dataset writes): returned as they are.

Deadlines: every attempt (http(s) connect, headers and body, a local file, an object-store read) runs under
`attempt_deadline_s` and what is left of `row_deadline_s`, enforced from outside the blocking call (pipeline.deadline):
a server that drips its header block, a stalled store or a slow disk ends the row on time.

Messages quote the reference with its credentials redacted (pipeline.redact), and each secret the reference carries is
removed from the final message, whatever a backend's own text quoted.

Error kinds (RowError.kind) and when they are raised:
- `blocked_address`: an http(s) host that resolves to a loopback, private, link-local, multicast, reserved or
  unspecified address (see pipeline.guard), not admitted by `allow_hosts`, on the first request or on a redirect;
  a local path or file:// URL outside `local_roots` (or any, when there are none). Never retried. Checked before
  existence, so a refused path does not tell whether the file exists.
- `invalid_input`: null, empty or whitespace reference; a scheme not in `allowed_schemes`; a malformed reference
  ("htp:/x": a scheme without "//", a URL without a host, a bucket URL without a bucket or with credentials in it) or
  data: URI; a host name with an empty label or one over 63 characters ("www..example.com"); a local path with a NUL
  byte; a file or object that does not exist, is a directory, FIFO or device, or may not be read; a scheme whose
  fsspec backend is missing. Never retried: the reference itself is wrong.
- Any other exception a reference makes a library raise is still that row's error, never its unit's: `invalid_input`
  for ValueError/TypeError (parsing), `fetch_connection` otherwise.
- `fetch_http`: an HTTP error status. 429 and 5xx are retried, then reported with the number of attempts; other 4xx
  are reported at once. Also: more redirects than allowed, a redirect without a Location or to a non-HTTP scheme.
- `fetch_timeout`: connect or read timeout, or the attempt ran past `attempt_deadline_s` (or the row's deadline);
  retried while the row deadline allows.
- `fetch_connection`: refused or reset connections, DNS failures, broken responses, storage backend errors; retried.
  TLS errors are reported at once (a bad certificate does not heal on retry).
- `opted_out`: an http(s) response whose X-Robots-Tag says noai, noimageai, noindex or noimageindex, for every agent
  or for ours ("blipbatch: noai"; another agent's directives do not apply), while `honour_opt_out` (the default); the
  body is not downloaded. Never retried. Every request says who we are: `user_agent`, blipbatch/VERSION by default.
- `too_large`: more than `max_bytes` (from Content-Length before reading, or counted while streaming); never retried.

Retries: `retries` extra attempts with exponential backoff and full jitter (uniform in [0, backoff_s * 2**n], capped at
`max_backoff_s`); an HTTP `Retry-After` (seconds or a date) replaces the jittered delay, capped the same way.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import email.utils
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import fsspec
import urllib3
import urllib3.exceptions
from fsspec.implementations.local import LocalFileSystem

from blipbatch import __version__

from . import deadline
from .errors import RowError, format_size
from .guard import AddressGuard, AllowList, LocalPath, LocalRoots, guarded_pool_manager
from .read_gate import ReadGate
from .redact import redact, redact_log_records, scrub, secrets_of, userinfo

_HTTP_SCHEMES = ("http", "https")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# "name:" at the start without "//" after it: a mistyped URL, not a path (one letter, "C:", is a Windows drive).
_SCHEME_WITHOUT_SLASHES = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):(?!//)")
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
# An error body this small is read off so the connection can be reused; a larger one closes the connection.
_DRAIN_LIMIT = 64 * 1024
# The product token alone: the project has no public page to point to, and the contact a site operator needs is the
# crawl's owner's, which only `[fetch] user_agent` can give.
DEFAULT_USER_AGENT = f"blipbatch/{__version__}"
# X-Robots-Tag directives that opt an image out of our use (those img2dataset honours), and the user-agent token
# a site addresses us by: "blipbatch: noai" applies, "otherbot: noai" does not.
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
USER_AGENT_TOKEN = "blipbatch"


@dataclass(frozen=True)
class FetchConfig:
    timeout_s: float = 10.0  # per request: connect, and each read
    max_bytes: int = 32 * 2**20
    max_redirects: int = 5
    retries: int = 3  # extra attempts for transient errors
    backoff_s: float = 0.5  # base of exponential backoff with full jitter
    max_backoff_s: float = 30.0  # cap on one sleep, Retry-After included
    concurrency: int = 16  # threads per fetch_all
    allowed_schemes: tuple[str, ...] = ("http", "https", "s3", "gs", "file", "data")  # "file" also = local paths
    # Whole attempt (connect, headers, body): the read timeout alone lets a server that drips bytes hold a thread.
    attempt_deadline_s: float = 60.0
    # The whole row, every attempt and backoff included: no retry starts (or waits) past it.
    row_deadline_s: float = 180.0
    # http(s) hosts trusted although they resolve to non-public addresses: host names, IP addresses, CIDR networks,
    # e.g. ("images.internal", "10.0.0.0/8"). Empty: only public addresses are fetched from.
    allow_hosts: tuple[str, ...] = ()
    # Absolute folders that local paths and file:// URLs may point into. Empty: no local files are read at all, so a
    # table cannot make a worker read its own disk (credentials, keys) by listing paths.
    local_roots: tuple[str, ...] = ()
    # Reads left blocked past their deadline (a hung network mount), each holding a thread, at most this many per
    # worker process: past it, new attempts are refused at once (fetch_timeout) until some return.
    max_abandoned_reads: int = 64
    # An http(s) image whose X-Robots-Tag opts out (OPT_OUT_DIRECTIVES, for all agents or for ours) is an
    # `opted_out` row, not fetched; False: fetched all the same.
    honour_opt_out: bool = True
    user_agent: str = DEFAULT_USER_AGENT  # the User-Agent header of every http(s) request

    def __post_init__(self) -> None:
        for name in ("allowed_schemes", "allow_hosts", "local_roots"):
            value = getattr(self, name)
            if isinstance(value, str):  # a lone string would be read as a tuple of characters
                raise ValueError(f"FetchConfig.{name} must be a tuple of strings, got the string {value!r}")
            object.__setattr__(self, name, tuple(value))  # a list from a caller: keep the config hashable
        positive = {
            "timeout_s": self.timeout_s,
            "max_bytes": self.max_bytes,
            "concurrency": self.concurrency,
            "max_abandoned_reads": self.max_abandoned_reads,
            "attempt_deadline_s": self.attempt_deadline_s,
            "row_deadline_s": self.row_deadline_s,
        }
        non_negative = {
            "max_redirects": self.max_redirects,
            "retries": self.retries,
            "backoff_s": self.backoff_s,
            "max_backoff_s": self.max_backoff_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"FetchConfig.{name} must be > 0, got {value!r}")
        for name, value in non_negative.items():
            if not value >= 0:
                raise ValueError(f"FetchConfig.{name} must be >= 0, got {value!r}")
        if not isinstance(self.user_agent, str) or not self.user_agent.strip():
            raise ValueError(f"FetchConfig.user_agent must be a non-empty string, got {self.user_agent!r}")
        if not self.allowed_schemes:
            raise ValueError("FetchConfig.allowed_schemes is empty: no image reference could be fetched")
        try:
            AllowList.parse(self.allow_hosts)
        except ValueError as e:
            raise ValueError(f"FetchConfig.allow_hosts: {e}") from None
        for root in self.local_roots:
            if not isinstance(root, str) or not os.path.isabs(root):
                raise ValueError(
                    f"FetchConfig.local_roots: {root!r} is not an absolute path (roots are folders on "
                    "the workers, so a relative one would depend on their working directory)"
                )


class _RetryableError(RowError):
    """A transient failure of one attempt; `retry_after` is the server's Retry-After in seconds, if it sent one;
    `cut_short`: the attempt was ended by the row's deadline, before its own."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None, cut_short: bool = False) -> None:
        super().__init__(kind, message)
        self.retry_after = retry_after
        self.cut_short = cut_short


def _show(ref: str, limit: int = 200) -> str:
    """`ref` as a message quotes it: credentials redacted first (so no cut can leave half a secret), then cut to
    `limit` characters (data: URIs can be megabytes long)."""
    ref = redact(ref)
    return ref if len(ref) <= limit else ref[:limit] + "..."


def _did_you_mean(scheme: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(scheme.lower(), allowed, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unparseable: fall back to our own backoff
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _scheme(ref: str) -> str:
    """The lower-cased scheme, "data" for data: URIs, "file" for plain local paths."""
    if ref[:5].lower() == "data:":  # first: the payload of a data: URI may itself contain "://"
        return "data"
    match = _SCHEME_RE.match(ref)
    return match.group(1).lower() if match else "file"


def _check_http_url(url: str) -> None:
    """RowError("invalid_input") saying what is wrong with an http(s) URL that names no usable host."""
    shown = _show(url)
    try:
        parts = urlsplit(url)
        host, _port = parts.hostname, parts.port  # .port raises ValueError when it is no number
    except ValueError:  # its text may quote part of a password written with a raw '/': not repeated
        raise RowError(
            "invalid_input",
            f"malformed URL {shown!r}: the host or port cannot be read (a '/', '?', "
            "'#' or '@' in a user name or password must be percent-encoded)",
        ) from None
    if not host:
        raise RowError("invalid_input", f"malformed URL {shown!r}: no host after '//'")
    if any(ch.isspace() for ch in parts.netloc):
        raise RowError("invalid_input", f"malformed URL {shown!r}: the host contains white space")


def _unexpected(err: Exception, ref: str) -> RowError:
    """The row's error for an exception no check foresaw: one raised while parsing the reference (ValueError,
    UnicodeError, TypeError) says the reference is malformed; anything else is a failed fetch."""
    kind = "invalid_input" if isinstance(err, (ValueError, TypeError)) else "fetch_connection"
    what = "malformed image reference" if kind == "invalid_input" else "error fetching"
    return RowError(kind, f"{what} {_show(ref)!r}: {type(err).__name__}: {err}")


def _bucket(url: str) -> str:
    try:
        return urlsplit(url).netloc
    except ValueError:
        return ""


def opt_out(headers: urllib3.HTTPHeaderDict) -> str | None:
    """The X-Robots-Tag value that opts a response out of our use, or None. A value is "directive, ..." for every
    agent, or "agent: directive, ..." for one: it applies when the agent is ours (as img2dataset reads them)."""
    for value in headers.getlist("X-Robots-Tag"):
        agent, _, directives = value.partition(":") if ":" in value else ("", "", value)
        if agent.strip() and agent.strip().lower() != USER_AGENT_TOKEN:
            continue
        if any(d.strip().lower() in OPT_OUT_DIRECTIVES for d in directives.split(",")):
            return value.strip()
    return None


class Fetcher:
    """Fetches image references under one FetchConfig. Thread-safe; reuse one per worker (it pools connections).

    `sleep` and `rng` are the clock and the jitter source of the backoff, replaceable in tests."""

    def __init__(
        self, config: FetchConfig, *, sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None
    ) -> None:
        self.config = config
        redact_log_records()  # urllib3, botocore and s3fs log the URLs they fetch (at DEBUG)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()  # random.Random is not documented as thread-safe
        self._roots = LocalRoots(config.local_roots)
        self._local_reads = ReadGate()
        self._pool = guarded_pool_manager(
            AddressGuard(config.allow_hosts),
            num_pools=64,  # hosts whose connections are kept; images come from many hosts
            maxsize=config.concurrency,
            retries=False,  # retries and redirects are ours, so that we count and bound them
            timeout=urllib3.Timeout(connect=config.timeout_s, read=config.timeout_s),
            headers={"User-Agent": config.user_agent},
        )

    def close(self) -> None:
        """Close pooled connections."""
        self._pool.clear()

    def fetch(self, ref: str | bytes | None) -> bytes:
        """The bytes `ref` points at (or `ref` itself when it is bytes). Raises RowError."""
        if isinstance(ref, (bytes, bytearray, memoryview)):
            data = bytes(ref)
            self._check_size(len(data), "image bytes")
            return data
        if ref is None or (isinstance(ref, str) and not ref.strip()):
            raise RowError("invalid_input", "empty image reference")
        if not isinstance(ref, str):
            raise RowError("invalid_input", f"image reference must be a string or bytes, got {type(ref).__name__}")
        ref = ref.strip()
        try:
            try:
                return self._fetch_reference(ref)
            except RowError:
                raise
            except Exception as err:  # noqa: BLE001 - whatever one reference makes a library raise is its row's error
                raise _unexpected(err, ref) from None
        except RowError as err:
            # Messages quote the redacted reference; a backend's own text may still quote a secret of it, decoded
            # or mangled, so each secret the reference carries is removed wherever it appears.
            secrets = secrets_of(ref)
            if any(secret in err.message for secret in secrets):
                raise RowError(err.kind, scrub(err.message, secrets)) from None
            raise

    def _fetch_reference(self, ref: str) -> bytes:
        scheme = self._checked_scheme(ref)
        if scheme == "data":
            return self._data_uri(ref)
        if scheme in _HTTP_SCHEMES:
            _check_http_url(ref)
            return self._with_retries(ref, lambda: self._http_attempt(ref))
        target = self._storage_target(ref, scheme)
        if isinstance(target, LocalPath):
            # Resolved and opened inside the attempt: on a hung mount even realpath() and stat() block.
            return self._with_retries(
                ref, lambda: self._storage_attempt(ref, lambda: self._roots.open(target)), self._local_reads
            )
        return self._with_retries(ref, lambda: self._storage_attempt(ref, lambda: fsspec.open(target, "rb").open()))

    def _checked_scheme(self, ref: str) -> str:
        """The reference's scheme, when it is well formed and allowed; RowError("invalid_input") saying what is
        wrong otherwise."""
        allowed = self.config.allowed_schemes
        scheme = _scheme(ref)
        if scheme == "file" and (mistyped := _SCHEME_WITHOUT_SLASHES.match(ref)):
            name = mistyped.group(1)
            raise RowError(
                "invalid_input",
                f"malformed image reference {_show(ref)!r}: it starts with {name + ':'!r} "
                f"but a URL needs '://' after its scheme{_did_you_mean(name, allowed)} "
                "(a local path has no scheme)",
            )
        if scheme not in allowed:
            what = f"scheme {scheme!r}" if _SCHEME_RE.match(ref) else "local paths"
            raise RowError(
                "invalid_input",
                f"{what} not allowed in image reference {_show(ref)!r} "
                f"(allowed schemes: {', '.join(allowed)}){_did_you_mean(scheme, allowed)}",
            )
        return scheme

    def fetch_all(self, refs: Sequence[str | bytes | None]) -> list[bytes | RowError]:
        """fetch() over `refs` on up to `concurrency` threads; results (bytes or the RowError) in the order of refs."""
        if not refs:
            return []
        with ThreadPoolExecutor(
            max_workers=min(self.config.concurrency, len(refs)), thread_name_prefix="fetch"
        ) as pool:
            return list(pool.map(self._fetch_or_error, refs))

    def _fetch_or_error(self, ref: str | bytes | None) -> bytes | RowError:
        try:
            return self.fetch(ref)
        except RowError as err:
            return err

    def _check_size(self, n: int, what: str) -> None:
        if n > self.config.max_bytes:
            raise RowError(
                "too_large", f"{what} is {format_size(n)}, above the {format_size(self.config.max_bytes)} limit"
            )

    # -- retries ---------------------------------------------------------------------------------------------------

    def _with_retries(self, ref: str, attempt: Callable[[], bytes], gate: ReadGate | None = None) -> bytes:
        """attempt() under its deadlines, retried on transient errors; each attempt waits for a place in `gate`."""
        row_deadline = time.monotonic() + self.config.row_deadline_s
        n = 0
        cause: _RetryableError | None = None
        while True:
            try:
                with gate.place() if gate is not None else nullcontext():
                    return self._bounded(ref, attempt, row_deadline)
            except _RetryableError as err:
                if err.cut_short and cause is not None:
                    err = cause  # the row's time ran out in a retry: what made it retry is the row's error
                cause = err
                delay = self._delay(n, err.retry_after)
                past_deadline = time.monotonic() + delay >= row_deadline
                if n == self.config.retries or past_deadline:
                    noun = "attempt" if n == 0 else "attempts"
                    why = f", row deadline of {self.config.row_deadline_s:g}s" if past_deadline else ""
                    raise RowError(err.kind, f"{err.message} (gave up after {n + 1} {noun}{why})") from None
                self._sleep(delay)
                n += 1

    def _bounded(self, ref: str, attempt: Callable[[], bytes], row_deadline: float) -> bytes:
        """One attempt, ended from outside (its sockets and files shut) at the attempt or the row deadline,
        whichever comes first: a blocking read cannot outlast either (pipeline.deadline)."""
        seconds = min(self.config.attempt_deadline_s, row_deadline - time.monotonic())
        cut_short = seconds < self.config.attempt_deadline_s
        which = "what was left of row_deadline_s" if cut_short else "attempt_deadline_s"

        def timeout() -> _RetryableError:
            return _RetryableError(
                "fetch_timeout", f"{_show(ref)} took longer than {seconds:.3g} s ({which})", cut_short=cut_short
            )

        return deadline.run_within(seconds, attempt, timeout, self.config.max_abandoned_reads)

    def _delay(self, n: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.config.max_backoff_s)
        with self._rng_lock:
            return self._rng.uniform(0.0, min(self.config.max_backoff_s, self.config.backoff_s * 2**n))

    # -- http ------------------------------------------------------------------------------------------------------

    def _http_attempt(self, url: str) -> bytes:
        current = url
        for _ in range(self.config.max_redirects + 1):
            response = self._request(current)
            try:
                if 200 <= response.status < 300:
                    if self.config.honour_opt_out and (directive := opt_out(response.headers)) is not None:
                        response.close()  # not downloaded at all
                        raise RowError(
                            "opted_out",
                            f"{_show(current)} opts out of AI use (X-Robots-Tag: "
                            f"{directive}); [fetch] honour_opt_out = false fetches it",
                        )
                    return self._read_body(response, current)
                self._discard(response)  # before raising, so no unread body goes back to the pool
                if response.status in _REDIRECT_STATUSES:
                    current = self._redirect_target(current, response)
                    continue
                if response.status == 429 or response.status >= 500:
                    raise _RetryableError(
                        "fetch_http",
                        f"HTTP {response.status} from {_show(current)}",
                        _parse_retry_after(response.headers.get("Retry-After")),
                    )
                raise RowError("fetch_http", f"HTTP {response.status} from {_show(current)}")
            finally:
                response.release_conn()
        raise RowError("fetch_http", f"more than {self.config.max_redirects} redirects starting at {_show(url)}")

    def _request(self, url: str) -> urllib3.BaseHTTPResponse:
        try:
            return self._pool.request("GET", url, preload_content=False, redirect=False)
        except urllib3.exceptions.HTTPError as err:
            raise self._http_error(err, url) from None

    def _redirect_target(self, url: str, response: urllib3.BaseHTTPResponse) -> str:
        location = response.headers.get("Location")
        if not location:
            raise RowError("fetch_http", f"HTTP {response.status} redirect without a Location header from {_show(url)}")
        target = urljoin(url, location)
        scheme = urlsplit(target).scheme.lower()
        if scheme not in _HTTP_SCHEMES:
            raise RowError("fetch_http", f"redirect from {_show(url)} to a non-HTTP URL {_show(target)!r}")
        if scheme not in self.config.allowed_schemes:
            raise RowError(
                "fetch_http", f"redirect from {_show(url)} to {_show(target)!r}: scheme {scheme!r} not allowed"
            )
        return target

    def _read_body(self, response: urllib3.BaseHTTPResponse, url: str) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self.config.max_bytes:
            response.close()  # do not download what we will refuse
            raise RowError(
                "too_large",
                f"{_show(url)} declares {format_size(int(declared))} (Content-Length), above "
                f"the {format_size(self.config.max_bytes)} limit",
            )
        chunks: list[bytes] = []
        total = 0
        try:
            while chunk := response.read1(_CHUNK):  # read1: what has arrived, so the byte limit holds as it streams
                total += len(chunk)
                if total > self.config.max_bytes:
                    response.close()
                    raise RowError(
                        "too_large", f"{_show(url)} sent more than the {format_size(self.config.max_bytes)} limit"
                    )
                chunks.append(chunk)
        except urllib3.exceptions.HTTPError as err:
            raise self._http_error(err, url) from None
        return b"".join(chunks)

    @staticmethod
    def _discard(response: urllib3.BaseHTTPResponse) -> None:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) <= _DRAIN_LIMIT:
            try:
                response.drain_conn()
                return
            except urllib3.exceptions.HTTPError:
                pass  # a broken error body: the connection is closed below instead
        response.close()

    def _http_error(self, err: urllib3.exceptions.HTTPError, url: str) -> RowError:
        # Order matters: NewConnectionError (refused, DNS) subclasses ConnectTimeoutError in urllib3 2.
        detail, shown = f"{type(err).__name__}: {err}", _show(url)
        if isinstance(err, urllib3.exceptions.LocationValueError):
            return RowError("invalid_input", f"malformed URL {shown!r}: {err}")
        if isinstance(err, urllib3.exceptions.SSLError):
            return RowError("fetch_connection", f"TLS error fetching {shown}: {err}")
        if isinstance(err, urllib3.exceptions.NewConnectionError):
            return _RetryableError("fetch_connection", f"cannot connect for {shown}: {detail}")
        if isinstance(err, urllib3.exceptions.TimeoutError):
            return _RetryableError("fetch_timeout", f"timed out after {self.config.timeout_s} s fetching {shown}")
        return _RetryableError("fetch_connection", f"connection error fetching {shown}: {detail}")

    # -- fsspec ----------------------------------------------------------------------------------------------------

    def _storage_target(self, url: str, protocol: str) -> str | LocalPath:
        """What is opened for `url`: the URL itself (by fsspec), or the local path it names (by LocalRoots.open)."""
        if "::" in url:
            # fsspec would read "a::b" as a chain of filesystems, reaching schemes the allowlist did not approve.
            raise RowError(
                "invalid_input", f"'::' (fsspec URL chaining) is not allowed in image reference {_show(url)!r}"
            )
        try:
            filesystem = fsspec.get_filesystem_class(protocol)
        except ImportError as err:
            raise RowError(
                "invalid_input", f"reading {protocol}:// needs a package that is not installed: {err}"
            ) from None
        except ValueError:
            raise RowError("invalid_input", f"no fsspec filesystem for scheme {protocol!r} in {_show(url)!r}") from None
        if issubclass(filesystem, LocalFileSystem):  # file://, local://, plain paths
            # The path fsspec would open; LocalRoots.open resolves it, checks it and opens it without following a
            # link swapped in after the check, and refuses anything but a regular file.
            return LocalPath(filesystem._strip_protocol(url), url)
        if not _bucket(url):
            raise RowError(
                "invalid_input", f"malformed image reference {_show(url)!r}: no bucket after '{protocol}://'"
            )
        if userinfo(url) is not None:  # also "KEY:pa/ss@bucket", whose bucket would read as "KEY:pa"
            raise RowError(
                "invalid_input",
                f"image reference {_show(url)!r} carries credentials before its bucket: "
                f"{protocol}:// objects are read with the worker's own credentials, so "
                "remove the part up to '@'",
            )
        return url

    def _storage_attempt(self, url: str, opener: Callable[[], BinaryIO]) -> bytes:
        shown = _show(url)
        try:
            with opener() as f:
                deadline.hold(f)  # closed from outside if the attempt's time runs out
                size = getattr(f, "size", None)  # object stores know it from open
                if size is None and f.seekable():
                    size = f.seek(0, os.SEEK_END)
                    f.seek(0)
                if size is not None:
                    self._check_size(size, shown)
                # a buffer of the size known (max_bytes cost more than reading a 100 KB file), one byte past it to
                # see a file that grew since, whose rest is then read up to the limit
                data = f.read(self.config.max_bytes + 1 if size is None else size + 1)
                if size is not None and len(data) > size:
                    data += f.read(self.config.max_bytes + 1 - len(data))
        except RowError:
            raise
        except FileNotFoundError:
            raise RowError("invalid_input", f"no such file or object: {shown}") from None
        except (IsADirectoryError, NotADirectoryError):
            raise RowError("invalid_input", f"not a file: {shown}") from None
        except PermissionError as err:
            raise RowError("invalid_input", f"permission denied reading {shown}: {err.strerror}") from None
        except TimeoutError as err:
            raise _RetryableError("fetch_timeout", f"timed out reading {shown}: {err}") from None
        except Exception as err:  # noqa: BLE001 - each backend (botocore, gcsfs, aiohttp) has its own error types
            raise _RetryableError("fetch_connection", f"error reading {shown}: {type(err).__name__}: {err}") from None
        self._check_size(len(data), shown)
        return data

    # -- data: ------------------------------------------------------------------------------------------------------

    def _data_uri(self, ref: str) -> bytes:
        header, sep, payload = ref[5:].partition(",")
        if not sep:
            raise RowError("invalid_input", f"malformed data: URI (no ',' before the data): {_show(ref, 60)!r}")
        is_base64 = header.lower().endswith(";base64")
        if is_base64:
            try:
                encoded = re.sub(rb"\s+", b"", unquote_to_bytes(payload))  # line breaks are common in the wild
                data = base64.b64decode(encoded + b"=" * (-len(encoded) % 4), validate=True)
            except (binascii.Error, ValueError) as err:
                raise RowError("invalid_input", f"data: URI is not valid base64 ({err}): {_show(ref, 60)!r}") from None
        else:
            data = unquote_to_bytes(payload)
        self._check_size(len(data), "data: URI")
        return data
