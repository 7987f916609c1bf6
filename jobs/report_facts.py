"""What `blipbatch report` shows, read from an output: the recorded job, commit markers, failed units, error
examples, a seeded sample of images with thumbnails, per-worker timing and throughput (see jobs/report.py for the
page). Thumbnails are fetched and decoded by the pipeline's own Fetcher and decode_image, under the caller's
FetchConfig (the address guard included). The output folder may be writable by others (a shared bucket), so what it
holds widens nothing: the manifest's recorded [fetch] is used only where the caller chooses it (`owned_by_caller`),
and an input shard named by a commit marker is read under the same rules as an image reference. Only committed units
are read, so a report of a run in progress shows what is committed so far.
"""

from __future__ import annotations

import base64
import bisect
import io
import itertools
import math
import os
import random
import re
import stat
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from blipbatch.errors import BlipbatchError
from blipbatch.pipeline.decode import DecodeConfig, decode_image
from blipbatch.pipeline.errors import RowError
from blipbatch.pipeline.fetch import FetchConfig, Fetcher
from blipbatch.pipeline.guard import LocalRoots
from blipbatch.pipeline.lock import LockInfo, OutputLock
from blipbatch.pipeline.manifest import ManifestError, read_manifest, recorded_runs
from blipbatch.pipeline.shards import WorkUnit, discover_shards, plan_units
from blipbatch.pipeline.sink import failed_units, part_schema, progress_records, read_part
from blipbatch.pipeline.webdataset import IndexCache, is_tar, read_images
from blipbatch.schemas import ColumnMapping, ProgressRecord

from .report_closed_set import ClosedSetStats, closed_set_stats

THUMBNAIL_PX = 192  # longest side of a gallery thumbnail
EXAMPLES_PER_KIND = 3
MAX_EXAMPLE_PARTS = 20  # parts read for error examples at most, so a report of a huge output stays quick
THROUGHPUT_BINS = 60
# schemas.image_reference's stand-in for an image given as bytes; redact()'s mark in a reference it cleaned.
_BYTES_NOTE = re.compile(r"<\d+ bytes>")
_REDACTED = "REDACTED"
# A gallery image's source: a reference or bytes as the image column holds them, or why it cannot be read.
ImageSource = str | bytes | RowError | None


class ReportError(BlipbatchError, ValueError):
    """OUTPUT is not a blipbatch output, or its commit markers cannot be read."""


def planned_units(settings: dict, output: str | None = None) -> list[WorkUnit]:
    """The work units of the input a manifest's settings name, cut as the run cut them (WebDataset tars from the
    scans `output` keeps, where it has them)."""
    return plan_units(
        discover_shards(settings["input"]),
        ColumnMapping(**settings["mapping"]),
        settings["rows_per_unit"],
        None if output is None else IndexCache(output),
    )


@dataclass(frozen=True)
class Totals:
    rows_ok: int
    rows_error: int
    errors_by_kind: dict[str, int]
    images_encoded: int
    duplicate_images: int  # input rows whose image bytes an earlier row of their unit had


def totals(records: Sequence[ProgressRecord]) -> Totals:
    """Rows ok and in error, errors by kind, vision passes and duplicate images over committed units."""
    kinds: Counter[str] = Counter()
    for record in records:
        kinds.update(record.errors_by_kind)
    return Totals(
        sum(r.rows_ok for r in records),
        sum(r.rows_error for r in records),
        dict(sorted(kinds.items())),
        sum(r.images_encoded for r in records),
        sum(r.duplicate_images for r in records),
    )


# -------------------------------------------------------------------------------------------------- what is read


@dataclass
class GalleryItem:
    """One sampled image and the output rows of its instructions."""

    row_id: str | None
    reference: str | None  # as the output holds it (redacted)
    rows: list[dict]
    thumbnail: str | None = None  # a data: URI
    problem: str | None = None  # why there is no thumbnail


@dataclass
class RunData:
    output: str
    settings: dict
    records: list[ProgressRecord]
    failed: dict[str, dict]
    units_planned: int | None  # None: the input could not be listed from here
    input_problem: str | None
    lock: LockInfo | None
    gallery: list[GalleryItem] = field(default_factory=list)
    examples: dict[str, list[dict]] = field(default_factory=dict)
    generated_at: float = 0.0
    runs: list[dict] = field(default_factory=list)  # the runs' wall times (pipeline.manifest.record_run)
    closed_sets: list[ClosedSetStats] = field(default_factory=list)  # per closed-set question: wins and thresholds


def owned_by_caller(output: str) -> bool:
    """Whether `output` is a folder on local disk that only this user can write, its manifest too: then no one else
    can have written the [fetch] settings it records."""
    fs, path = url_to_fs(output)
    if not isinstance(fs, LocalFileSystem):
        return False
    try:
        stats = [os.lstat(path), os.lstat(os.path.join(path, "_manifest.json"))]
    except OSError:
        return False
    return (
        all(s.st_uid == os.getuid() and not s.st_mode & (stat.S_IWGRP | stat.S_IWOTH) for s in stats)
        and stat.S_ISDIR(stats[0].st_mode)
        and stat.S_ISREG(stats[1].st_mode)
    )


def collect(output: str, sample: int = 24, fetch: FetchConfig | None = None, seed: int = 0) -> RunData:
    """Read what the report shows from `output`; raises ReportError if it is not a blipbatch output. Thumbnails are
    fetched under `fetch` (default: FetchConfig's defaults, never what the output records: see the module's doc)."""
    try:
        manifest = read_manifest(output)
    except ManifestError as e:
        raise ReportError(f"{e}; is this a blipbatch output?") from None
    if manifest is None:
        raise ReportError(f"{output}: not a blipbatch output (no _manifest.json there)")
    settings = manifest.to_dict()
    try:
        records = sorted(progress_records(output), key=lambda r: r.unit_id)
    except ValueError as e:
        raise ReportError(f"{output}: a commit marker is unreadable: {e}") from None
    failed = failed_units(output)
    try:
        units_planned, input_problem = len(planned_units(settings, output)), None
    except (OSError, ValueError) as e:  # the input moved or is unreachable from here: report the rest
        units_planned, input_problem = None, f"{type(e).__name__}: {e}"
    data = RunData(
        output,
        settings,
        records,
        failed,
        units_planned,
        input_problem,
        OutputLock(output).holder(),
        generated_at=datetime.now(UTC).timestamp(),
        runs=recorded_runs(output),
    )
    image_column = settings["mapping"]["image_column"]
    data.examples = error_examples(output, records, image_column)
    data.closed_sets = closed_set_stats(output, records, settings.get("closed_sets"))
    fetch = fetch or FetchConfig()
    data.gallery = sample_gallery(output, settings, records, sample, fetch, seed)
    return data


def error_examples(
    output: str,
    records: Sequence[ProgressRecord],
    image_column: str,
    per_kind: int = EXAMPLES_PER_KIND,
    max_parts: int = MAX_EXAMPLE_PARTS,
) -> dict[str, list[dict]]:
    """Up to `per_kind` error rows (id, reference, message) of each error kind, from at most `max_parts` parts."""
    examples: dict[str, list[dict]] = defaultdict(list)
    parts_read = 0
    for record in records:
        if not any(len(examples[kind]) < per_kind for kind in record.errors_by_kind):
            continue
        if parts_read == max_parts:
            break
        table = read_part(output, record, ["id", image_column, "error_kind", "error"])
        parts_read += 1
        for row in table.filter(pc.is_valid(table["error_kind"])).to_pylist():
            seen = examples[row["error_kind"]]
            # An image asked several questions fails each the same way: one example per image.
            if len(seen) < per_kind and all(ex["id"] != row["id"] for ex in seen):
                examples[row["error_kind"]].append(
                    {"id": row["id"], "reference": row[image_column], "error": row["error"]}
                )
    return dict(examples)


def sample_gallery(
    output: str, settings: dict, records: Sequence[ProgressRecord], sample: int, fetch: FetchConfig, seed: int = 0
) -> list[GalleryItem]:
    """`sample` input images drawn uniformly (seeded) from the committed units, with thumbnails."""
    sizes = [record.num_rows for record in records]
    ends = list(itertools.accumulate(sizes))
    picks = sorted(random.Random(seed).sample(range(ends[-1]), min(sample, ends[-1]))) if ends else []
    by_record: dict[int, list[int]] = defaultdict(list)
    for pick in picks:
        r = bisect.bisect_right(ends, pick)
        by_record[r].append(pick - (ends[r] - sizes[r]))
    image_column = settings["mapping"]["image_column"]
    columns = ["id", image_column, "instruction", "text", "status", "error_kind", "error"]
    if records and "score" in part_schema(output, records[0].unit_id).names:  # outputs before scores have none
        columns.insert(4, "score")
    if isinstance(settings["instructions"], dict):  # named questions: rows carry their question_id
        columns.insert(3, "question_id")
    items: list[GalleryItem] = []
    sources: list[ImageSource] = []
    from_input: dict[str, dict[int, int]] = defaultdict(dict)  # shard -> {input row: gallery index}
    for r, offsets in sorted(by_record.items()):
        record = records[r]
        table = read_part(output, record, columns)
        per_row = record.rows // record.num_rows  # output rows per input row: one per instruction
        for offset in offsets:
            rows = table.slice(offset * per_row, per_row).to_pylist()
            reference = rows[0][image_column]
            items.append(GalleryItem(rows[0]["id"], reference, rows))
            if reference is not None and (_BYTES_NOTE.fullmatch(reference) or _REDACTED in reference):
                # The output holds no usable reference (image bytes, or a credential cut out): read the input row.
                from_input[record.shard][record.first_row + offset] = len(sources)
            sources.append(reference)
    for shard, rows in from_input.items():
        values: Mapping[int, ImageSource]
        try:
            _check_readable(shard, fetch)
        except RowError as refused:
            values = dict.fromkeys(rows, refused)
        else:
            mapping = settings["mapping"]
            values = (
                read_tar_images(shard, sorted(rows), mapping.get("image_extension"))
                if is_tar(shard, mapping.get("format"))
                else read_input_values(shard, image_column, sorted(rows))
            )
        for row, value in values.items():
            sources[rows[row]] = value
    for item, image in zip(items, thumbnails(sources, fetch)):
        if isinstance(image, RowError):
            item.problem = f"{image.kind}: {image.message}"
        else:
            item.thumbnail = image
    return items


def _check_readable(shard: str, fetch: FetchConfig) -> None:
    """Refuse (RowError) an input shard that `fetch` would not let an image reference read: a commit marker names it,
    and the output's folder may be writable by others."""
    protocol = shard.split("://", 1)[0] if "://" in shard else "file"
    if protocol not in fetch.allowed_schemes:
        raise RowError(
            "blocked_address", f"input shard {shard} refused: {protocol!r} is not in [fetch] allowed_schemes"
        )
    if protocol == "file":
        LocalRoots(fetch.local_roots).resolve(url_to_fs(shard)[1], shard)


def read_input_values(shard: str, column: str, rows: Sequence[int]) -> Mapping[int, ImageSource]:
    """The values of the image column `column` at `rows` (indexes within the shard); a RowError for each when the
    shard is unreadable."""
    try:
        fs, path = url_to_fs(shard)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            starts = [
                0,
                *itertools.accumulate(
                    parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)
                ),
            ]
            values: dict[int, ImageSource] = {}
            for group, wanted in itertools.groupby(rows, key=lambda row: bisect.bisect_right(starts, row) - 1):
                column_values = parquet.read_row_group(group, columns=[column]).column(column)
                values.update((row, column_values[row - starts[group]].as_py()) for row in wanted)
            return values
    except (OSError, ValueError, IndexError, pa.ArrowException) as e:
        problem = RowError("invalid_input", f"cannot read the image from the input shard {shard}: {e}")
        return dict.fromkeys(rows, problem)


def read_tar_images(shard: str, rows: Sequence[int], image_extension: str | None) -> Mapping[int, ImageSource]:
    """The images of the WebDataset samples at `rows`; a RowError for each when the tar is unreadable."""
    try:
        return read_images(shard, rows, image_extension)
    except (OSError, ValueError, IndexError) as e:
        problem = RowError("invalid_input", f"cannot read the image from the input tar {shard}: {e}")
        return dict.fromkeys(rows, problem)


def thumbnails(sources: Sequence[ImageSource], fetch: FetchConfig) -> list[str | RowError]:
    """A JPEG data: URI per image reference, through the pipeline's fetch and decode; a RowError where that fails."""
    fetcher = Fetcher(fetch)
    try:
        todo = {i: source for i, source in enumerate(sources) if not isinstance(source, RowError)}
        fetched = dict(zip(todo, fetcher.fetch_all(list(todo.values()))))
    finally:
        fetcher.close()
    results: list[str | RowError] = []
    for i, source in enumerate(sources):
        data = source if isinstance(source, RowError) else fetched[i]
        if isinstance(data, RowError):
            results.append(data)
            continue
        try:
            image = decode_image(data, DecodeConfig())
        except RowError as e:
            results.append(e)
            continue
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        results.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
    return results


# -------------------------------------------------------------------------------------------------- timing


def union_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Seconds covered by at least one interval: the time something ran, gaps between runs left out."""
    covered, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            covered += stop - max(start, end)
            end = stop
    return covered


@dataclass
class WorkerStats:
    worker: str
    units: int = 0
    rows: int = 0
    images: int = 0
    fetch_s: float = 0.0
    decode_s: float = 0.0
    model_s: float = 0.0
    intervals: list[tuple[float, float]] = field(default_factory=list)
    hosts: set[str] = field(default_factory=set)  # "node (pid)"

    @property
    def busy_s(self) -> float:
        return union_seconds(self.intervals)


def worker_stats(records: Sequence[ProgressRecord]) -> list[WorkerStats]:
    stats: dict[str, WorkerStats] = {}
    for record in records:
        timing = record.timing
        if timing is None:
            continue
        s = stats.setdefault(timing.worker, WorkerStats(timing.worker))
        s.units += 1
        s.rows += record.rows
        s.images += timing.images_fetched
        s.fetch_s += timing.fetch_s
        s.decode_s += timing.decode_s
        s.model_s += timing.model_s
        s.intervals.append((timing.started, timing.finished))
        s.hosts.add(f"{timing.node} (pid {timing.pid})")
    return sorted(stats.values(), key=lambda s: (len(s.worker), s.worker))


def throughput(
    records: Sequence[ProgressRecord], bins: int = THROUGHPUT_BINS
) -> tuple[float, float, dict[str, list[float]]]:
    """(start time, bin width in s, rows/s per bin for "all workers" and for each worker).

    A unit's rows are spread evenly over its start..finish, so a bin gets the share of each unit it overlaps."""
    timed = [(record.rows, record.timing) for record in records if record.timing is not None]
    start = min(t.started for _, t in timed)
    width = max(max(t.finished for _, t in timed) - start, 1e-3) / bins
    series: dict[str, list[float]] = defaultdict(lambda: [0.0] * bins)
    for rows, t in timed:
        rate = rows / max(t.seconds, 1e-9)
        first, last = int((t.started - start) / width), min(int((t.finished - start) / width), bins - 1)
        for b in range(first, last + 1):
            overlap = min(t.finished, start + (b + 1) * width) - max(t.started, start + b * width)
            if overlap > 0:
                for name in ("all workers", f"worker {t.worker}"):
                    series[name][b] += rate * overlap / width
    return start, width, dict(series)
