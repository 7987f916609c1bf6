"""Input side: find the Parquet shards and WebDataset tars, cut them into work units (row groups or row ranges;
runs of samples), read a unit's rows."""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import has_magic, url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

from blipbatch.errors import BlipbatchError
from blipbatch.schemas import ColumnMapping, check_input_schema, derive_row_id, output_schema, shard_key

from .errors import RowError
from .guard import file_kind
from .job import RunConfig
from .template import Template, columns_of, parse_all
from .webdataset import (
    KEY_COLUMN,
    IndexCache,
    TarChanged,
    TarError,
    TarIndex,
    TarSlice,
    is_tar,
    read_slice,
    scan,
    slices,
)

FOOTER_READ_THREADS = 16  # footers are tiny; on object stores the latency, not the bandwidth, is what costs
# A shard's content fingerprint hashes its footer and the first and last SAMPLE_BYTES of its data (all of it when
# smaller): two reads of at most 256 KiB per shard on top of the footer's.
SAMPLE_BYTES = 256 * 1024
RANGE_TAG = "-rows"  # in a unit id, starts the row range of a cut row group: {shard_id}-rg{g}-{g}-rows{start}-{stop}


class NoShardsError(BlipbatchError, FileNotFoundError):
    """An input source that holds no Parquet shards."""


class ShardError(BlipbatchError, ValueError):
    """A shard that cannot be read as planned: not Parquet, listed twice, or changed since planning."""


class ShardChanged(ShardError):
    """A shard whose content is no longer the one its units were planned from: their rows are not committed."""


class DuplicateIdError(ShardError):
    """An id column that holds the same id on several rows."""


class OverlapError(BlipbatchError, ValueError):
    """An output location inside an input location, or the reverse."""


def _qualify(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # Local shards stay plain absolute paths; remote ones keep their protocol so that any process can open them.
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _is_hidden(relative: str) -> bool:
    # Like Spark and pyarrow.dataset: names starting with "." or "_" (temp files, _SUCCESS, _progress/) are not data.
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _regular(fs: fsspec.AbstractFileSystem, path: str, info: dict) -> str:
    """`path`, if it is a regular file (or an object); else ShardError, before anything opens it: opening a FIFO
    blocks until someone writes to it, and a device may never end."""
    if info["type"] != "file":
        kind = file_kind(info["mode"]) if "mode" in info else info["type"]
        raise ShardError(
            f"{_qualify(fs, path)}: {kind}, not a regular file; only regular files are read as shards: "
            "remove it from the input"
        )
    return path


def _parquet_below(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """The shards below `folder`: Parquet files, and WebDataset tars (pipeline.webdataset). A STEM.parquet beside a
    STEM.tar is not one: img2dataset's webdataset output keeps each tar's metadata (no images) there."""
    folder = folder.rstrip("/")
    found = []
    for path, info in fs.find(folder, detail=True).items():
        relative = path[len(folder) :].lstrip("/")
        if relative.lower().endswith((".parquet", ".tar")) and not _is_hidden(relative):
            found.append(_regular(fs, path, info))
    tars = {path[: -len(".tar")] for path in found if path.lower().endswith(".tar")}
    return sorted(
        path for path in found if not (path.lower().endswith(".parquet") and path[: -len(".parquet")] in tars)
    )


def _expand(entry: str) -> list[str]:
    fs, path = url_to_fs(entry)
    if isinstance(fs, LocalFileSystem):
        path = os.path.normpath(path)  # fsspec keeps "..": one file, one spelling
    fs.invalidate_cache()  # a long-lived process must see shards added since its last listing
    if has_magic(path):
        paths = []
        for match, info in sorted(fs.glob(path, detail=True).items()):
            paths += _parquet_below(fs, match) if info["type"] == "directory" else [_regular(fs, match, info)]
    elif fs.isdir(path):
        paths = _parquet_below(fs, path)
    elif fs.exists(path):
        paths = [_regular(fs, path, fs.info(path))]  # a file named explicitly is taken whatever its extension
    else:
        paths = []
    return [_qualify(fs, p) for p in paths]


def discover_shards(source: str | Sequence[str]) -> list[str]:
    """The Parquet shards and WebDataset tars of a folder (recursively), a glob, or a list of those; local, file://,
    s3://, gs://.

    Folders and globs give their shards sorted; a list keeps its order, each shard once.
    """
    entries = [source] if isinstance(source, str) else list(source)
    if not entries:
        raise NoShardsError("no input given: pass a folder, a glob or a list of Parquet files")
    shards = []
    for entry in entries:
        found = _expand(entry)
        if not found:
            raise NoShardsError(
                f"no Parquet shards found at {entry!r} (a folder is searched recursively for "
                "*.parquet and WebDataset *.tar, skipping names that start with '.' or '_')"
            )
        shards += found
    return list(dict.fromkeys(shards))


@dataclass(frozen=True)
class WorkUnit:
    """Consecutive whole row groups of one shard, or a range of rows of one row group larger than a unit: the unit of
    scheduling, retry and commit."""

    unit_id: str  # shard_id + row-group range (+ row range): the same wherever the shard lies, unique within a job, a
    # safe file name
    shard: str
    row_groups: tuple[int, ...]
    first_row: int  # index within the shard of the unit's first row
    num_rows: int
    shard_id: str = ""  # the shard's content fingerprint (see _content_id); units made by hand may leave it out
    schema: pa.Schema | None = None  # the shard's schema, passthrough columns with the type unified across shards
    # A redo of a committed unit: the positions in its part of the rows to do again (read_unit reads only those;
    # sink.whole_output puts them back among the rows kept). None: the whole unit.
    redo: tuple[int, ...] | None = None
    part_schema: pa.Schema | None = None  # the schema of the output's parts so far (None: none yet); its part takes it
    tar: TarSlice | None = None  # a WebDataset shard's unit: its samples and their byte range (row_groups empty)
    # Rows [start, stop) of its one row group, when that group is larger than a unit; None: its row groups whole.
    group_range: tuple[int, int] | None = None

    @property
    def whole_group_id(self) -> str:
        """The id of the unit its row group made whole (as before row groups were split): the same as unit_id unless
        the unit is a row range."""
        return self.unit_id if self.group_range is None else self.unit_id.rsplit(RANGE_TAG, 1)[0]


@dataclass(frozen=True)
class _Footer:
    schema: pa.Schema
    group_rows: list[int]
    shard_id: str
    tar: TarIndex | None = None  # a WebDataset shard's samples (group_rows: their count)


def _footer(f: IO[bytes]) -> tuple[int, bytes]:
    """A Parquet file's size, and its footer's bytes: every row group's sizes, offsets and statistics, the schema."""
    size = f.seek(0, os.SEEK_END)
    f.seek(size - 8)
    length = int.from_bytes(f.read(4), "little")
    f.seek(size - 8 - length)
    return size, f.read(length)


def _sample_ranges(size: int, footer: bytes) -> list[tuple[int, int]]:
    """The data a fingerprint hashes besides the footer: between the magic bytes and the footer, whole when small,
    else its first and last SAMPLE_BYTES."""
    start, end = 4, size - 8 - len(footer)
    return (
        [(start, end)]
        if end - start <= 2 * SAMPLE_BYTES
        else [(start, start + SAMPLE_BYTES), (end - SAMPLE_BYTES, end)]
    )


def _digest(size: int, footer: bytes, samples: Sequence[bytes]) -> str:
    """A shard's content fingerprint, the same for a copy, renamed or moved: its size, footer and samples (two files
    can share a footer: the same sizes and statistics with rows in another order; a difference in the middle of a
    large file alone goes unseen, and planning then refuses the two as copies)."""
    digest = hashlib.sha256(size.to_bytes(8, "little") + footer)
    for data in samples:
        digest.update(data)
    return digest.hexdigest()[:16]


def _content_id(fs: fsspec.AbstractFileSystem, path: str, size: int, footer: bytes) -> str:
    """The fingerprint (_digest) of the shard at `path`, its samples read concurrently (planning reads many)."""
    ranges = _sample_ranges(size, footer)
    return _digest(size, footer, fs.cat_ranges([path] * len(ranges), [r[0] for r in ranges], [r[1] for r in ranges]))


def _open_fingerprint(f: IO[bytes]) -> str:
    """The fingerprint (_digest) of the content an open shard file reads."""
    size, footer = _footer(f)
    samples = []
    for start, end in _sample_ranges(size, footer):
        f.seek(start)
        samples.append(f.read(end - start))
    return _digest(size, footer, samples)


def _read_footer(shard: str, mapping: ColumnMapping, tar_cache: IndexCache | None = None) -> _Footer:
    if is_tar(shard, mapping.format):
        try:
            index = scan(shard, mapping.image_column, mapping.image_extension, tar_cache)
        except (TarError, OSError) as exc:
            raise ShardError(str(exc) if isinstance(exc, TarError) else f"{shard}: cannot read it: {exc}") from exc
        return _Footer(index.schema, [len(index.samples)], index.shard_id, index)
    fs, path = url_to_fs(shard)
    try:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            schema, metadata = parquet.schema_arrow, parquet.metadata
            size, footer = _footer(f)
        shard_id = _content_id(fs, path, size, footer)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{shard}: cannot read it as Parquet: {exc}") from exc
    return _Footer(schema, [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)], shard_id)


def _units_of(shard: str, footer: _Footer, max_rows: int) -> list[WorkUnit]:
    if footer.tar is not None:
        return [
            WorkUnit(
                f"{footer.shard_id}-s{first:07d}-{first + len(part.samples) - 1:07d}",
                shard,
                (),
                first,
                len(part.samples),
                footer.shard_id,
                footer.schema,
                tar=part,
            )
            for first, part in slices(footer.tar, max_rows)
        ]
    units: list[WorkUnit] = []
    groups: list[int] = []
    first_row = rows = 0

    def close() -> None:
        if rows:  # row groups without rows produce no output, so no unit
            units.append(
                WorkUnit(
                    f"{footer.shard_id}-rg{groups[0]:05d}-{groups[-1]:05d}",
                    shard,
                    tuple(groups),
                    first_row,
                    rows,
                    footer.shard_id,
                    footer.schema,
                )
            )

    for index, n in enumerate(footer.group_rows):
        if groups and rows + n > max_rows:
            close()
            first_row, groups, rows = first_row + rows, [], 0
        if n > max_rows:  # one row group larger than a unit (pandas writes a shard as one): cut it into row ranges
            units += _ranges_of(shard, footer, index, first_row, max_rows)
            first_row += n
            continue
        groups.append(index)
        rows += n
    if groups:
        close()
    return units


def _ranges_of(shard: str, footer: _Footer, group: int, first_row: int, max_rows: int) -> list[WorkUnit]:
    """Units of at most max_rows rows covering row group `group` (which starts at shard row `first_row`)."""
    n = footer.group_rows[group]
    units = []
    for start in range(0, n, max_rows):
        stop = min(start + max_rows, n)
        units.append(
            WorkUnit(
                f"{footer.shard_id}-rg{group:05d}-{group:05d}{RANGE_TAG}{start:07d}-{stop:07d}",
                shard,
                (group,),
                first_row + start,
                stop - start,
                footer.shard_id,
                footer.schema,
                group_range=(start, stop),
            )
        )
    return units


def legacy_unit_id(unit: WorkUnit) -> str:
    """The id the unit had when ids came from the shard's location (outputs written before content ids)."""
    if unit.tar is not None:
        return unit.unit_id  # WebDataset units came after content ids
    return f"{shard_key(unit.shard)}-rg{unit.unit_id.rsplit('-rg', 1)[1]}"


def _check_locations(shards: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for shard in shards:
        key = shard_key(shard)
        if key in seen:
            raise ShardError(f"{shard}: same location as {seen[key]}; each shard may appear once")
        seen[key] = shard


def _check_contents(shards: Sequence[str], footers: Sequence[_Footer]) -> None:
    seen: dict[str, str] = {}
    for shard, footer in zip(shards, footers):
        if not sum(footer.group_rows):
            continue  # empty shards (often alike) make no unit
        if footer.shard_id in seen:
            raise ShardError(
                f"{shard}: same content as {seen[footer.shard_id]}; each shard may appear once: remove "
                "the copy from the input"
            )
        seen[footer.shard_id] = shard


def _check_keys(shards: Sequence[str], footers: Sequence[_Footer]) -> None:
    """Refuse a WebDataset key found in two tars: keys are the row ids."""
    seen: dict[str, str] = {}
    for shard, footer in zip(shards, footers):
        for sample in footer.tar.samples if footer.tar is not None else ():
            if seen.setdefault(sample.key, shard) != shard:
                raise DuplicateIdError(
                    f"WebDataset key {sample.key!r} is in {seen[sample.key]} and in {shard}; keys "
                    "are the row ids and must be unique across shards: remove the repeated "
                    "samples, or set [input] id_column to a unique column"
                )


def _unified_passthrough(shards: Sequence[str], footers: Sequence[_Footer], mapping: ColumnMapping) -> list[pa.Field]:
    """Each passthrough column with one type for every shard that has rows: the common type of its types (null and a
    type give the type, narrower integers the wider, string and large_string large_string; null alone: string), or a
    refusal naming the two shards whose types have none."""
    fields = []
    for name in mapping.passthrough:
        typed = [(shard, footer.schema.field(name)) for shard, footer in zip(shards, footers) if sum(footer.group_rows)]
        if not typed:
            continue
        owner, unified = typed[0]  # owner: the first shard of the type unified so far
        for shard, f in typed[1:]:
            try:
                merged = pa.unify_schemas([pa.schema([unified]), pa.schema([f])], promote_options="permissive")[0]
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                raise ShardError(
                    f"passthrough column {name!r} is {unified.type} in {owner} but {f.type} in {shard}, "
                    "and the two types have no common type; make the column one type in every shard, "
                    "or leave it out of passthrough"
                ) from None
            if merged.type != unified.type:
                owner, unified = (shard if merged.type == f.type else owner), merged
        # Null in every shard: written as string, a type that later shards' values can still be cast to.
        fields.append(unified.with_type(pa.string()) if pa.types.is_null(unified.type) else unified)
    return fields


def _with_fields(schema: pa.Schema, fields: Sequence[pa.Field]) -> pa.Schema:
    for f in fields:
        schema = schema.set(schema.get_field_index(f.name), f)
    return schema


def plan_units(
    shards: Sequence[str],
    mapping: ColumnMapping,
    max_rows_per_unit: int = RunConfig.rows_per_unit,
    tar_cache: IndexCache | None = None,
) -> list[WorkUnit]:
    """Work units of at most max_rows_per_unit rows, from Parquet footers (and the samples of data that make a shard's
    fingerprint): whole row groups, or row ranges of a row group larger than that.

    Every shard's schema is checked against the mapping first, and passthrough types are unified across shards, so a
    bad shard stops the job before any work. Unit ids come from each shard's content (its fingerprint, _content_id)
    and the row-group range (and row range), so a shard renamed or moved keeps them; they depend on
    max_rows_per_unit, which a job must keep fixed across resumes (the manifest records it). WebDataset tars are
    scanned (pipeline.webdataset), or their scans taken from `tar_cache`.
    """
    if max_rows_per_unit < 1:
        raise ValueError(f"max_rows_per_unit must be at least 1, got {max_rows_per_unit}")
    _check_locations(shards)
    with ThreadPoolExecutor(max_workers=FOOTER_READ_THREADS) as pool:
        footers = list(pool.map(lambda shard: _read_footer(shard, mapping, tar_cache), shards))
    for shard, footer in zip(shards, footers):
        check_input_schema(shard, footer.schema, mapping)
        output_schema(footer.schema, mapping)  # passthrough names that clash with output columns fail here, not mid-run
    _check_contents(shards, footers)
    if mapping.id_column in (None, KEY_COLUMN):
        _check_keys(shards, footers)
    passthrough = _unified_passthrough(shards, footers, mapping)
    units = []
    for shard, footer in zip(shards, footers):
        unified = dataclasses.replace(footer, schema=_with_fields(footer.schema, passthrough))
        units += _units_of(shard, unified, max_rows_per_unit)
    return units


def _ids(shard: str, column: str) -> pa.Array:
    fs, path = url_to_fs(shard)
    with fs.open(path, "rb") as f:
        ids = pq.read_table(f, columns=[column]).column(0)
    return pc.cast(ids, pa.string()).combine_chunks()  # as the output writes them: 7 and "7" are the same id


def duplicate_ids(
    shards: Sequence[str], mapping: ColumnMapping, across_shards: bool = False, limit: int = 10
) -> list[tuple[str, list[tuple[str, int]]]]:
    """Ids of the id column found on more than one row, as [(id, [(shard, row index), ...])], at most `limit`:
    within each shard (one shard's ids in memory at a time), or across them too (`across_shards`: every id in
    memory). Null ids do not count (their rows become error rows). WebDataset shards are left out: their keys are
    checked when planning (and an id column of theirs is not stored apart to read)."""
    shards = [shard for shard in shards if not is_tar(shard, mapping.format)]
    id_column = mapping.id_column
    if id_column is None:
        return []
    found: list[tuple[str, list[tuple[str, int]]]] = []
    with ThreadPoolExecutor(max_workers=FOOTER_READ_THREADS) as pool:
        columns = pool.map(lambda shard: _ids(shard, id_column), shards)
        if across_shards:
            _repeated(list(shards), list(columns), limit, found)
        else:
            for shard, ids in zip(shards, columns):
                _repeated([shard], [ids], limit, found)
    return found


def _repeated(
    shards: list[str], columns: list[pa.Array], limit: int, found: list[tuple[str, list[tuple[str, int]]]]
) -> None:
    """Add to `found` the ids repeated over `columns` (the id columns of `shards`, in order), up to `limit` in all."""
    ids = pa.concat_arrays(columns)
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.and_(pc.greater(counts.field("counts"), 1), pc.is_valid(counts.field("values"))))
    starts = [0, *itertools.accumulate(len(c) for c in columns)][:-1]
    for value in repeated.field("values").to_pylist()[: max(limit - len(found), 0)]:
        rows = pc.indices_nonzero(pc.equal(ids, value)).to_pylist()
        found.append((value, [_shard_row(shards, starts, row) for row in rows]))


def _shard_row(shards: Sequence[str], starts: Sequence[int], index: int) -> tuple[str, int]:
    at = bisect.bisect_right(starts, index) - 1
    return shards[at], index - starts[at]


def describe_duplicates(found: Sequence[tuple[str, Sequence[tuple[str, int]]]], column: str) -> str:
    """One line per duplicated id: where it occurs."""
    lines = []
    for value, places in found:
        by_shard: dict[str, list[int]] = defaultdict(list)
        for shard, row in places:
            by_shard[shard].append(row)
        where = "; ".join(f"{shard} rows {', '.join(map(str, rows))}" for shard, rows in by_shard.items())
        lines.append(f"  {column} {value!r}: {where}")
    return "\n".join(lines)


def check_unique_ids(shards: Sequence[str], mapping: ColumnMapping) -> None:
    """Refuse shards whose id column repeats an id within the shard (reads that column of each shard)."""
    if mapping.id_column is None:
        return  # ids derived from the shard and row are unique
    found = duplicate_ids(shards, mapping)
    if found:
        raise DuplicateIdError(
            f"the id column {mapping.id_column!r} repeats ids within a shard (first {len(found)} shown):\n"
            + describe_duplicates(found, mapping.id_column)
            + "\nIds must be unique: fix the input, or leave [input] id_column (--id-column) out to derive ids "
            "from the shard and row."
        )


def check_apart(inputs: Sequence[str], output: str) -> None:
    """Refuse an output location inside an input location, or an input inside the output: each run would read its own
    parts as new input, or write over its input."""
    out_protocol, out_path = _location(output)
    for entry in inputs:
        protocol, path = _location(entry)
        if protocol != out_protocol:
            continue
        base = _static_prefix(path)
        if path == out_path:
            raise OverlapError(f"output {output} is the input {entry}; put the output elsewhere")
        if _within(base, out_path):
            raise OverlapError(f"input {entry} is inside the output {output}; put the output elsewhere")
        if _within(out_path, base) and (not has_magic(path) or _glob_reaches(path, base, out_path)):
            raise OverlapError(
                f"output {output} is inside the input {entry}: each run would read its own output "
                "parts as new input; put the output outside the input"
            )


def _location(entry: str) -> tuple[str, str]:
    fs, path = url_to_fs(entry)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if isinstance(fs, LocalFileSystem):
        path = os.path.realpath(path)  # symlinks too: one folder, one spelling
    return protocol, path.rstrip("/")


def _static_prefix(path: str) -> str:
    """The folder a glob searches: its components before the first one with a wildcard."""
    parts = path.split("/")
    fixed = next((i for i, part in enumerate(parts) if has_magic(part)), len(parts))
    return "/".join(parts[:fixed])


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _glob_reaches(pattern: str, base: str, output: str) -> bool:
    """Whether a glob would match the output folder, a folder above it (searched recursively) or a part in it."""
    regex = re.compile(glob_translate(pattern))
    folders = [output]
    while folders[-1] != base and "/" in folders[-1]:
        folders.append(folders[-1].rsplit("/", 1)[0])
    return any(regex.match(candidate) for candidate in [*folders, f"{output}/part-0.parquet"])


@dataclass(frozen=True)
class InputRow:
    """One (input row, instruction) pair; the instruction is not validated here (a bad one becomes an error row)."""

    id: str | None  # None only when the id column holds a null: the row must become an invalid_input error row
    image: str | bytes | None
    instruction: object
    passthrough: dict = field(default_factory=dict)
    row_index: int = 0  # index of the input row within its shard
    question_id: str | None = None  # the name of a fixed question (annotate jobs)
    derived_id: str | None = None  # with an id column: the id derive_row_id gives the row (joins back null ids)
    problem: RowError | None = None  # why the row cannot be run (a template's column empty, a sample without image)


def read_unit(
    unit: WorkUnit, mapping: ColumnMapping, fixed_instructions: Sequence[str] | Mapping[str, str] | None = None
) -> list[InputRow]:
    """The unit's rows, one InputRow per (row, instruction): per-row instructions from the mapping's column, or
    every one of fixed_instructions for each row, in order (a mapping names them: question_id -> question), their
    templates filled from the row (pipeline.template). For a redo (unit.redo), only the rows at those positions."""
    if (fixed_instructions is None) == (mapping.instruction_column is None):
        raise ValueError(
            "give either an instruction column or fixed instructions (a prompt or questions), exactly one of the two"
        )
    if fixed_instructions is not None and len(fixed_instructions) == 0:
        raise ValueError("fixed_instructions is empty: give at least one prompt or question")
    templates = parse_all(fixed_instructions)
    wanted = list(dict.fromkeys([*mapping.input_columns(), *columns_of(templates.values())]))
    problems: list[str | None] = [None] * unit.num_rows
    if unit.tar is not None:
        try:
            columns, problems = read_slice(
                unit.shard, unit.tar, unit.schema, mapping.image_column, mapping.image_extension
            )
        except TarChanged as e:
            raise ShardChanged(f"{e}; unit {unit.unit_id} is not committed") from None
    else:
        table = _read_planned(unit, wanted)
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
    rows = []
    for offset in range(unit.num_rows):
        row_index = unit.first_row + offset
        derived = derive_row_id(unit.shard_id, row_index)
        if unit.tar is not None and mapping.id_column is None:
            row_id, derived_id = columns[KEY_COLUMN][offset], None  # the sample's key
        elif mapping.id_column is None:
            row_id, derived_id = derived, None
        else:
            value = columns[mapping.id_column][offset]
            row_id, derived_id = (None if value is None else str(value)), derived
        image = columns[mapping.image_column][offset]
        for question_id, instruction in _instructions(fixed_instructions, columns, mapping, offset):
            instruction, problem = _filled(
                templates.get(instruction) if isinstance(instruction, str) else None,  # only fixed ones have any
                instruction,
                columns,
                offset,
                mapping.missing,
            )
            sample_problem = problems[offset]
            if sample_problem is not None:
                problem = RowError("invalid_input", sample_problem)
            passthrough = {name: columns[name][offset] for name in mapping.passthrough}
            rows.append(InputRow(row_id, image, instruction, passthrough, row_index, question_id, derived_id, problem))
    return rows if unit.redo is None else [rows[position] for position in unit.redo]


def _filled(
    template: Template | None, instruction: object, columns: dict, offset: int, missing: str
) -> tuple[object, RowError | None]:
    """A fixed instruction with its template filled from the row at `offset`; or the template unfilled and why."""
    if template is None:
        return instruction, None  # a row's own question is data: its braces are its own
    try:
        return template.fill({name: columns[name][offset] for name in template.columns}, missing), None
    except RowError as err:
        return instruction, err


def _read_planned(unit: WorkUnit, columns: list[str]) -> pa.Table:
    """The unit's row groups, read only if the shard holds the content it was planned from. The rows and the
    fingerprint, taken before and after them, come through one open file (a local file replaced by a rename stays
    the file opened; s3fs reads every range of an object under the ETag it opened), so a shard rewritten at any
    moment is refused rather than read under the old content's unit ids, whose rows the next run would commit
    again. Ranges are read as asked ("none" cache): fsspec's read-ahead would fetch blocks the unit never uses."""
    fs, path = url_to_fs(unit.shard)

    def check(f: IO[bytes], when: str) -> None:
        try:
            now = _open_fingerprint(f)
        except (OSError, ValueError) as exc:
            now = f"unreadable ({type(exc).__name__})"
        if unit.shard_id and now != unit.shard_id:
            raise ShardChanged(
                f"{unit.shard}: its content changed {when} (fingerprint {now}, planned "
                f"{unit.shard_id}); unit {unit.unit_id} is not committed: run again to plan the "
                "shard's new content"
            )

    with fs.open(path, "rb", cache_type="none") as f:
        check(f, "after planning")
        try:
            table = _rows_of(pq.ParquetFile(f), unit, columns)
        except (OSError, pa.ArrowInvalid):  # s3fs's FileExpired, a torn file: say so if the content changed
            check(f, "while its rows were read")
            raise
        check(f, "while its rows were read")
    if table.num_rows != unit.num_rows:
        raise ShardChanged(
            f"{unit.shard}: row groups {unit.row_groups} hold {table.num_rows} rows, planned "
            f"{unit.num_rows}; the shard changed after planning"
        )
    return table


def _rows_of(parquet: pq.ParquetFile, unit: WorkUnit, columns: list[str]) -> pa.Table:
    """The unit's rows: its row groups whole, or its row range of one, read a batch at a time so that a row group far
    larger than a unit is never held whole (fewer rows than planned when the group holds fewer)."""
    if unit.group_range is None:
        return parquet.read_row_groups(list(unit.row_groups), columns=columns)
    start, stop = unit.group_range
    pieces, at = [], 0
    for batch in parquet.iter_batches(
        batch_size=min(stop - start, 1024), row_groups=list(unit.row_groups), columns=columns, use_threads=False
    ):
        if at + batch.num_rows > start:
            pieces.append(batch.slice(max(start - at, 0), stop - max(start, at)))
        at += batch.num_rows
        if at >= stop:
            break
    return pa.Table.from_batches(pieces) if pieces else parquet.schema_arrow.empty_table().select(columns)


def _instructions(
    fixed: Sequence[str] | Mapping[str, str] | None, columns: dict, mapping: ColumnMapping, offset: int
) -> list[tuple[str | None, object]]:
    if fixed is None:
        return [(None, columns[mapping.instruction_column][offset])]
    if isinstance(fixed, Mapping):
        return list(fixed.items())
    return [(None, text) for text in fixed]
