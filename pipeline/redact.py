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

`scrub` also removes the literal secrets of one known reference (`secrets_of`), wherever and however a backend's
message quotes them (decoded, re-encoded).
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from urllib.parse import unquote

REDACTED = "REDACTED"

# A URL inside free text: scheme://, then up to whitespace, a quote or an angle bracket.
_URL = re.compile(r"""([A-Za-z][A-Za-z0-9+.-]*://)([^\s'"<>]+)""")
# KEY:SECRET@host without a scheme, starting at a word boundary that is not inside a URL's authority or path.
_BARE_USERINFO = re.compile(r"""(?<![\w.+%~:/@-])[\w.+%~-]+:(?!//)[^\s'"<>]*@(?=[\w\[])""")
# name=value, in a query, a ;-parameter list or free text; _is_secret_name decides whether the value goes.
_PARAM = re.compile(r"""(?<![\w.-])([\w.-]+)(=)([^&\s'"<>;#]*)""")
# Name parts (split at - _ .) that mark a credential, and words that do so anywhere in a name (apiKey, accessToken).
_SECRET_PARTS = frozenset({"pass", "password", "passwd", "passphrase", "pwd", "pw", "token", "secret", "signature",
                           "sig", "credential", "credentials", "key", "auth", "session", "sas"})
_SECRET_WORDS = ("password", "passwd", "token", "secret", "signature", "credential", "apikey", "accesskey",
                 "privatekey", "sessionkey")
# A header or setting quoted in an exception message ("Authorization: ...", "aws_session_token=..."): the value to
# the end of its line.
_SECRET_FIELD = re.compile(
    r"(?<![?&;\w-])(authorization|proxy-authorization|cookie|set-cookie|x-amz-security-token|x-api-key|"
    r"aws_secret_access_key|aws_session_token)(\s*[:=]\s*)([^\r\n]+)",
    re.IGNORECASE,
)


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return (not set(re.split(r"[-_.]", lowered)).isdisjoint(_SECRET_PARTS)
            or any(word in lowered for word in _SECRET_WORDS))


def _userinfo_end(rest: str) -> int:
    """Where the user info of the URL `scheme://rest` ends (the index of its '@'), or -1 when it has none.

    Up to the last '@': a password may hold a raw '@'. When the text before it holds '/', '?' or '#', it is still
    user info if its first part has a ':' (user:pa/ss@host); otherwise the '@' is in the path (/img@2x.png)."""
    at = rest.rfind("@")
    if at < 0:
        return -1
    before = rest[:at]
    first = re.split(r"[/?#]", before, maxsplit=1)[0]
    return at if first == before or ":" in first else -1


def _secret_spans(text: str) -> list[tuple[int, int]]:
    """Where the secrets in `text` lie, by every rule at once (user info of each URL, bare KEY:SECRET@, secret-like
    parameter values, quoted headers), overlapping spans merged. All rules read the same text, so what one of them
    misreads (a '?' inside a password, an '@' inside a token) another still covers."""
    spans = [(m.start(3), m.end(3)) for m in _PARAM.finditer(text) if m.group(3) and _is_secret_name(m.group(1))]
    spans += [(m.start(3), m.end(3)) for m in _SECRET_FIELD.finditer(text)]
    spans += [(m.start(), m.end() - 1) for m in _BARE_USERINFO.finditer(text)]  # up to the '@'
    for m in _URL.finditer(text):
        if (end := _userinfo_end(m.group(2))) >= 0:
            spans.append((m.start(2), m.start(2) + end))
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
        else:
            merged.append((start, stop))
    return merged


def redact(text: str) -> str:
    """`text` with the credentials in its URLs, parameters and quoted headers replaced by REDACTED."""
    for start, stop in reversed(_secret_spans(text)):
        text = f"{text[:start]}{REDACTED}{text[stop:]}"
    return text


def userinfo(url: str) -> str | None:
    """The user info of `url` (what redact removes before its host), or None when it has none."""
    match = _URL.match(url)
    if match is None or (end := _userinfo_end(match.group(2))) < 0:
        return None
    return match.group(2)[:end]


def secrets_of(reference: str) -> tuple[str, ...]:
    """The secret strings inside one image reference: its user info and the values of secret-like parameters, each
    as written and percent-decoded."""
    found: list[str] = []
    if (info := userinfo(reference)) is not None:
        found += [info, *info.split(":", 1)[1:]]
    found += [m.group(3) for m in _PARAM.finditer(reference) if m.group(3) and _is_secret_name(m.group(1))]
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
