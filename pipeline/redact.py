"""Remove credentials from text that goes into outputs and logs: error messages, image references, failure reasons.

Image references and the messages about them can carry secrets: presigned S3/GCS URLs (X-Amz-Signature,
X-Amz-Security-Token, X-Goog-Signature), SAS or API tokens in a query (sig=, token=, key=), a password in a URL's
user info (https://user:password@host/), or a header quoted from an HTTP exchange (Authorization: ...). `redact`
replaces each such value with REDACTED and leaves the rest as it was, so a message still says which host and path
failed. It is idempotent: redacting twice gives the same text.
"""

from __future__ import annotations

import re

REDACTED = "REDACTED"

# A URL inside free text: scheme://, then up to whitespace, a quote or an angle bracket.
_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>]+""")
# scheme://USERINFO@ : the user info before the host (a name, a name:password, or a bare token).
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]+@")
# Query (or ;-parameter) names whose values are credentials: a name containing one of these words, or one of the
# short names exactly (Azure SAS `sig`, Google API `key`).
_SECRET_WORD = r"signature|token|secret|password|passwd|credential|api[_-]?key|access[_-]?key"
_SECRET_PARAM = re.compile(rf"([?&;](?:[\w.-]*(?:{_SECRET_WORD})[\w.-]*|sig|key|auth|pwd)=)[^&#;]*", re.IGNORECASE)
# A header or setting quoted in an exception message ("Authorization: ...", "aws_session_token=..."): the value to
# the end of its line. Not inside a URL's query, which _SECRET_PARAM handles.
_SECRET_FIELD = re.compile(
    r"(?<![?&;\w-])(authorization|proxy-authorization|cookie|set-cookie|x-amz-security-token|x-api-key|"
    r"aws_secret_access_key|aws_session_token)(\s*[:=]\s*)[^\r\n]+",
    re.IGNORECASE,
)


def _redact_url(match: re.Match[str]) -> str:
    url = _USERINFO.sub(rf"\g<1>{REDACTED}@", match.group(0))
    return _SECRET_PARAM.sub(rf"\g<1>{REDACTED}", url)


def redact(text: str) -> str:
    """`text` with the credentials in its URLs and quoted headers replaced by REDACTED."""
    if "://" in text:
        text = _URL.sub(_redact_url, text)
    return _SECRET_FIELD.sub(rf"\g<1>\g<2>{REDACTED}", text)
