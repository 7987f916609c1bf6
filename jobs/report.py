"""`blipbatch report OUTPUT`: one self-contained HTML page about a run, finished or still running, local or on an
object store.

It shows the summary (rows ok and in error, units, wall time, images/s), throughput over time and per worker (inline
SVG, from the timing each unit's commit marker records), errors by kind with example rows, failed units, a gallery of
sampled images with their instructions and outputs, and the job's settings from the manifest. Thumbnails are fetched
and decoded by the pipeline's own Fetcher and decode_image, under the caller's FetchConfig (the address guard
included), and embedded as data: URIs: the page loads nothing from anywhere, and its Content-Security-Policy says so.
Only committed units are read, so a report of a run in progress shows what is committed so far.
"""

from __future__ import annotations

import base64
import bisect
import html
import io
import itertools
import json
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from blipbatch.pipeline.decode import DecodeConfig, decode_image
from blipbatch.pipeline.errors import RowError
from blipbatch.pipeline.fetch import FetchConfig, Fetcher
from blipbatch.pipeline.lock import LockInfo, OutputLock
from blipbatch.pipeline.shards import WorkUnit, discover_shards, plan_units
from blipbatch.pipeline.manifest import ManifestError, read_manifest, recorded_job
from blipbatch.pipeline.sink import failed_units, progress_records, read_part
from blipbatch.schemas import ColumnMapping, ProgressRecord
from blipbatch.errors import BlipbatchError

THUMBNAIL_PX = 192  # longest side of a gallery thumbnail
EXAMPLES_PER_KIND = 3
MAX_EXAMPLE_PARTS = 20  # parts read for error examples at most, so a report of a huge output stays quick
THROUGHPUT_BINS = 60
MAX_WORKER_LINES = 8  # more workers: the throughput plot shows only their total (the bar chart shows each)
# schemas.image_reference's stand-in for an image given as bytes; redact()'s mark in a reference it cleaned.
_BYTES_NOTE = re.compile(r"<\d+ bytes>")
_REDACTED = "REDACTED"
_PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d")


class ReportError(BlipbatchError, ValueError):
    """OUTPUT is not a blipbatch output, or its commit markers cannot be read."""


def planned_units(settings: dict) -> list[WorkUnit]:
    """The work units of the input a manifest's settings name, cut as the run cut them."""
    return plan_units(discover_shards(settings["input"]), ColumnMapping(**settings["mapping"]),
                      settings["rows_per_unit"])


@dataclass(frozen=True)
class Totals:
    rows_ok: int
    rows_error: int
    errors_by_kind: dict[str, int]
    images_encoded: int


def totals(records: Sequence[ProgressRecord]) -> Totals:
    """Rows ok and in error, errors by kind and vision passes over committed units."""
    kinds: Counter[str] = Counter()
    for record in records:
        kinds.update(record.errors_by_kind)
    return Totals(sum(r.rows_ok for r in records), sum(r.rows_error for r in records), dict(sorted(kinds.items())),
                  sum(r.images_encoded for r in records))


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


def collect(output: str, sample: int = 24, fetch: FetchConfig | None = None, seed: int = 0) -> RunData:
    """Read what the report shows from `output`; raises ReportError if it is not a blipbatch output. Thumbnails are
    fetched under `fetch`, by default the [fetch] settings the output's manifest recorded."""
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
        units_planned, input_problem = len(planned_units(settings)), None
    except (OSError, ValueError) as e:  # the input moved or is unreachable from here: report the rest
        units_planned, input_problem = None, f"{type(e).__name__}: {e}"
    data = RunData(output, settings, records, failed, units_planned, input_problem, OutputLock(output).holder(),
                   generated_at=datetime.now(timezone.utc).timestamp())
    image_column = settings["mapping"]["image_column"]
    data.examples = error_examples(output, records, image_column)
    fetch = fetch or recorded_job(manifest, output).fetch
    data.gallery = sample_gallery(output, settings, records, sample, fetch, seed)
    return data


def error_examples(output: str, records: Sequence[ProgressRecord], image_column: str,
                   per_kind: int = EXAMPLES_PER_KIND, max_parts: int = MAX_EXAMPLE_PARTS) -> dict[str, list[dict]]:
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
                examples[row["error_kind"]].append({"id": row["id"], "reference": row[image_column],
                                                    "error": row["error"]})
    return dict(examples)


def sample_gallery(output: str, settings: dict, records: Sequence[ProgressRecord], sample: int,
                   fetch: FetchConfig, seed: int = 0) -> list[GalleryItem]:
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
    if isinstance(settings["instructions"], dict):  # named questions: rows carry their question_id
        columns.insert(3, "question_id")
    items: list[GalleryItem] = []
    sources: list[str | bytes | RowError | None] = []
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
        for row, value in read_input_values(shard, image_column, sorted(rows)).items():
            sources[rows[row]] = value
    for item, image in zip(items, thumbnails(sources, fetch)):
        if isinstance(image, RowError):
            item.problem = f"{image.kind}: {image.message}"
        else:
            item.thumbnail = image
    return items


def read_input_values(shard: str, column: str, rows: Sequence[int]) -> dict[int, object]:
    """The values of `column` at `rows` (indexes within the shard); a RowError for each when the shard is unreadable."""
    try:
        fs, path = url_to_fs(shard)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            starts = [0, *itertools.accumulate(parquet.metadata.row_group(g).num_rows
                                               for g in range(parquet.metadata.num_row_groups))]
            values: dict[int, object] = {}
            for group, wanted in itertools.groupby(rows, key=lambda row: bisect.bisect_right(starts, row) - 1):
                column_values = parquet.read_row_group(group, columns=[column]).column(column)
                values.update((row, column_values[row - starts[group]].as_py()) for row in wanted)
            return values
    except (OSError, ValueError, IndexError, pa.ArrowException) as e:
        problem = RowError("invalid_input", f"cannot read the image from the input shard {shard}: {e}")
        return dict.fromkeys(rows, problem)


def thumbnails(sources: Sequence[str | bytes | RowError | None], fetch: FetchConfig) -> list[str | RowError]:
    """A JPEG data: URI per image reference, through the pipeline's fetch and decode; a RowError where that fails."""
    fetcher = Fetcher(fetch)
    try:
        todo = [i for i, source in enumerate(sources) if not isinstance(source, RowError)]
        fetched = dict(zip(todo, fetcher.fetch_all([sources[i] for i in todo])))
    finally:
        fetcher.close()
    results: list[str | RowError] = []
    for i, source in enumerate(sources):
        data = fetched.get(i, source)
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


def _union_seconds(intervals: Sequence[tuple[float, float]]) -> float:
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
        return _union_seconds(self.intervals)


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


def throughput(records: Sequence[ProgressRecord], bins: int = THROUGHPUT_BINS) -> tuple[float, float, dict[str, list[float]]]:
    """(start time, bin width in s, rows/s per bin for "all workers" and for each worker).

    A unit's rows are spread evenly over its start..finish, so a bin gets the share of each unit it overlaps."""
    timed = [r for r in records if r.timing is not None]
    start = min(r.timing.started for r in timed)
    width = max(max(r.timing.finished for r in timed) - start, 1e-3) / bins
    series: dict[str, list[float]] = defaultdict(lambda: [0.0] * bins)
    for record in timed:
        t = record.timing
        rate = record.rows / max(t.seconds, 1e-9)
        first, last = int((t.started - start) / width), min(int((t.finished - start) / width), bins - 1)
        for b in range(first, last + 1):
            overlap = min(t.finished, start + (b + 1) * width) - max(t.started, start + b * width)
            if overlap > 0:
                for name in ("all workers", f"worker {t.worker}"):
                    series[name][b] += rate * overlap / width
    return start, width, dict(series)


# -------------------------------------------------------------------------------------------------- SVG


def _nice_step(maximum: float, ticks: int = 5) -> float:
    raw = max(maximum, 1e-9) / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def line_chart(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, title: str) -> str:
    """An SVG line chart: one polyline per series of (x, y) points, axes with round ticks, a legend."""
    width, height, left, right, top, bottom = 760, 280, 64, 150, 16, 44
    x_max = max((x for points in series.values() for x, _ in points), default=1.0) or 1.0
    peak = max((y for points in series.values() for _, y in points), default=1.0)
    y_step = _nice_step(peak)
    y_max = y_step * max(1, math.ceil(peak / y_step))
    x_step = _nice_step(x_max)
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + plot_w * x / x_max

    def sy(y: float) -> float:
        return top + plot_h * (1 - y / y_max)

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>']
    for k in range(int(round(y_max / y_step)) + 1):
        y = sy(k * y_step)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_number(k * y_step)}</text>')
    for k in range(int(x_max / x_step) + 1):
        x = sx(k * x_step)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" class="axis"/>'
                     f'<text x="{x:.1f}" y="{top + plot_h + 18}" text-anchor="middle">{_number(k * x_step)}</text>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" class="axis"/>'
                 f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">{html.escape(x_label)}</text>'
                 f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                 f'{html.escape(y_label)}</text>')
    for i, (name, points) in enumerate(series.items()):
        colour = _PALETTE[i % len(_PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        dash = "" if i == 0 else ' stroke-dasharray="5 3"'
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="{2.5 if i == 0 else 1.5}"'
                     f'{dash}><title>{html.escape(name)}</title></polyline>'
                     f'<rect x="{width - right + 14}" y="{top + 4 + i * 18}" width="12" height="12" fill="{colour}"/>'
                     f'<text x="{width - right + 32}" y="{top + 14 + i * 18}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(bars: Sequence[tuple[str, float]], unit: str, title: str) -> str:
    """An SVG horizontal bar chart, one labelled bar per (label, value)."""
    width, left, right, bar, gap = 760, 110, 120, 22, 8
    height = len(bars) * (bar + gap) + gap
    peak = max((value for _, value in bars), default=0.0) or 1.0
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>']
    for i, (label, value) in enumerate(bars):
        y = gap + i * (bar + gap)
        length = (width - left - right) * value / peak
        parts.append(f'<text x="{left - 8}" y="{y + bar / 2 + 4}" text-anchor="end">{html.escape(label)}</text>'
                     f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar}" '
                     f'fill="{_PALETTE[i % len(_PALETTE)]}"/>'
                     f'<text x="{left + length + 6:.1f}" y="{y + bar / 2 + 4}">{_number(value)} {html.escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# -------------------------------------------------------------------------------------------------- HTML


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3g} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _short(text: str | None, limit: int = 120) -> str:
    text = "" if text is None else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_state(data: RunData) -> tuple[str, str]:
    """(css class, sentence) saying whether the run is finished, running, or stopped part-way."""
    if data.lock is not None and data.lock.is_live():
        return "running", f"In progress: a run holds this output ({data.lock.describe()}); showing what is committed."
    if data.units_planned is None:
        return "unknown", f"Pending units unknown: the input cannot be listed from here ({data.input_problem})."
    pending = data.units_planned - len(data.records) - len(data.failed)
    if pending > 0:
        return "incomplete", (f"Incomplete: {pending} of {data.units_planned} units not committed yet, and no run "
                              "holds the output. Run the job again to resume.")
    if data.failed:
        return "failed", f"Finished with {len(data.failed)} failed unit(s) (blipbatch retry-failed redoes them)."
    return "finished", f"Finished: all {data.units_planned} units committed."


def _summary(data: RunData) -> str:
    total = totals(data.records)
    timed = [r.timing for r in data.records if r.timing is not None]
    cards = [("rows ok", f"{total.rows_ok:,}"), ("rows in error", f"{total.rows_error:,}"),
             ("units committed", f"{len(data.records):,}"
              + ("" if data.units_planned is None else f" of {data.units_planned:,}")),
             ("units failed", f"{len(data.failed):,}")]
    notes = []
    if timed:
        wall = _union_seconds([(t.started, t.finished) for t in timed])
        images = sum(t.images_fetched for t in timed)
        rows = sum(r.rows for r in data.records if r.timing is not None)
        cards += [("wall time", _duration(wall)), ("images/s", _number(images / wall) if wall else "–"),
                  ("rows/s", _number(rows / wall) if wall else "–")]
        notes.append(f"From {_when(min(t.started for t in timed))} to {_when(max(t.finished for t in timed))}; "
                     "wall time counts the time units were running (gaps between runs left out).")
        if len(timed) < len(data.records):
            notes.append(f"{len(data.records) - len(timed)} unit(s) were committed without timing (an earlier "
                         "version of blipbatch) and are left out of the rates.")
    else:
        finished = sorted(r.finished_at for r in data.records if r.finished_at)
        if finished:
            notes.append(f"Units committed between {finished[0]} and {finished[-1]}. Their commit markers hold no "
                         "timing (written by an earlier version of blipbatch), so wall time and rates are unknown.")
    body = "".join(f'<div class="card"><div class="value">{_e(value)}</div><div class="label">{_e(label)}</div></div>'
                   for label, value in cards)
    return (f'<section id="summary"><h2>Summary</h2><div class="cards">{body}</div>'
            + "".join(f'<p class="note">{_e(note)}</p>' for note in notes) + "</section>")


def _timing_sections(data: RunData) -> str:
    timed = [r for r in data.records if r.timing is not None]
    if not timed:
        note = ("No unit of this output recorded its timing (its commit markers were written by an earlier version "
                "of blipbatch), so there is no throughput plot." if data.records else "No unit is committed yet.")
        return f'<section id="throughput"><h2>Throughput</h2><p class="note no-timing">{_e(note)}</p></section>'
    start, width, series = throughput(timed)
    points = {name: [(width * (b + 0.5), value) for b, value in enumerate(values)] for name, values in series.items()}
    if len(points) == 2 or len(points) > MAX_WORKER_LINES + 1:  # one worker's line is the total's; many are a blur
        points = {"all workers": points["all workers"]}
    chart = line_chart(points, f"seconds since {_when(start)}", "output rows / s", "Throughput over time")
    stats = worker_stats(timed)
    bars = bar_chart([(f"worker {s.worker}", s.rows / s.busy_s if s.busy_s else 0.0) for s in stats], "rows/s",
                     "Rows per second of each worker, over the time it was busy")
    head = ("worker", "host (pid)", "units", "rows", "images", "busy", "rows/s", "images/s", "fetch s", "decode s",
            "model s")
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in (
            s.worker, ", ".join(sorted(s.hosts)), f"{s.units:,}", f"{s.rows:,}", f"{s.images:,}", _duration(s.busy_s),
            _number(s.rows / s.busy_s) if s.busy_s else "–", _number(s.images / s.busy_s) if s.busy_s else "–",
            f"{s.fetch_s:.2f}", f"{s.decode_s:.2f}", f"{s.model_s:.2f}")) + "</tr>"
        for s in stats)
    table = f'<table><tr>{"".join(f"<th>{_e(h)}</th>" for h in head)}</tr>{rows}</table>'
    return (f'<section id="throughput"><h2>Throughput</h2>{chart}<p class="note">Each unit\'s rows are spread evenly '
            f'over its running time, in bins of {_duration(width)}.</p></section>'
            f'<section id="workers"><h2>Workers</h2>{bars}{table}<p class="note">Fetch and decode run while the model '
            "works on the previous micro-batch, so the stage times may add up to more than the busy time.</p>"
            "</section>")


def _errors_section(data: RunData) -> str:
    total = totals(data.records)
    if not total.errors_by_kind:
        return '<section id="errors"><h2>Errors</h2><p class="note">No error rows.</p></section>'
    rows = []
    all_rows = total.rows_ok + total.rows_error
    for kind, count in sorted(total.errors_by_kind.items(), key=lambda item: -item[1]):
        examples = "".join(
            f'<li><code>{_e(ex["id"])}</code> <span class="ref">{_e(_short(ex["reference"]))}</span><br>'
            f'{_e(_short(ex["error"], 300))}</li>' for ex in data.examples.get(kind, []))
        rows.append(f'<tr class="error-kind" data-kind="{_e(kind)}"><td><code>{_e(kind)}</code></td>'
                    f'<td>{count:,}</td><td>{100 * count / all_rows:.1f}%</td><td><ul>{examples}</ul></td></tr>')
    return ('<section id="errors"><h2>Errors by kind</h2><table><tr><th>error_kind</th><th>rows</th><th>share</th>'
            f'<th>examples (id, reference, message)</th></tr>{"".join(rows)}</table></section>')


def _failed_section(data: RunData) -> str:
    if not data.failed:
        return ""
    rows = "".join(f"<tr><td><code>{_e(unit)}</code></td><td>{_e(info.get('attempts'))}</td>"
                   f"<td>{_e(info.get('failed_at'))}</td><td>{_e(info.get('reason'))}</td></tr>"
                   for unit, info in sorted(data.failed.items()))
    return ('<section id="failed-units"><h2>Failed units</h2><table><tr><th>unit</th><th>attempts</th><th>when</th>'
            f"<th>reason</th></tr>{rows}</table></section>")


def _gallery_section(data: RunData) -> str:
    if not data.gallery:
        return '<section id="gallery"><h2>Gallery</h2><p class="note">No committed rows to sample yet.</p></section>'
    cards = []
    for item in data.gallery:
        if item.thumbnail is not None:
            picture = f'<img class="thumb" src="{item.thumbnail}" alt="{_e(_short(item.reference, 80))}">'
        else:
            picture = f'<div class="placeholder">image unavailable<br><small>{_e(_short(item.problem, 240))}</small></div>'
        answers = []
        errors = {(row["error_kind"], row["error"]) for row in item.rows if row["status"] != "ok"}
        if len(item.rows) > 1 and len(errors) == 1 and all(row["status"] != "ok" for row in item.rows):
            # The image failed before any instruction was asked (fetch, decode): say it once.
            (kind, error), = errors
            answers.append(f'<dt>all {len(item.rows)} instructions</dt>'
                           f'<dd class="row-error">{_e(kind)}: {_e(_short(error, 200))}</dd>')
        for row in item.rows if not answers else ():
            label = row.get("question_id") or _short(row["instruction"], 80) or "(no prompt)"
            if row["status"] == "ok":
                text = row["text"] if isinstance(row["text"], str) else " | ".join(row["text"] or [])
                answer = f'<dd class="text">{_e(text)}</dd>'
            else:
                answer = f'<dd class="row-error">{_e(row["error_kind"])}: {_e(_short(row["error"], 200))}</dd>'
            answers.append(f'<dt title="{_e(row["instruction"])}">{_e(label)}</dt>{answer}')
        cards.append(f'<figure class="card" data-row-id="{_e(item.row_id)}">{picture}<figcaption>'
                     f'<div class="ref" title="{_e(item.reference)}"><code>{_e(item.row_id)}</code> '
                     f'{_e(_short(item.reference, 60))}</div>'
                     f'<dl>{"".join(answers)}</dl></figcaption></figure>')
    return (f'<section id="gallery"><h2>Gallery: {len(data.gallery)} sampled image(s)</h2>'
            f'<div class="gallery">{"".join(cards)}</div></section>')


def _spec_section(data: RunData) -> str:
    spec = json.dumps(data.settings, indent=2, ensure_ascii=False, sort_keys=True)
    return (f'<section id="spec"><h2>Job spec</h2><p class="note">The settings recorded in the output\'s '
            f"_manifest.json (what every run into this output used).</p><pre>{_e(spec)}</pre></section>")


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",sans-serif;margin:0;color:#1f2937;
background:#f8fafc}
header,section{max-width:1100px;margin:0 auto;padding:12px 24px}
header{padding-top:24px}h1{margin:0 0 4px;font-size:24px}h2{font-size:18px;border-bottom:1px solid #e2e8f0;
padding-bottom:4px}.output{font-family:ui-monospace,monospace;color:#475569;word-break:break-all}
.state{display:inline-block;padding:4px 10px;border-radius:6px;font-weight:600}
.state.finished{background:#dcfce7;color:#166534}.state.running{background:#dbeafe;color:#1e40af}
.state.incomplete,.state.unknown{background:#fef3c7;color:#92400e}.state.failed{background:#fee2e2;color:#991b1b}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #e2e8f0;border-radius:8px;
padding:10px 14px;min-width:110px}.value{font-size:22px;font-weight:600}.label{color:#64748b}
.note{color:#64748b}table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #e2e8f0;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f1f5f9}
td ul{margin:0;padding-left:18px}.ref{font-family:ui-monospace,monospace;font-size:12px;color:#475569;
word-break:break-all}svg.chart{background:#fff;border:1px solid #e2e8f0;border-radius:8px;max-width:100%;height:auto}
svg text{font-size:12px;fill:#334155}svg .grid{stroke:#e2e8f0}svg .axis{stroke:#94a3b8}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px}
figure.card{margin:0;padding:8px}img.thumb{display:block;margin:0 auto 6px;max-width:100%;height:auto;
border-radius:4px;image-rendering:auto}.placeholder{height:150px;display:flex;flex-direction:column;
justify-content:center;text-align:center;background:repeating-linear-gradient(45deg,#f1f5f9,#f1f5f9 8px,#e2e8f0 8px,
#e2e8f0 16px);border-radius:4px;color:#991b1b;font-weight:600;padding:6px;overflow:hidden}
.placeholder small{color:#475569;font-weight:400;word-break:break-word}dl{margin:4px 0 0}dt{color:#64748b;
font-size:12px}dd{margin:0 0 4px}dd.text{font-weight:600}dd.row-error{color:#991b1b}
pre{background:#0f172a;color:#e2e8f0;padding:12px;border-radius:8px;overflow:auto}
"""


def render(data: RunData) -> str:
    """The report as one HTML document that loads nothing else (all user text escaped)."""
    state, sentence = run_state(data)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        # Nothing may load from outside the page: styles are inline and images are data: URIs.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">"
        f"<title>blipbatch report: {_e(data.output)}</title><style>{_CSS}</style></head><body>"
        f'<header><h1>blipbatch run report</h1><div class="output">{_e(data.output)}</div>'
        f'<p><span class="state {state}">{_e(sentence)}</span></p>'
        f'<p class="note">Model <code>{_e(data.settings.get("model"))}</code>; report made {_when(data.generated_at)}.'
        "</p></header>"
        + _summary(data) + _timing_sections(data) + _errors_section(data) + _failed_section(data)
        + _gallery_section(data) + _spec_section(data)
        + "</body></html>\n"
    )


def write_report(output: str, destination: str, sample: int = 24, fetch: FetchConfig | None = None,
                 seed: int = 0) -> str:
    """Write the report of `output` to `destination` (a local path or fsspec URL); returns `destination`."""
    if sample < 0:
        raise ReportError(f"sample must be >= 0, got {sample}")
    page = render(collect(output, sample, fetch, seed))
    with fsspec.open(destination, "w", encoding="utf-8") as f:
        f.write(page)
    return destination
