"""The job manifest (`_manifest.json`): the settings an output was made with, as one versioned record.

Version 1 (written before the manifest was versioned) recorded input, model, instructions, mapping, generation and
rows_per_unit; version 2 adds everything else that shapes the output or how its images are fetched and decoded:
dtype, device, fetch, decode and run (batch size, decode slots, workers, attempts, error rate). A version 1 file
reads as a version 2 record whose added settings are None: unknown, so never a reason to refuse a resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

MANIFEST_VERSION = 2


@dataclass(frozen=True)
class JobSettings:
    """The recorded job (secrets redacted); nested parts are the fields of pipeline's FetchConfig, DecodeConfig and
    RunConfig (this package does not depend on pipeline), plain JSON values throughout."""

    input: str | list[str]
    model: str
    instructions: list[str] | dict[str, str] | None
    mapping: dict[str, Any]  # schemas.ColumnMapping's fields
    generation: dict[str, Any]
    rows_per_unit: int
    dtype: str | None = None
    quantize: str | None = None  # "fp8" or None: changes the outputs, so it must match on resume
    device: str | None = None
    fetch: dict[str, Any] | None = None
    decode: dict[str, Any] | None = None
    run: dict[str, Any] | None = None
    # closed-set questions: question_id -> {"candidates": [...], "scoring": "sum" | "mean"}; None: none (and in
    # manifests written before they existed)
    closed_sets: dict[str, dict[str, Any]] | None = None
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> JobSettings:
        """Read any version; a version 1 record lacks `version` and the version 2 settings."""
        if not isinstance(data, dict):
            raise ValueError(f"manifest settings must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names[:6] if n not in data]
        if missing:
            raise ValueError(f"manifest settings lack {', '.join(missing)}")
        values = {n: data[n] for n in names if n in data}
        values.setdefault("version", 1)
        return cls(**values)
