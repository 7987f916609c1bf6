"""Remove credentials from text that goes into outputs and logs: error messages, image references, failure reasons.

Image references and the messages about them can carry secrets: presigned S3/GCS URLs (X-Amz-Signature,
X-Amz-Security-Token, X-Goog-Signature), SAS or API tokens in a query (sig=, token=, key=, password=), a password in a
URL's user info (https://user:password@host/, also with a raw @ / # ? inside the password), the same
`KEY:SECRET@bucket` quoted without its scheme (as storage backends do in their errors), or a header quoted from an
HTTP exchange (Authorization: ...). `redact` replaces each such value with REDACTED and leaves the rest as it was, so a
message still says which host and path failed. It is idempotent: redacting twice gives the same text. Every rule marks
spans of the same text and their union is replaced, so one rule's match never hides part of a secret from another.
When in doubt it removes more (a path holding both ':' and '@' loses the part before the last '@'), never less.

`redact_log_records` makes every log record of the process pass through `redact` as it is made (its message and
its traceback): the libraries that fetch images (urllib3, botocore, s3fs) log the URLs they request.

`redacted_streams` does the same for what a command prints on stdout and stderr: its errors name the locations it was
given (s3://KEY:SECRET@bucket/..., https://user:password@host/...), and so do the libraries' messages it quotes.

`scrub` also removes the literal secrets of one known reference (`secrets_of`), wherever and however a backend's
message quotes them (decoded, re-encoded).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import TextIO
from urllib.parse import unquote

REDACTED = "REDACTED"

# Every rule below reads one token at a time (a run up to white space, a quote or an angle bracket) and does work
# linear in its length, so a megabyte data: URI or a hostile string costs one pass, not one per position.
_TOKEN = re.compile(r"""[^\s'"<>]+""")
# The start of a URL: scheme://, the scheme starting where no scheme character precedes it.
_SCHEME = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://")
# The start of KEY:SECRET@host without a scheme: a name at a boundary that is not inside an authority or a path.
_BARE_KEY = re.compile(r"(?<![\w.+%~:/@-])[\w.+%~-]+:(?!//)")
_HOST_START = re.compile(r"[\w\[]")
_VALUE_END = re.compile(r"[&;#]")  # a parameter value ends there (or at the token's end)
_PATH_START = re.compile(r"[/?#]")
# A parameter name marks a credential when it holds one of these stems anywhere, in any case (sessionid, jsessionid,
# passcode, userpass, pwdhash, authcode, oauth, Authorization, mykey, keyid, apiKey, sigv4, xsig, X-Amz-Signature,
# jwt, bearer, hmac, hdnts), or when one of its parts (split at - _ .) is one of the short words, which as stems would
# hit ordinary names (otp in "footprint"). A stem also hits a few harmless names (design=, monkey=): their values are
# removed too, the safe side.
_SECRET_STEMS = (
    "pass",
    "pwd",
    "token",
    "secret",
    "sig",
    "key",
    "auth",
    "session",
    "cred",
    "jwt",
    "bearer",
    "hmac",
    "hdnts",
)
_SECRET_PARTS = frozenset({"pw", "sas", "otp", "pin", "sid"})
# A header or setting quoted in an exception message ("Authorization: ...", "aws_session_token=..."): the value to
# the end of its line.
_FIELD_NAMES = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-amz-security-token",
    "x-api-key",
    "aws_secret_access_key",
    "aws_session_token",
)
_SECRET_FIELD = re.compile(
    rf"(?<![?&;\w-])({'|'.join(map(re.escape, _FIELD_NAMES))})(\s*[:=]\s*)([^\r\n]+)", re.IGNORECASE
)


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(stem in lowered for stem in _SECRET_STEMS) or not set(re.split(r"[-_.]", lowered)).isdisjoint(
        _SECRET_PARTS
    )


def _is_name_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_.-"


def _userinfo_spans(token: str) -> list[tuple[int, int]]:
    """The user info of a URL in `token`: from after "scheme://" up to the token's last '@'. When the text before
    that '@' holds '/', '?' or '#', it is still user info if its first part has a ':' (user:pa/ss@host, a raw '/'
    in a password); otherwise the '@' is in the path (/img@2x.png). One span: the leftmost URL's, which reaches the
    last '@' and so covers any later one."""
    at = token.rfind("@")
    if at < 0 or "://" not in token:
        return []
    for match in _SCHEME.finditer(token, 0, at):
        start = match.end()
        first = _PATH_START.search(token, start, at)  # stops at the next URL's "://" at the latest
        if first is None or ":" in token[start : first.start()]:
            return [(start, at)]
    return []


def _bare_userinfo_spans(token: str) -> list[tuple[int, int]]:
    """KEY:SECRET@host without a scheme (as botocore quotes a bucket name): from the key to the last '@'."""
    at = token.rfind("@")
    if at < 0 or not _HOST_START.match(token, at + 1):
        return []
    match = _BARE_KEY.search(token, 0, at)
    return [(match.start(), at)] if match else []


def _parameter_spans(token: str) -> list[tuple[int, int]]:
    """The values of secret-like name=value parameters in `token` (a query, ;-parameters, free text)."""
    spans = []
    equals = token.find("=")
    while equals >= 0:
        name_start = equals
        while name_start > 0 and _is_name_char(token[name_start - 1]):
            name_start -= 1
        value_end = equals + 1
        if name_start < equals and _is_secret_name(token[name_start:equals]):
            end = _VALUE_END.search(token, equals + 1)
            value_end = end.start() if end else len(token)
            if value_end > equals + 1:
                spans.append((equals + 1, value_end))
        equals = token.find("=", value_end)  # an '=' inside a value is part of it
    return spans


def _secret_spans(text: str) -> list[tuple[int, int]]:
    """Where the secrets in `text` lie, by every rule at once, overlapping spans merged. All rules read the same
    text, so what one of them misreads (a '?' inside a password, an '@' inside a token) another still covers."""
    spans = []
    for token in _TOKEN.finditer(text):
        value, offset = token.group(), token.start()
        for rule in (_userinfo_spans, _bare_userinfo_spans, _parameter_spans):
            spans += [(offset + start, offset + stop) for start, stop in rule(value)]
    lowered = text.lower()
    if any(name in lowered for name in _FIELD_NAMES):
        spans += [(m.start(3), m.end(3)) for m in _SECRET_FIELD.finditer(text)]
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
        else:
            merged.append((start, stop))
    return merged


def redact(text: str) -> str:
    """`text` with the credentials in its URLs, parameters and quoted headers replaced by REDACTED."""
    pieces, last = [], 0
    for start, stop in _secret_spans(text):
        pieces += [text[last:start], REDACTED]
        last = stop
    return "".join(pieces) + text[last:]


def userinfo(url: str) -> str | None:
    """The user info of the URL `url` (what redact removes before its host), or None when it has none."""
    token = _TOKEN.match(url)
    spans = _userinfo_spans(token.group()) if token and _SCHEME.match(url) else []
    return url[spans[0][0] : spans[0][1]] if spans else None


def secrets_of(reference: str) -> tuple[str, ...]:
    """The secret strings inside one image reference: its user info and the values of secret-like parameters, each
    as written and percent-decoded."""
    found: list[str] = []
    if (info := userinfo(reference)) is not None:
        found += [info, *info.split(":", 1)[1:]]
    for token in _TOKEN.finditer(reference):
        found += [token.group()[start:stop] for start, stop in _parameter_spans(token.group())]
    variants = {text for secret in found for text in (secret, unquote(secret))}
    return tuple(sorted((s for s in variants if len(s) >= 4), key=len, reverse=True))  # 3 chars would hit words


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """redact(text), and each of `secrets` (from secrets_of) replaced wherever it appears."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return redact(text)


_install_lock = threading.Lock()


def _redacting(factory):
    def make_record(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            record.msg, record.args = redact(record.getMessage()), None
        except Exception:  # noqa: BLE001 - a record whose arguments do not format: logging reports it as it would
            return record
        if record.exc_info and not record.exc_text:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    make_record.redacts = True
    return make_record


def redact_log_records() -> None:
    """From now on, every log record of this process is redacted as it is made (records are made only for levels
    that are enabled, so the cost is one redact per emitted line). Idempotent."""
    with _install_lock:
        factory = logging.getLogRecordFactory()
        if not getattr(factory, "redacts", False):
            logging.setLogRecordFactory(_redacting(factory))


class RedactingStream(io.TextIOBase):
    """A text stream that writes everything through `redact` to the stream it wraps. A secret split across two writes
    would pass; print() and the traceback module write each message and each traceback line whole."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact(text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]  # typeshed: a TextIOBase attribute; CPython: read-only
        return getattr(self.stream, "encoding", "utf-8")


@contextlib.contextmanager
def redacted_streams() -> Iterator[None]:
    """While open, what this process prints on sys.stdout and sys.stderr passes through `redact`."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(saved[0]), RedactingStream(saved[1])
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
