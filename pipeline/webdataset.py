"""WebDataset tar shards as input: one scan of the tar headers plans the units, a unit reads its byte range.

A WebDataset shard is a plain (uncompressed) tar whose members are named KEY.EXTENSION: the members sharing a key (the
name up to the first dot of its last part, directories included, as the `webdataset` package reads them) make one
sample. A sample's row has the columns
- `__key__`: the key (the row id unless `[input] id_column` names another column);
- the image column (`[input] image_column`, as for Parquet): the bytes of the sample's image member, the one with an
  image extension (jpg, jpeg, png, webp), or with `[input] image_extension` exactly;
- `txt`, `cls`: the text of those members; and every top-level field of the `.json` member.

Planning (scan) reads the tar's headers and its small members (.json, .txt, .cls: their column names and types) once;
the samples are cut into units of at most rows_per_unit, each the byte range of its members, which read_slice reads
in one request. Identity is the content: a fingerprint of the tar's size, its first and last SAMPLE_BYTES and the
member listing, so a renamed or copied tar plans the same unit ids. Compressed tars (.tar.gz) are refused: a unit
could not read its byte range without decompressing everything before it.

Per-sample problems become that row's `invalid_input` error, the rest of the shard going on: no image member, two of
them, a `.json` that is not an object, a member the tar cuts short, a member name without a key. A tar whose headers
become unreadable part way keeps the samples before; the rest is one error row (`KEYLESS_ID`: the tar and the byte).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

import pyarrow as pa
from fsspec.core import url_to_fs

from blipbatch.errors import BlipbatchError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "cls")
KEY_COLUMN = "__key__"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SAMPLE_BYTES = 256 * 1024  # as for Parquet shards: the first and last bytes a fingerprint hashes
_GZIP_MAGIC = b"\x1f\x8b"


class TarError(BlipbatchError, ValueError):
    """A WebDataset shard that cannot be read at all: not a tar, or compressed."""


@dataclass(frozen=True)
class Member:
    name: str  # the member's name in the tar
    offset: int  # where its data starts in the tar
    size: int


@dataclass(frozen=True)
class Sample:
    key: str
    members: tuple[Member, ...]
    problem: str | None = None  # why the sample cannot be read (its row becomes an invalid_input error)


@dataclass(frozen=True)
class TarSlice:
    """A unit's samples and the byte range holding their members."""

    start: int
    end: int
    samples: tuple[Sample, ...]
    quick_id: str  # the fingerprint of the tar's size and sampled bytes, checked again when the slice is read


@dataclass(frozen=True)
class TarIndex:
    samples: list[Sample]
    shard_id: str
    quick_id: str
    schema: pa.Schema  # the columns the samples offer


def is_tar(shard: str, format: str | None) -> bool:
    """Whether `shard` is read as WebDataset: `format` says so, or (None) its name ends in .tar (or .tar.gz, .tgz:
    refused with the reason when read)."""
    if format is not None:
        return format == "webdataset"
    return shard.lower().endswith(TAR_SUFFIXES)


def split_name(name: str) -> tuple[str | None, str]:
    """(key, extension) of a member name, as the webdataset package splits it: the key is the name up to the first
    dot of its last part; None when that part has no dot or starts with one."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _sampled(f: IO[bytes], size: int) -> list[bytes]:
    ranges = [(0, size)] if size <= 2 * SAMPLE_BYTES else [(0, SAMPLE_BYTES), (size - SAMPLE_BYTES, size)]
    out = []
    for start, end in ranges:
        f.seek(start)
        out.append(f.read(end - start))
    return out


def _quick_id(size: int, samples: Sequence[bytes]) -> str:
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    for data in samples:
        digest.update(data)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class _Scan:
    """What reading a tar's headers gives, before samples are made of it: what IndexCache keeps."""

    members: list[Member]
    columns: list[pa.Field]  # of its .json/.txt/.cls members
    end_problem: tuple[int, str] | None

    def to_json(self) -> bytes:
        columns = base64.b64encode(pa.schema(self.columns).serialize().to_pybytes()).decode()
        return json.dumps(
            {
                "members": [[m.name, m.offset, m.size] for m in self.members],
                "columns": columns,
                "end_problem": self.end_problem,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> _Scan:
        raw = json.loads(data)
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(raw["columns"])))
        end = raw["end_problem"]
        return cls([Member(*m) for m in raw["members"]], list(schema), None if end is None else tuple(end))


class IndexCache:
    """Scans of tars kept in the output, `_webdataset/QUICK_ID.json` (QUICK_ID: the tar's size and first and last
    bytes), so that a later run plans without reading each tar again. Scans made now are written by the run once it
    starts (`new`), so that a run that cannot start leaves the output as it found it."""

    FOLDER = "_webdataset"

    def __init__(self, output: str) -> None:
        self.output = output.rstrip("/")
        self.new: dict[str, bytes] = {}  # path below the output -> the scan as JSON

    def get(self, quick_id: str) -> _Scan | None:
        fs, root = url_to_fs(self.output)
        try:
            return _Scan.from_json(fs.cat_file(f"{root}/{self.FOLDER}/{quick_id}.json"))
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowInvalid):
            return None  # none yet, or unreadable: scan the tar

    def put(self, quick_id: str, scanned: _Scan) -> None:
        self.new[f"{self.FOLDER}/{quick_id}.json"] = scanned.to_json()


def scan(
    shard: str, image_column: str, image_extension: str | None = None, cache: IndexCache | None = None
) -> TarIndex:
    """The samples of a WebDataset shard, its fingerprint and its columns; TarError when it is no tar at all."""
    fs, path = url_to_fs(shard)
    with fs.open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        if f.read(2) == _GZIP_MAGIC:
            raise TarError(
                f"{shard}: a compressed tar; WebDataset shards are read by byte range, so they must be "
                "plain tars: decompress it (gunzip) first"
            )
        quick_id = _quick_id(size, _sampled(f, size))
        scanned = cache.get(quick_id) if cache is not None else None
        if scanned is None:
            f.seek(0)
            members, values, end_problem = _members(f, shard, size)
            scanned = _Scan(members, _columns(values), end_problem)
            if cache is not None:
                cache.put(quick_id, scanned)
    samples = _samples(scanned.members, size, image_extension)
    if scanned.end_problem is not None:
        samples.append(Sample(f"{shard.rsplit('/', 1)[-1]}@{scanned.end_problem[0]}", (), scanned.end_problem[1]))
    listing = "\n".join(f"{m.name}\t{m.offset}\t{m.size}" for m in scanned.members).encode()
    shard_id = hashlib.sha256(quick_id.encode() + listing).hexdigest()[:16]
    fields = [f for f in scanned.columns if f.name not in (KEY_COLUMN, image_column)]
    schema = pa.schema([pa.field(KEY_COLUMN, pa.string()), pa.field(image_column, pa.binary()), *fields])
    return TarIndex(samples, shard_id, quick_id, schema)


_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # tar type flags of regular files
_LONG_NAME = b"L"  # GNU: the next member's name is this member's data
_PAX = b"x"  # POSIX: the next member's attributes ("path=...") are this member's data


class _BadHeader(Exception):
    pass


def _number(field: bytes) -> int:
    """A tar header's numeric field: octal text, or base-256 when its first byte has the high bit set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _BadHeader(f"bad number {text[:20]!r}") from None


def _header(block: bytes) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a tar header block; _BadHeader when its checksum does not hold."""
    stored = _number(block[148:156])
    computed = sum(block[:148]) + 8 * 32 + sum(block[156:])  # the checksum field counts as spaces
    if stored != computed:
        raise _BadHeader("bad checksum")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), _number(block[124:136]), block[156:157]


def _pax_path(data: bytes) -> str | None:
    """The "path" record of a pax header's data ("LENGTH path=NAME\n" records)."""
    at = 0
    while at < len(data):
        length = int(data[at:].split(b" ", 1)[0] or b"0")
        if length <= 0:
            return None
        record = data[at : at + length]
        key, _, value = record.split(b" ", 1)[1].partition(b"=")
        if key == b"path":
            return value.rstrip(b"\n").decode("utf-8", "surrogateescape")
        at += length
    return None


def _members(f: IO[bytes], shard: str, size: int) -> tuple[list[Member], dict[str, list], tuple[int, str] | None]:
    """The tar's regular members; the values of its small text members by column; and (byte, why) where its headers
    became unreadable, if they did. Parsed here, not by tarfile: its pure-Python headers took 0.3 ms a member, and it
    ends quietly at a header it cannot read."""
    members: list[Member] = []
    values: dict[str, list] = {}
    offset, long_name = 0, None
    while True:
        f.seek(offset)
        block = f.read(_BLOCK)
        if 0 < len(block) < _BLOCK and block.strip(b"\0") and offset > 0:
            return (
                members,
                values,
                (offset, f"the tar ends inside a header at byte {offset}: the samples after it cannot be read"),
            )
        if len(block) < _BLOCK or not block.strip(b"\0"):
            if offset == 0:
                raise TarError(
                    f"{shard}: not a tar (empty); a WebDataset shard is a plain tar of KEY.EXTENSION members"
                )
            return members, values, None  # the end: zeros, or nothing (a tar cut after its last member's data)
        try:
            name, length, flag = _header(block)
        except _BadHeader as e:
            if offset == 0:
                raise TarError(
                    f"{shard}: not a tar ({e} in its first header); a WebDataset shard is a plain tar of "
                    "KEY.EXTENSION members"
                ) from None
            return (
                members,
                values,
                (offset, f"the tar is unreadable from byte {offset} on ({e}): the samples after it cannot be read"),
            )
        data_at = offset + _BLOCK
        offset = data_at + -(-length // _BLOCK) * _BLOCK
        if flag in (_LONG_NAME, _PAX):
            f.seek(data_at)
            data = f.read(length)
            try:
                long_name = (
                    data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    if flag == _LONG_NAME
                    else _pax_path(data)
                )
            except (ValueError, IndexError) as e:
                return (
                    members,
                    values,
                    (
                        data_at - _BLOCK,
                        f"the tar is unreadable from byte {data_at - _BLOCK} on "
                        f"(a broken pax header: {e}): the samples after it "
                        "cannot be read",
                    ),
                )
            continue
        name, long_name = long_name or name, None
        if flag not in _REGULAR:
            continue  # directories, links, global pax headers
        members.append(Member(name, data_at, length))
        key, extension = split_name(name)
        if key is not None and extension in (*TEXT_EXTENSIONS, "json") and data_at + length <= size:
            f.seek(data_at)
            _collect(values, extension, f.read(length))


def _collect(values: dict[str, list], extension: str, data: bytes) -> None:
    if extension != "json":
        values.setdefault(extension, []).append(data.decode("utf-8", "replace"))
        return
    try:
        parsed = json.loads(data)
    except ValueError:
        return  # the sample's row says so when read
    if isinstance(parsed, dict):
        for name, value in parsed.items():
            values.setdefault(name, []).append(value)


def _columns(values: dict[str, list]) -> list[pa.Field]:
    """A column per .json field and text extension, typed from its values (mixed types: string)."""
    fields = []
    for name, seen in values.items():
        try:
            kind = pa.array(seen).type
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            kind = pa.string()  # mixed types: the values as JSON text
        fields.append(pa.field(name, pa.string() if pa.types.is_null(kind) else kind))
    return fields


def _samples(members: Sequence[Member], size: int, image_extension: str | None) -> list[Sample]:
    grouped: dict[str, list[Member]] = {}
    samples = []
    for member in members:
        key, _ = split_name(member.name)
        if key is None:
            samples.append(
                Sample(
                    member.name,
                    (member,),
                    f"member {member.name!r} has no key: WebDataset members are named KEY.EXTENSION",
                )
            )
            continue
        grouped.setdefault(key, []).append(member)
    for key, group in grouped.items():
        samples.append(Sample(key, tuple(group), _problem(key, group, size, image_extension)))
    return samples


def _problem(key: str, members: Sequence[Member], size: int, image_extension: str | None) -> str | None:
    names = ", ".join(m.name for m in members)
    extensions = [split_name(m.name)[1] for m in members]
    repeated = sorted({e for e in extensions if extensions.count(e) > 1})
    if repeated:
        return (
            f"sample {key!r} has {len(members)} members with extension {repeated[0]!r} ({names}); keys must be unique"
        )
    wanted = (image_extension.lower().lstrip("."),) if image_extension else IMAGE_EXTENSIONS
    images = [m for m, e in zip(members, extensions) if e in wanted]
    if not images:
        which = f".{wanted[0]}" if image_extension else "image (jpg, jpeg, png, webp)"
        return f"sample {key!r} has no {which} member (its members: {names}); [input] image_extension names another"
    if len(images) > 1:
        return (
            f"sample {key!r} has {len(images)} images ({', '.join(m.name for m in images)}): set [input] "
            "image_extension to the one to read"
        )
    for member in members:
        if member.offset + member.size > size:
            return (
                f"member {member.name!r} is cut short: the tar ends {size - member.offset} bytes into its {member.size}"
            )
    return None


def slices(index: TarIndex, max_rows: int) -> list[tuple[int, TarSlice]]:
    """The index's samples in runs of at most max_rows, each with the index of its first sample."""
    out = []
    for first in range(0, len(index.samples), max_rows):
        samples = tuple(index.samples[first : first + max_rows])
        spans = [(m.offset, m.offset + m.size) for s in samples if s.problem is None for m in s.members]
        start, end = (min(a for a, _ in spans), max(b for _, b in spans)) if spans else (0, 0)
        out.append((first, TarSlice(start, end, samples, index.quick_id)))
    return out


class TarChanged(BlipbatchError, ValueError):
    """A tar whose content is not what its units were planned from."""


def read_slice(
    shard: str, part: TarSlice, schema: pa.Schema, image_column: str, image_extension: str | None
) -> tuple[dict[str, list], list[str | None]]:
    """The columns of `schema` for the slice's samples, and each sample's problem (None: readable)."""
    fs, path = url_to_fs(shard)
    with fs.open(path, "rb", cache_type="none") as f:
        size = f.seek(0, os.SEEK_END)
        if _quick_id(size, _sampled(f, size)) != part.quick_id:
            raise TarChanged(f"{shard}: its content changed after planning; run again to plan its new content")
        f.seek(part.start)
        data = f.read(part.end - part.start)
    wanted = (image_extension.lower().lstrip("."),) if image_extension else IMAGE_EXTENSIONS
    rows: list[dict] = []
    problems: list[str | None] = []
    for sample in part.samples:
        row, problem = {KEY_COLUMN: sample.key}, sample.problem
        for member in sample.members if problem is None else ():
            body = data[member.offset - part.start : member.offset - part.start + member.size]
            _, extension = split_name(member.name)
            if extension in wanted:
                row[image_column] = body
            elif extension in TEXT_EXTENSIONS:
                row[extension] = body.decode("utf-8", "replace")
            elif extension == "json":
                try:
                    fields = json.loads(body)
                except ValueError as e:
                    problem = f"member {member.name!r} is not JSON: {e}"
                    continue
                if not isinstance(fields, dict):
                    problem = f"member {member.name!r} holds a JSON {type(fields).__name__}, not an object"
                    continue
                row.update((k, v) for k, v in fields.items() if k not in (KEY_COLUMN, image_column))
        rows.append(row)
        problems.append(problem)
    columns = {f.name: [_typed(row.get(f.name), f.type) for row in rows] for f in schema}
    return columns, problems


def _typed(value: object, kind: pa.DataType) -> object:
    """A JSON value as the column's type holds it: a value of another type, as JSON text (string columns) or null."""
    if value is None:
        return None
    try:
        pa.array([value], kind)
        return value
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return json.dumps(value) if pa.types.is_string(kind) or pa.types.is_large_string(kind) else None


def read_images(shard: str, rows: Sequence[int], image_extension: str | None) -> dict[int, bytes | None]:
    """The image bytes of the samples at `rows` (indexes in the shard), for the report's gallery."""
    index = scan(shard, "image", image_extension)
    fs, path = url_to_fs(shard)
    wanted = (image_extension.lower().lstrip("."),) if image_extension else IMAGE_EXTENSIONS
    out: dict[int, bytes | None] = {}
    for row in rows:
        members = [m for m in index.samples[row].members if split_name(m.name)[1] in wanted]
        out[row] = fs.cat_file(path, members[0].offset, members[0].offset + members[0].size) if members else None
    return out
