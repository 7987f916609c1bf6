"""Row contracts: the input column mapping and its check, the output schema, the per-unit progress record."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields

import pyarrow as pa

from blipbatch.errors import BlipbatchError

# error_kind values of an output row; anything else is a bug in the pipeline.
ERROR_KINDS = (
    "fetch_http",
    "fetch_timeout",
    "fetch_connection",
    "too_large",
    "decode_error",
    "invalid_input",
    "blocked_address",
    "model_error",
    "opted_out",
    "decode_timeout",
    "extreme_aspect_ratio",
    "too_many_scans",
    "too_many_strips",
    "metadata_too_large",
)
STATUS_OK = "ok"
STATUS_ERROR = "error"

# Output columns that every job writes; passthrough columns may not reuse these names.
OUTPUT_COLUMNS = (
    "id",
    "image_sha256",
    "instruction",
    "question_id",
    "text",
    "score",
    "candidate_logprobs",
    "status",
    "error_kind",
    "error",
    "model",
    "generation",
    "derived_id",
)


class SchemaError(BlipbatchError, ValueError):
    """An input shard whose columns do not fit the job's column mapping."""

    def __init__(self, shard: str, problems: list[str]):
        self.shard = shard
        self.problems = problems
        super().__init__(f"{shard}: " + "; ".join(problems))


@dataclass(frozen=True)
class ColumnMapping:
    """Which input columns hold what; names are set by the job."""

    image_column: str = "image_url"  # string (URL / path / data: URI) or binary (raw bytes) column
    id_column: str | None = None  # None -> id derived from the shard's content + row index (derive_row_id)
    instruction_column: str | None = None  # None -> the job's fixed prompt(s)
    passthrough: tuple[str, ...] = ()  # input columns copied to the output unchanged
    missing: str = "error"  # a prompt template's column null or empty: "error" (an invalid_input row) or "empty"
    format: str | None = None  # "parquet" or "webdataset"; None: by each shard's name (.tar: WebDataset)
    image_extension: str | None = None  # WebDataset: the member extension holding the image; None: jpg/jpeg/png/webp

    def input_columns(self) -> list[str]:
        """The columns to read from a shard, each once, in a fixed order."""
        names = [self.image_column, self.id_column, self.instruction_column, *self.passthrough]
        return list(dict.fromkeys(n for n in names if n is not None))


def _value_type(t: pa.DataType) -> pa.DataType:
    # A dictionary-encoded column (pandas categoricals) reads back as its values.
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_string(t: pa.DataType) -> bool:
    t = _value_type(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binary(t: pa.DataType) -> bool:
    t = _value_type(t)
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t)
    )


def _accepts(check: Callable[[pa.DataType], bool]) -> Callable[[pa.DataType], bool]:
    # A column of only nulls is stored with type null (pandas/pyarrow infer it): its rows become error rows.
    return lambda t: pa.types.is_null(t) or check(t)


def is_binary_image(schema: pa.Schema, mapping: ColumnMapping) -> bool:
    """True when the image column holds raw bytes rather than references."""
    return _is_binary(schema.field(mapping.image_column).type)


def check_input_schema(shard: str, schema: pa.Schema, mapping: ColumnMapping) -> None:
    """Raise SchemaError listing every column of `shard` that is missing or of the wrong type."""
    problems = []
    # (column, the type it should have, whether a type is that), passthrough columns of any type
    expectations: list[tuple[str | None, str | None, Callable[[pa.DataType], bool] | None]] = [
        (
            mapping.image_column,
            "string (image reference) or binary (image bytes)",
            _accepts(lambda t: _is_string(t) or _is_binary(t)),
        ),
        (mapping.id_column, "string or integer (row id)", _accepts(lambda t: _is_string(t) or pa.types.is_integer(t))),
        (mapping.instruction_column, "string (instruction)", _accepts(_is_string)),
    ]
    expectations += [(name, None, None) for name in mapping.passthrough]
    missing = []
    for name, expected, accepts in expectations:
        if name is None:
            continue
        index = schema.get_field_index(name)
        if index < 0:
            missing.append(name)
        elif accepts is not None and not accepts(schema.field(index).type):
            problems.append(f"column {name!r} should be {expected}, found {schema.field(index).type}")
    if missing:
        found = ", ".join(schema.names) or "(none)"
        problems.insert(0, f"missing column(s) {', '.join(map(repr, missing))}; the shard has columns: {found}")
    if problems:
        raise SchemaError(shard, problems)


def output_schema(
    input_schema: pa.Schema,
    mapping: ColumnMapping,
    multiple_texts: bool = False,
    question_ids: bool = False,
    closed_sets: bool = False,
) -> pa.Schema:
    """The schema of every output part of a job; `candidate_logprobs` only in jobs with closed-set questions, so the
    outputs of other jobs (and those written before it existed) keep the schema they had.

    The image column keeps its input name and is always a string: the reference itself (credentials redacted), or
    for a binary image column a short note such as "<1234 bytes>" (see image_reference); image bytes are never
    copied to the output.
    """
    reserved = set(OUTPUT_COLUMNS) | {mapping.image_column}
    problems = [
        f"passthrough column {name!r} would clash with the output column of that name"
        for name in mapping.passthrough
        if name in reserved
    ]
    problems += [
        f"passthrough column {name!r} is listed {mapping.passthrough.count(name)} times; list it once"
        for name in dict.fromkeys(mapping.passthrough)
        if mapping.passthrough.count(name) > 1
    ]
    if mapping.image_column in OUTPUT_COLUMNS:
        problems.append(f"image column {mapping.image_column!r} clashes with the output column of that name")
    if problems:
        raise SchemaError("column mapping", problems)
    text_type = pa.list_(pa.string()) if multiple_texts else pa.string()
    score_type = pa.list_(pa.float64()) if multiple_texts else pa.float64()
    base = [
        pa.field("id", pa.string()),
        pa.field(mapping.image_column, pa.string()),
        pa.field("image_sha256", pa.string()),  # hex SHA-256 of the image bytes as fetched or read; null: none had
        pa.field("instruction", pa.string()),
        *([pa.field("question_id", pa.string())] if question_ids else []),  # annotate jobs: the question's name
        pa.field("text", text_type),
        pa.field("score", score_type),  # the text's mean token log-probability (beams: the sequence score)
        # closed-set jobs: each candidate's log-likelihood, in the question's order (null for free questions and
        # errors); there `score` is the chosen candidate's probability among the candidates
        *([pa.field("candidate_logprobs", pa.list_(pa.float64()))] if closed_sets else []),
        pa.field("status", pa.string()),  # STATUS_OK / STATUS_ERROR
        pa.field("error_kind", pa.string()),  # one of ERROR_KINDS, null when ok
        pa.field("error", pa.string()),  # human-readable, null when ok
        pa.field("model", pa.string()),
        pa.field("generation", pa.string()),  # JSON of the generation settings
        # With an id column: the row's derived id (derive_row_id), so a row whose id is null can still be joined back.
        *([pa.field("derived_id", pa.string())] if mapping.id_column is not None else []),
    ]
    return pa.schema(base + [input_schema.field(name) for name in mapping.passthrough])


def image_reference(image: str | bytes | None) -> str | None:
    """The value of the output image column for an input image value."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes>"
    return image


def shard_key(shard: str) -> str:
    """A short, filesystem-safe key of a shard's location: its file stem plus a 12-hex hash of the location.

    The location is the shard as discovered (absolute local path, or URL with its protocol; file:// and plain paths
    hash alike). It tells apart two listings of one file; unit ids and derived row ids come from the shard's content
    instead (pipeline.shards), except in outputs written before that, whose unit ids were shard_key + row groups.
    """
    location = shard[len("file://") :] if shard.startswith("file://") else shard
    if "://" not in location:
        location = os.path.abspath(location).replace(os.sep, "/")
    digest = hashlib.sha1(location.encode()).hexdigest()[:12]
    stem = location.rstrip("/").rsplit("/", 1)[-1]
    if stem.lower().endswith(".parquet"):
        stem = stem[: -len(".parquet")]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:48].lstrip(".") or "shard"
    return f"{stem}-{digest}"


def derive_row_id(shard_id: str, row_index: int) -> str:
    """The id a row gets from where it is, when the input has no id column: the shard's content fingerprint
    (WorkUnit.shard_id, see pipeline.shards) and the row's index within the shard."""
    return f"{shard_id}-{row_index}"


@dataclass(frozen=True)
class UnitTiming:
    """When and where a unit ran, as its worker measured it: what `blipbatch report` plots."""

    started: float  # Unix time (seconds) the worker began the unit
    finished: float  # Unix time its part was written (the commit marker follows at once)
    worker: str  # the model worker's index in its run ("0", "1", ...): the same after Ray restarts it
    pid: int
    node: str  # host name
    images_fetched: int  # distinct images fetched and decoded
    # Seconds spent in each stage. fetch_s and decode_s add up every image's time on its prepare-stage thread
    # (thread-seconds: images are fetched and decoded on many threads, beside the model), so the three may add up
    # to more than the unit's time; model_s is the model thread's.
    fetch_s: float
    decode_s: float
    model_s: float
    # Fetch attempts whose read was still blocked at its deadline (a hung mount): each row ended on time, each read's
    # thread was left behind until it returns ([fetch] max_abandoned_reads bounds them).
    reads_abandoned: int = 0

    @property
    def seconds(self) -> float:
        return self.finished - self.started


@dataclass(frozen=True)
class ProgressRecord:
    """The commit marker of one work unit, written after its output part (one JSON file per unit)."""

    unit_id: str
    shard: str
    first_row: int  # the unit's input rows: [first_row, first_row + num_rows) of the shard
    num_rows: int
    rows: int  # output rows written (one per input row and instruction)
    rows_ok: int
    rows_error: int
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    part: str = ""  # output part file name, relative to the output root
    attempt: int = 1
    finished_at: str = ""  # ISO 8601, UTC
    images_encoded: int = 0  # vision-encoder passes the unit took (one per image, however many questions)
    # Input rows whose image bytes an earlier row of the unit had (decoded and encoded once, for the first)
    duplicate_images: int = 0
    timing: UnitTiming | None = None  # None in markers written before timing was recorded

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ProgressRecord:
        """Parse a marker; fields with a default may be absent (markers written by earlier versions lack them)."""
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"progress record lacks field(s) {', '.join(missing)}: {data!r}")
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if values.get("timing") is not None:
            try:
                values["timing"] = UnitTiming(**values["timing"])
            except TypeError as e:
                raise ValueError(
                    f"progress record of unit {data['unit_id']}: bad timing {values['timing']!r}: {e}"
                ) from None
        return cls(**values)
