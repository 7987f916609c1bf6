"""Output side: whole Parquet parts, commit markers and failed markers, through fsspec.

Layout under the output root (a local folder or a URL such as s3://bucket/out); the root is a dataset: every Parquet
file under it is a committed part with the output schema, and bookkeeping lives in names readers skip:
    part-{unit_id}.parquet                 one per committed unit, whole
    _staging/part-{unit_id}.parquet.tmp    a part written but not committed yet (not "*.parquet": DuckDB and Polars
                                           globs such as OUT/**/*.parquet descend into "_" folders, pyarrow does not)
    _progress/{unit_id}.json               the unit's commit marker (a ProgressRecord)
    _progress/{unit_id}.failed.json        a unit given up after repeated failures; not a commit
    _manifest.json, _lock.json             the job's settings (pipeline.manifest), the run lock (pipeline.lock)
    _webdataset/{quick_id}.json            a WebDataset tar's scan, so later runs plan without reading it (webdataset)
A unit is committed iff its marker exists and its part is in place. commit_unit writes the marker, then moves the
staged part into place (a rename on local disk, one server-side copy on object stores): the move is what makes the
rows visible, whole. A redone unit's old marker is removed before its new part replaces the old one, so a marker
never vouches for another part. A marker without its part (a crash between the two) is a commit that did not finish:
the unit is redone and its part name reused, so a retried unit never duplicates rows.
Writes to object stores are retried with backoff on transient errors (retry_store_call): each is one PUT (or one
completed multipart upload), which the store applies whole or not at all, so no try ever exposes a partial object.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from blipbatch.schemas import ERROR_KINDS, STATUS_ERROR, STATUS_OK, ProgressRecord

from .redact import redact
from .shards import WorkUnit

log = logging.getLogger(__name__)

PROGRESS_DIR = "_progress"
STAGING_DIR = "_staging"
STAGED_SUFFIX = ".tmp"
COMMIT_SUFFIX = ".json"
FAILED_SUFFIX = ".failed.json"

# Tries of one object-store write, on top of the client library's own retries; sleeps of exponential backoff with
# full jitter: uniform in [0, STORE_BACKOFF_S * 2**n], capped at STORE_MAX_BACKOFF_S.
STORE_ATTEMPTS = 5
STORE_BACKOFF_S = 0.2
STORE_MAX_BACKOFF_S = 5.0
# Errors another try cannot fix: the store understood the request and refused it.
_PERMANENT_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    NotImplementedError,
)
_PERMANENT_ERRNOS = frozenset({errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENAMETOOLONG, errno.EMSGSIZE})

T = TypeVar("T")


def part_name(unit_id: str) -> str:
    """The output part of a unit, relative to the output root: fixed by the unit, so a retry overwrites it."""
    return f"part-{unit_id}.parquet"


def staged_name(unit_id: str) -> str:
    """Where a unit's part waits for its commit, relative to the output root."""
    return f"{STAGING_DIR}/{part_name(unit_id)}{STAGED_SUFFIX}"


def _open_root(output_root: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = url_to_fs(output_root)
    return fs, root.rstrip("/")


def _qualify(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _is_transient(err: Exception) -> bool:
    if isinstance(err, _PERMANENT_ERRORS):
        return False
    return not (isinstance(err, OSError) and err.errno in _PERMANENT_ERRNOS)


def retry_store_call(what: str, call: Callable[[], T]) -> T:
    """`call()`, tried again after a transient error (dropped connection, 500/503, timeout) up to STORE_ATTEMPTS
    times in all; `what` names the operation in the log. The call must be idempotent, as a whole-object PUT is:
    a try whose answer was lost may have been applied."""
    attempt = 1
    while True:
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - each backend (botocore, gcsfs, aiohttp) has its own error types
            if attempt >= STORE_ATTEMPTS or not _is_transient(err):
                raise
            delay = random.uniform(0.0, min(STORE_MAX_BACKOFF_S, STORE_BACKOFF_S * 2 ** (attempt - 1)))
            attempt += 1
            log.warning(
                "%s failed (%s: %s); try %d of %d in %.1f s",
                what,
                type(err).__name__,
                redact(str(err)),
                attempt,
                STORE_ATTEMPTS,
                delay,
            )
            time.sleep(delay)


def _write_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make `path` hold `data`, never a prefix of it, even if the process dies mid-write."""
    if not isinstance(fs, LocalFileSystem):
        # One PUT (or a completed multipart upload): the object appears whole or not at all.
        retry_store_call(f"writing {_qualify(fs, path)}", lambda: fs.pipe_file(path, data))
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    # Hidden temp name in the same folder: readers skip it, and os.replace within one filesystem is atomic.
    temp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the name does
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def _json_bytes(data: object) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False).encode()


def write_file(location: str, data: bytes) -> str:
    """Write `data` as the file `location` (a path or URL), whole or not at all; returns it qualified."""
    fs, path = _open_root(location)
    _write_whole(fs, path, data)
    return _qualify(fs, path)


def write_table(location: str, table: pa.Table) -> str:
    """Write `table` as the Parquet file `location` (a path or URL), whole or not at all; returns it qualified."""
    fs, path = _open_root(location)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    _write_whole(fs, path, buffer.getvalue().to_pybytes())
    return _qualify(fs, path)


def write_part(output_root: str, unit: WorkUnit, table: pa.Table) -> str:
    """Stage the unit's whole output table (readers do not see it until commit_unit); returns its path or URL."""
    return write_table(f"{output_root.rstrip('/')}/{staged_name(unit.unit_id)}", table)


def record_for(unit: WorkUnit, table: pa.Table, attempt: int) -> ProgressRecord:
    """The commit marker of a unit whose output is `table`, with counts taken from its status/error_kind columns."""
    statuses = Counter(table.column("status").to_pylist())
    unknown = set(statuses) - {STATUS_OK, STATUS_ERROR}
    if unknown:
        raise ValueError(
            f"unit {unit.unit_id}: status must be {STATUS_OK!r} or {STATUS_ERROR!r}, found {sorted(map(repr, unknown))}"
        )
    kinds = Counter(kind for kind in table.column("error_kind").to_pylist() if kind is not None)
    if set(kinds) - set(ERROR_KINDS):
        raise ValueError(
            f"unit {unit.unit_id}: error_kind must be one of {ERROR_KINDS}, found "
            f"{sorted(set(kinds) - set(ERROR_KINDS))}"
        )
    return ProgressRecord(
        unit_id=unit.unit_id,
        shard=unit.shard,
        first_row=unit.first_row,
        num_rows=unit.num_rows,
        rows=table.num_rows,
        rows_ok=statuses[STATUS_OK],
        rows_error=statuses[STATUS_ERROR],
        errors_by_kind=dict(sorted(kinds.items())),
        part=part_name(unit.unit_id),
        attempt=attempt,
        finished_at=_now(),
    )


def commit_unit(output_root: str, record: ProgressRecord) -> None:
    """Commit the unit whose part write_part staged: its marker, then its part moved into place (see the module
    docstring for the order when the unit had a part already). A failed marker left by earlier tries is removed."""
    fs, root = _open_root(output_root)
    staged, part = f"{root}/{staged_name(record.unit_id)}", f"{root}/{record.part}"
    marker = f"{root}/{PROGRESS_DIR}/{record.unit_id}{COMMIT_SUFFIX}"
    fs.invalidate_cache()  # the part may have been staged by another process
    if not fs.exists(staged):
        raise FileNotFoundError(
            f"cannot commit unit {record.unit_id}: its part {_qualify(fs, staged)} does not "
            "exist; write the part before committing"
        )
    if fs.exists(part):  # a redo: the old marker must not vouch for the new part, even for a moment
        retry_store_call(f"removing {_qualify(fs, marker)}", lambda: _remove(fs, marker))
        _move(fs, staged, part)
        _write_whole(fs, marker, _json_bytes(record.to_dict()))
    else:
        _write_whole(fs, marker, _json_bytes(record.to_dict()))
        _move(fs, staged, part)
    failed = f"{root}/{PROGRESS_DIR}/{record.unit_id}{FAILED_SUFFIX}"
    fs.invalidate_cache(failed)
    if fs.exists(failed):
        retry_store_call(f"removing {_qualify(fs, failed)}", lambda: _remove(fs, failed))


def _move(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Make `target` hold what `source` holds, at once and whole, then drop `source`."""
    if isinstance(fs, LocalFileSystem):
        os.replace(source, target)  # atomic within one filesystem
        return
    # One server-side copy: the object appears whole or not at all (a copy whose answer was lost is redone).
    retry_store_call(f"committing {_qualify(fs, target)}", lambda: fs.copy(source, target))
    retry_store_call(f"removing {_qualify(fs, source)}", lambda: _remove(fs, source))


def _remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass  # removed already, by a try whose answer was lost


def _progress_names(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    folder = f"{root}/{PROGRESS_DIR}"
    fs.invalidate_cache(folder)  # markers are written by other processes; a cached listing would be stale
    try:
        paths = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    names = (path.rstrip("/").rsplit("/", 1)[-1] for path in paths)
    return sorted(name for name in names if not name.startswith("."))  # skip temp files of in-flight writes


def _commit_ids(names: list[str]) -> list[str]:
    return [n[: -len(COMMIT_SUFFIX)] for n in names if n.endswith(COMMIT_SUFFIX) and not n.endswith(FAILED_SUFFIX)]


def _part_ids(fs: fsspec.AbstractFileSystem, root: str) -> set[str]:
    """Ids of the units whose part is in place."""
    fs.invalidate_cache(root)
    try:
        paths = fs.ls(root, detail=False)
    except FileNotFoundError:
        return set()
    prefix, suffix = part_name("|").split("|")
    names = (path.rstrip("/").rsplit("/", 1)[-1] for path in paths)
    return {name[len(prefix) : -len(suffix)] for name in names if name.startswith(prefix) and name.endswith(suffix)}


def _committed_ids(fs: fsspec.AbstractFileSystem, root: str, progress_names: list[str]) -> list[str]:
    # Markers listed first: a commit that finishes between the two listings is missed, never one half done counted.
    marked = _commit_ids(progress_names)
    placed = _part_ids(fs, root)
    return [unit_id for unit_id in marked if unit_id in placed]


def committed_units(output_root: str) -> set[str]:
    """Ids of the committed units: a marker and the part in place."""
    fs, root = _open_root(output_root)
    return set(_committed_ids(fs, root, _progress_names(fs, root)))


def _read_json_files(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, dict]:
    """Parsed JSON by path, for the paths that still exist (a failed marker may be removed while we list)."""
    if not paths:
        return {}
    contents = fs.cat(paths, on_error="omit")  # concurrent on object stores
    return {path: json.loads(contents[path]) for path in paths if path in contents}


def progress_records(output_root: str, unit_ids: Collection[str] | None = None) -> list[ProgressRecord]:
    """The commit markers of the committed units (of those among `unit_ids`, when given), ordered by unit id."""
    fs, root = _open_root(output_root)
    ids = [i for i in _committed_ids(fs, root, _progress_names(fs, root)) if unit_ids is None or i in unit_ids]
    paths = [f"{root}/{PROGRESS_DIR}/{unit_id}{COMMIT_SUFFIX}" for unit_id in ids]
    return [ProgressRecord.from_dict(data) for data in _read_json_files(fs, paths).values()]


def mark_failed(output_root: str, unit_id: str, reason: str, attempts: int) -> None:
    """Record that a unit was given up after `attempts` tries; a later run skips it unless asked to retry it."""
    fs, root = _open_root(output_root)
    record = {"unit_id": unit_id, "reason": reason, "attempts": attempts, "failed_at": _now()}
    _write_whole(fs, f"{root}/{PROGRESS_DIR}/{unit_id}{FAILED_SUFFIX}", _json_bytes(record))


def failed_units(output_root: str) -> dict[str, dict]:
    """Failed markers by unit id, leaving out units committed since (a retry that succeeded)."""
    fs, root = _open_root(output_root)
    names = _progress_names(fs, root)
    committed = set(_committed_ids(fs, root, names))
    ids = [n[: -len(FAILED_SUFFIX)] for n in names if n.endswith(FAILED_SUFFIX)]
    paths = {f"{root}/{PROGRESS_DIR}/{unit_id}{FAILED_SUFFIX}": unit_id for unit_id in ids if unit_id not in committed}
    return {paths[path]: data for path, data in _read_json_files(fs, list(paths)).items()}


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file read whole into memory that Arrow owns, then parsed. Not through a Python file object, nor from
    Python bytes: the table's buffers (and Arrow's I/O threads) would then hold Python objects, and an Arrow thread
    that releases one while the interpreter exits is killed mid-unwind by Python ("terminate called without an active
    exception", exit code 134: about 1 process in 20 that read an output). Parts are one unit each: small."""
    data = fs.cat_file(path)
    buffer = pa.allocate_buffer(len(data))
    memoryview(buffer).cast("B")[:] = data
    return pq.read_table(pa.BufferReader(buffer), columns=columns)


def read_part(output_root: str, record: ProgressRecord, columns: list[str] | None = None) -> pa.Table:
    """The output part of a committed unit (only `columns`, when given)."""
    fs, root = _open_root(output_root)
    return read_parquet(fs, f"{root}/{record.part}", columns)


def error_positions(output_root: str, record: ProgressRecord, kinds: Collection[str]) -> tuple[int, ...]:
    """Positions in a committed unit's part of its error rows of `kinds`."""
    table = read_part(output_root, record, ["status", "error_kind"])
    wanted = pc.and_(
        pc.equal(table.column("status"), STATUS_ERROR),
        pc.is_in(table.column("error_kind"), pa.array(sorted(kinds), pa.string())),
    )
    return tuple(pc.indices_nonzero(wanted.fill_null(False)).to_pylist())


def rows_at(output_root: str, record: ProgressRecord, positions: Sequence[int]) -> tuple[int, int, dict[str, int]]:
    """Rows ok and in error, and errors by kind, among the rows at `positions` of a committed unit's part."""
    table = read_part(output_root, record, ["status", "error_kind"]).take(pa.array(positions, pa.int64()))
    statuses = Counter(table.column("status").to_pylist())
    kinds = Counter(kind for kind in table.column("error_kind").to_pylist() if kind is not None)
    return statuses[STATUS_OK], statuses[STATUS_ERROR], dict(kinds)


def part_schema(output_root: str, unit_id: str) -> pa.Schema:
    """The schema of a committed unit's part."""
    fs, root = _open_root(output_root)
    with fs.open(f"{root}/{part_name(unit_id)}", "rb") as f:
        return pq.read_schema(f)


def whole_output(output_root: str, unit: WorkUnit, table: pa.Table) -> pa.Table:
    """The part a unit commits, from the rows its worker made: for a redo (unit.redo), the unit's committed part
    with the rows at unit.redo replaced, in order, by those of `table`, keeping their ids (the same input rows); and
    in the schema of the output's parts (unit.part_schema), so that an output begun by an earlier version keeps one
    schema: a column it lacks is dropped, one it has is filled with nulls."""
    if unit.redo is not None:
        table = _merged(output_root, unit.unit_id, unit.redo, table)
    return table if unit.part_schema is None else _conform(table, unit.part_schema, unit.unit_id)


def _merged(output_root: str, unit_id: str, redo: Sequence[int], redone: pa.Table) -> pa.Table:
    fs, root = _open_root(output_root)
    kept = read_parquet(fs, f"{root}/{part_name(unit_id)}")
    if redone.num_rows != len(redo) or (redo and max(redo) >= kept.num_rows):
        raise ValueError(
            f"unit {unit_id}: {redone.num_rows} rows redone for {len(redo)} positions of a part of {kept.num_rows} rows"
        )
    redone = _conform(redone, kept.schema, unit_id)
    positions = pa.array(redo, pa.int64())
    redone = redone.set_column(kept.schema.get_field_index("id"), "id", kept.column("id").take(positions))
    order = list(range(kept.num_rows))
    for k, position in enumerate(redo):
        order[position] = kept.num_rows + k
    return pa.concat_tables([kept, redone]).take(pa.array(order, pa.int64()))


def _conform(table: pa.Table, schema: pa.Schema, unit_id: str) -> pa.Table:
    if table.schema == schema:
        return table
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        try:
            columns.append(table.column(f.name).cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            raise ValueError(
                f"unit {unit_id}: column {f.name!r} is {table.schema.field(f.name).type}, but the "
                f"output's parts hold {f.type}; write to a new output"
            ) from None
    return pa.Table.from_arrays(columns, schema=schema)


def read_output(output_root: str) -> pa.Table:
    """All committed parts in unit-id order; empty if none. (pandas, pyarrow, DuckDB and Polars read the output
    folder as a dataset too: README, "Reading an output".)"""
    tables = [read_part(output_root, record) for record in progress_records(output_root)]
    return pa.concat_tables(tables) if tables else pa.table({})
