"""`blipbatch report OUTPUT`: one self-contained HTML page about a run, finished or still running, local or on an
object store.

This module writes the page; jobs/report_facts.py reads what it shows and jobs/report_charts.py draws the charts.
It shows the summary (rows ok and in error, units, wall time, images/s), throughput over time and per worker (inline
SVG, from the timing each unit's commit marker records), errors by kind with example rows, failed units, a gallery of
sampled images with their instructions and outputs, and the job's settings from the manifest. Thumbnails are fetched
and decoded by the pipeline's own Fetcher and decode_image, under the caller's FetchConfig (the address guard
included), and embedded as data: URIs: the page loads nothing from anywhere, and its Content-Security-Policy says so.
Only committed units are read, so a report of a run in progress shows what is committed so far.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime

import fsspec

from blipbatch.pipeline.fetch import FetchConfig

from .report_charts import bar_chart, format_number, line_chart
from .report_closed_set import closed_set_section
from .report_facts import ReportError, RunData, collect, throughput, totals, union_seconds, worker_stats

MAX_WORKER_LINES = 8  # more workers: the throughput plot shows only their total (the bar chart shows each)


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
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


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
        return "incomplete", (
            f"Incomplete: {pending} of {data.units_planned} units not committed yet, and no run "
            "holds the output. Run the job again to resume."
        )
    if data.failed:
        return "failed", f"Finished with {len(data.failed)} failed unit(s) (blipbatch retry-failed redoes them)."
    return "finished", f"Finished: all {data.units_planned} units committed."


def _summary(data: RunData) -> str:
    total = totals(data.records)
    timed = [r.timing for r in data.records if r.timing is not None]
    cards = [
        ("rows ok", f"{total.rows_ok:,}"),
        ("rows in error", f"{total.rows_error:,}"),
        (
            "units committed",
            f"{len(data.records):,}" + ("" if data.units_planned is None else f" of {data.units_planned:,}"),
        ),
        ("units failed", f"{len(data.failed):,}"),
        ("duplicate images", f"{total.duplicate_images:,}"),
    ]
    notes = []
    if total.duplicate_images:
        notes.append(
            f"{total.duplicate_images:,} input row(s) had the same image bytes as an earlier row of their unit "
            "(same image_sha256): decoded and encoded once."
        )
    if data.runs:  # the headline: the runs' wall time as their summaries printed it, start-up included
        run_wall = sum(run["wall_s"] for run in data.runs)
        run_rows = sum(run.get("rows", 0) for run in data.runs)
        cards += [
            ("run wall time, incl. start-up", _duration(run_wall)),
            ("rows/s over the run wall time", format_number(run_rows / run_wall) if run_wall else "–"),
        ]
        notes.append(
            f"Run wall time: the {len(data.runs)} run(s) that did work, each from its start (Ray and the "
            "model workers starting included) to its end, as blipbatch run's summary prints it."
        )
    if timed:
        wall = union_seconds([(t.started, t.finished) for t in timed])
        images = sum(t.images_fetched for t in timed)
        rows = sum(r.rows for r in data.records if r.timing is not None)
        cards += [
            ("time units ran", _duration(wall)),
            ("rows/s while units ran", format_number(rows / wall) if wall else "–"),
            ("images/s while units ran", format_number(images / wall) if wall else "–"),
        ]
        notes.append(
            f"From {_when(min(t.started for t in timed))} to {_when(max(t.finished for t in timed))}; "
            "the in-unit rates count only the time units were running (start-up and gaps between runs "
            "left out)."
        )
        if len(timed) < len(data.records):
            notes.append(
                f"{len(data.records) - len(timed)} unit(s) were committed without timing (an earlier "
                "version of blipbatch) and are left out of the rates."
            )
    else:
        finished = sorted(r.finished_at for r in data.records if r.finished_at)
        if finished:
            notes.append(
                f"Units committed between {finished[0]} and {finished[-1]}. Their commit markers hold no "
                "timing (written by an earlier version of blipbatch), so wall time and rates are unknown."
            )
    body = "".join(
        f'<div class="card"><div class="value">{_e(value)}</div><div class="label">{_e(label)}</div></div>'
        for label, value in cards
    )
    return (
        f'<section id="summary"><h2>Summary</h2><div class="cards">{body}</div>'
        + "".join(f'<p class="note">{_e(note)}</p>' for note in notes)
        + "</section>"
    )


def _timing_sections(data: RunData) -> str:
    timed = [r for r in data.records if r.timing is not None]
    if not timed:
        note = (
            "No unit of this output recorded its timing (its commit markers were written by an earlier version "
            "of blipbatch), so there is no throughput plot."
            if data.records
            else "No unit is committed yet."
        )
        return f'<section id="throughput"><h2>Throughput</h2><p class="note no-timing">{_e(note)}</p></section>'
    start, width, series = throughput(timed)
    points = {name: [(width * (b + 0.5), value) for b, value in enumerate(values)] for name, values in series.items()}
    if len(points) == 2 or len(points) > MAX_WORKER_LINES + 1:  # one worker's line is the total's; many are a blur
        points = {"all workers": points["all workers"]}
    chart = line_chart(points, f"seconds since {_when(start)}", "output rows / s", "Throughput over time")
    stats = worker_stats(timed)
    bars = bar_chart(
        [(f"worker {s.worker}", s.rows / s.busy_s if s.busy_s else 0.0) for s in stats],
        "rows/s",
        "Rows per second of each worker, over the time it was busy",
    )
    head = (
        "worker",
        "host (pid)",
        "units",
        "rows",
        "images",
        "busy",
        "rows/s",
        "images/s",
        "fetch s",
        "decode s",
        "model s",
    )
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{_e(cell)}</td>"
            for cell in (
                s.worker,
                ", ".join(sorted(s.hosts)),
                f"{s.units:,}",
                f"{s.rows:,}",
                f"{s.images:,}",
                _duration(s.busy_s),
                format_number(s.rows / s.busy_s) if s.busy_s else "–",
                format_number(s.images / s.busy_s) if s.busy_s else "–",
                f"{s.fetch_s:.2f}",
                f"{s.decode_s:.2f}",
                f"{s.model_s:.2f}",
            )
        )
        + "</tr>"
        for s in stats
    )
    table = f"<table><tr>{''.join(f'<th>{_e(h)}</th>' for h in head)}</tr>{rows}</table>"
    return (
        f'<section id="throughput"><h2>Throughput</h2>{chart}<p class="note">Each unit\'s rows are spread evenly '
        f"over its running time, in bins of {_duration(width)}.</p></section>"
        f'<section id="workers"><h2>Workers</h2>{bars}{table}<p class="note">Fetch and decode run while the model '
        "works on the previous micro-batch, so the stage times may add up to more than the busy time.</p>"
        "</section>"
    )


def _errors_section(data: RunData) -> str:
    total = totals(data.records)
    if not total.errors_by_kind:
        return '<section id="errors"><h2>Errors</h2><p class="note">No error rows.</p></section>'
    rows = []
    all_rows = total.rows_ok + total.rows_error
    for kind, count in sorted(total.errors_by_kind.items(), key=lambda item: -item[1]):
        examples = "".join(
            f'<li><code>{_e(ex["id"])}</code> <span class="ref">{_e(_short(ex["reference"]))}</span><br>'
            f"{_e(_short(ex['error'], 300))}</li>"
            for ex in data.examples.get(kind, [])
        )
        rows.append(
            f'<tr class="error-kind" data-kind="{_e(kind)}"><td><code>{_e(kind)}</code></td>'
            f"<td>{count:,}</td><td>{100 * count / all_rows:.1f}%</td><td><ul>{examples}</ul></td></tr>"
        )
    return (
        '<section id="errors"><h2>Errors by kind</h2><table><tr><th>error_kind</th><th>rows</th><th>share</th>'
        f"<th>examples (id, reference, message)</th></tr>{''.join(rows)}</table></section>"
    )


def _failed_section(data: RunData) -> str:
    if not data.failed:
        return ""
    rows = "".join(
        f"<tr><td><code>{_e(unit)}</code></td><td>{_e(info.get('attempts'))}</td>"
        f"<td>{_e(info.get('failed_at'))}</td><td>{_e(info.get('reason'))}</td></tr>"
        for unit, info in sorted(data.failed.items())
    )
    return (
        '<section id="failed-units"><h2>Failed units</h2><table><tr><th>unit</th><th>attempts</th><th>when</th>'
        f"<th>reason</th></tr>{rows}</table></section>"
    )


def _score(score: object) -> str:
    """An answer's score (mean token log-probability; beam search: the sequence score) beside it; none: nothing."""
    scores = score if isinstance(score, list) else [score]
    if not any(isinstance(s, (int, float)) for s in scores):
        return ""
    shown = " | ".join(f"{s:.2f}" if isinstance(s, (int, float)) else "–" for s in scores)
    return f' <span class="score" title="score: mean token log-probability">({_e(shown)})</span>'


def _gallery_section(data: RunData) -> str:
    if not data.gallery:
        return '<section id="gallery"><h2>Gallery</h2><p class="note">No committed rows to sample yet.</p></section>'
    cards = []
    for item in data.gallery:
        if item.thumbnail is not None:
            picture = f'<img class="thumb" src="{item.thumbnail}" alt="{_e(_short(item.reference, 80))}">'
        else:
            picture = (
                f'<div class="placeholder">image unavailable<br><small>{_e(_short(item.problem, 240))}</small></div>'
            )
        answers = []
        errors = {(row["error_kind"], row["error"]) for row in item.rows if row["status"] != "ok"}
        if len(item.rows) > 1 and len(errors) == 1 and all(row["status"] != "ok" for row in item.rows):
            # The image failed before any instruction was asked (fetch, decode): say it once.
            ((kind, error),) = errors
            answers.append(
                f"<dt>all {len(item.rows)} instructions</dt>"
                f'<dd class="row-error">{_e(kind)}: {_e(_short(error, 200))}</dd>'
            )
        for row in item.rows if not answers else ():
            label = row.get("question_id") or _short(row["instruction"], 80) or "(no prompt)"
            if row["status"] == "ok":
                text = row["text"] if isinstance(row["text"], str) else " | ".join(row["text"] or [])
                answer = f'<dd class="text">{_e(text)}{_score(row.get("score"))}</dd>'
            else:
                answer = f'<dd class="row-error">{_e(row["error_kind"])}: {_e(_short(row["error"], 200))}</dd>'
            answers.append(f'<dt title="{_e(row["instruction"])}">{_e(label)}</dt>{answer}')
        cards.append(
            f'<figure class="card" data-row-id="{_e(item.row_id)}">{picture}<figcaption>'
            f'<div class="ref" title="{_e(item.reference)}"><code>{_e(item.row_id)}</code> '
            f"{_e(_short(item.reference, 60))}</div>"
            f"<dl>{''.join(answers)}</dl></figcaption></figure>"
        )
    return (
        f'<section id="gallery"><h2>Gallery: {len(data.gallery)} sampled image(s)</h2>'
        f'<div class="gallery">{"".join(cards)}</div></section>'
    )


def _spec_section(data: RunData) -> str:
    spec = json.dumps(data.settings, indent=2, ensure_ascii=False, sort_keys=True)
    return (
        f'<section id="spec"><h2>Job spec</h2><p class="note">The settings recorded in the output\'s '
        f"_manifest.json (what every run into this output used).</p><pre>{_e(spec)}</pre></section>"
    )


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
font-size:12px}dd{margin:0 0 4px}dd.text{font-weight:600}.score{font-weight:400;color:#64748b}
dd.row-error{color:#991b1b}
pre{background:#0f172a;color:#e2e8f0;padding:12px;border-radius:8px;overflow:auto}
"""


def render(data: RunData) -> str:
    """The report as one HTML document that loads nothing else (all user text escaped)."""
    state, sentence = run_state(data)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # Nothing may load from outside the page: styles are inline and images are data: URIs.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">"
        f"<title>blipbatch report: {_e(data.output)}</title><style>{_CSS}</style></head><body>"
        f'<header><h1>blipbatch run report</h1><div class="output">{_e(data.output)}</div>'
        f'<p><span class="state {state}">{_e(sentence)}</span></p>'
        f'<p class="note">Model <code>{_e(data.settings.get("model"))}</code>; report made {_when(data.generated_at)}.'
        "</p></header>"
        + _summary(data)
        + _timing_sections(data)
        + _errors_section(data)
        + _failed_section(data)
        + closed_set_section(data.closed_sets)
        + _gallery_section(data)
        + _spec_section(data)
        + "</body></html>\n"
    )


def write_report(
    output: str, destination: str, sample: int = 24, fetch: FetchConfig | None = None, seed: int = 0
) -> str:
    """Write the report of `output` to `destination` (a local path or fsspec URL); returns `destination`."""
    if sample < 0:
        raise ReportError(f"sample must be >= 0, got {sample}")
    page = render(collect(output, sample, fetch, seed))
    with fsspec.open(destination, "w", encoding="utf-8") as f:
        f.write(page)
    return destination
