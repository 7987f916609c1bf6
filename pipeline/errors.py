"""The per-row error: what went wrong with one input row, as a kind from a small fixed set and a message.

A RowError never stops a unit; the worker turns it into an output row with `status="error"`, `error_kind=kind`
and `error=message`. The kinds (schemas.rows.ERROR_KINDS):
- fetch_http: an HTTP server answered with an error status, or too many redirects
- fetch_timeout: connect/read timeout or the per-attempt deadline, after retries
- fetch_connection: refused/reset connection, DNS, TLS, storage backend errors, after retries
- too_large: more bytes than the fetch limit, or more pixels than the decode limit
- decode_error: not a supported raster image, or a corrupt/truncated one
- invalid_input: null/empty/malformed reference, unsupported scheme, missing file or object
- blocked_address: refused by the fetch guard: an http(s) host resolving to a non-public address (loopback, private,
  link-local, ...) not in the allow-list, or a local path outside the local roots (pipeline.guard)
- model_error: the model failed on this row
- opted_out: the image's server opts it out of AI use (X-Robots-Tag noai, noimageai, noindex, noimageindex)
- decode_timeout: decoding ran past the row's deadline; its decode process was stopped (pipeline.decode_pool)
- extreme_aspect_ratio, too_many_scans, too_many_strips, metadata_too_large: an image refused from its header
  because decoding it would cost far more than its pixels (pipeline.decode, [decode] settings)
"""

from __future__ import annotations

from blipbatch.errors import BlipbatchError
from blipbatch.schemas.rows import ERROR_KINDS

from .redact import redact

__all__ = ["ERROR_KINDS", "RowError", "format_size"]


class RowError(BlipbatchError):
    """A failure confined to one row. `kind` is one of ERROR_KINDS; `message` says what and why, with any
    credential in it (a presigned URL's signature, a password in a URL) replaced by REDACTED: it goes to outputs."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}; expected one of {', '.join(ERROR_KINDS)}")
        message = redact(message)
        super().__init__(kind, message)  # both in args, so the error pickles (Ray ships it between processes)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def format_size(n: int) -> str:
    """A byte count for a message: "12.3 MiB", "4.0 KiB", "17 bytes"."""
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} bytes"
