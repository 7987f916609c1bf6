"""Input side: find the Parquet shards, cut them into work units along row groups, read a unit's rows."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import has_magic, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from blipbatch.schemas import ColumnMapping, check_input_schema, derive_row_id, output_schema, shard_key
from blipbatch.errors import BlipbatchError

FOOTER_READ_THREADS = 16  # footers are tiny; on object stores the latency, not the bandwidth, is what costs


class NoShardsError(BlipbatchError, FileNotFoundError):
    """An input source that holds no Parquet shards."""


class ShardError(BlipbatchError, ValueError):
    """A shard that cannot be read as planned: not Parquet, listed twice, or changed since planning."""


def _qualify(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # Local shards stay plain absolute paths; remote ones keep their protocol so that any process can open them.
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _is_hidden(relative: str) -> bool:
    # Like Spark and pyarrow.dataset: names starting with "." or "_" (temp files, _SUCCESS, _progress/) are not data.
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _parquet_below(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    folder = folder.rstrip("/")
    found = []
    for path in fs.find(folder):
        relative = path[len(folder):].lstrip("/")
        if relative.lower().endswith(".parquet") and not _is_hidden(relative):
            found.append(path)
    return sorted(found)


def _expand(entry: str) -> list[str]:
    fs, path = url_to_fs(entry)
    if isinstance(fs, LocalFileSystem):
        path = os.path.normpath(path)  # fsspec keeps "..": one file, one spelling
    fs.invalidate_cache()  # a long-lived process must see shards added since its last listing
    if has_magic(path):
        paths = []
        for match, info in sorted(fs.glob(path, detail=True).items()):
            paths += _parquet_below(fs, match) if info["type"] == "directory" else [match]
    elif fs.isdir(path):
        paths = _parquet_below(fs, path)
    elif fs.isfile(path):
        paths = [path]  # a file named explicitly is taken whatever its extension
    else:
        paths = []
    return [_qualify(fs, p) for p in paths]


def discover_shards(source: str | Sequence[str]) -> list[str]:
    """The Parquet shards of a folder (recursively), a glob, or a list of those; local, file://, s3://, gs://.

    Folders and globs give their shards sorted; a list keeps its order, each shard once.
    """
    entries = [source] if isinstance(source, str) else list(source)
    if not entries:
        raise NoShardsError("no input given: pass a folder, a glob or a list of Parquet files")
    shards = []
    for entry in entries:
        found = _expand(entry)
        if not found:
            raise NoShardsError(f"no Parquet shards found at {entry!r} (a folder is searched recursively for "
                                "*.parquet, skipping names that start with '.' or '_')")
        shards += found
    return list(dict.fromkeys(shards))


@dataclass(frozen=True)
class WorkUnit:
    """Consecutive whole row groups of one shard: the unit of scheduling, retry and commit."""

    unit_id: str  # shard_key + row-group range: stable across runs, unique within a job, safe as a file name
    shard: str
    row_groups: tuple[int, ...]
    first_row: int  # index within the shard of the unit's first row
    num_rows: int


def _read_footer(shard: str) -> tuple[pa.Schema, list[int]]:
    fs, path = url_to_fs(shard)
    try:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            schema, metadata = parquet.schema_arrow, parquet.metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{shard}: cannot read it as Parquet: {exc}") from exc
    return schema, [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def _units_of(shard: str, group_rows: list[int], max_rows: int) -> list[WorkUnit]:
    key = shard_key(shard)
    units: list[WorkUnit] = []
    groups: list[int] = []
    first_row = rows = 0

    def close() -> None:
        if rows:  # row groups without rows produce no output, so no unit
            units.append(WorkUnit(f"{key}-rg{groups[0]:05d}-{groups[-1]:05d}", shard, tuple(groups), first_row, rows))

    for index, n in enumerate(group_rows):
        if groups and rows + n > max_rows:
            close()
            first_row, groups, rows = first_row + rows, [], 0
        groups.append(index)
        rows += n
    if groups:
        close()
    return units


def plan_units(shards: Sequence[str], mapping: ColumnMapping, max_rows_per_unit: int = 1000) -> list[WorkUnit]:
    """Work units of at most max_rows_per_unit rows (or one row group, if bigger), from Parquet footers only.

    Every shard's schema is checked against the mapping first, so a bad shard stops the job before any work.
    Unit ids depend on max_rows_per_unit: a job must keep it fixed across resumes (put it in the manifest).
    """
    if max_rows_per_unit < 1:
        raise ValueError(f"max_rows_per_unit must be at least 1, got {max_rows_per_unit}")
    seen: dict[str, str] = {}
    for shard in shards:
        key = shard_key(shard)
        if key in seen:
            raise ShardError(f"{shard}: same location as {seen[key]}; each shard may appear once")
        seen[key] = shard
    with ThreadPoolExecutor(max_workers=FOOTER_READ_THREADS) as pool:
        footers = list(pool.map(_read_footer, shards))
    units = []
    for shard, (schema, group_rows) in zip(shards, footers):
        check_input_schema(shard, schema, mapping)
        output_schema(schema, mapping)  # passthrough names that clash with output columns fail here, not mid-run
        units += _units_of(shard, group_rows, max_rows_per_unit)
    return units


@dataclass(frozen=True)
class InputRow:
    """One (input row, instruction) pair; the instruction is not validated here (a bad one becomes an error row)."""

    id: str | None  # None only when the id column holds a null: the row must become an invalid_input error row
    image: str | bytes | None
    instruction: object
    passthrough: dict = field(default_factory=dict)
    row_index: int = 0  # index of the input row within its shard
    question_id: str | None = None  # the name of a fixed question (annotate jobs)


def read_unit(unit: WorkUnit, mapping: ColumnMapping,
              fixed_instructions: Sequence[str] | Mapping[str, str] | None = None) -> list[InputRow]:
    """The unit's rows, one InputRow per (row, instruction): per-row instructions from the mapping's column, or
    every one of fixed_instructions for each row, in order (a mapping names them: question_id -> question)."""
    if (fixed_instructions is None) == (mapping.instruction_column is None):
        raise ValueError("give either an instruction column or fixed instructions (a prompt or questions), "
                         "exactly one of the two")
    if fixed_instructions is not None and len(fixed_instructions) == 0:
        raise ValueError("fixed_instructions is empty: give at least one prompt or question")
    fs, path = url_to_fs(unit.shard)
    with fs.open(path, "rb") as f:
        table = pq.ParquetFile(f).read_row_groups(list(unit.row_groups), columns=mapping.input_columns())
    if table.num_rows != unit.num_rows:
        raise ShardError(f"{unit.shard}: row groups {unit.row_groups} hold {table.num_rows} rows, planned "
                         f"{unit.num_rows}; the shard changed after planning")
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    rows = []
    for offset in range(table.num_rows):
        row_index = unit.first_row + offset
        if mapping.id_column is None:
            row_id = derive_row_id(unit.shard, row_index)
        else:
            value = columns[mapping.id_column][offset]
            row_id = None if value is None else str(value)
        image = columns[mapping.image_column][offset]
        for question_id, instruction in _instructions(fixed_instructions, columns, mapping, offset):
            passthrough = {name: columns[name][offset] for name in mapping.passthrough}
            rows.append(InputRow(row_id, image, instruction, passthrough, row_index, question_id))
    return rows


def _instructions(fixed: Sequence[str] | Mapping[str, str] | None, columns: dict, mapping: ColumnMapping,
                  offset: int) -> list[tuple[str | None, object]]:
    if fixed is None:
        return [(None, columns[mapping.instruction_column][offset])]
    if isinstance(fixed, Mapping):
        return list(fixed.items())
    return [(None, text) for text in fixed]
