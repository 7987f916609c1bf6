"""The report's closed-set section: per question with candidates, how often each candidate won, and how many rows a
threshold on the score (the chosen candidate's probability among the candidates) keeps."""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from blipbatch.pipeline.sink import read_part
from blipbatch.schemas import STATUS_OK, ProgressRecord

from .report_charts import bar_chart

THRESHOLDS = (0.5, 0.9)


@dataclass(frozen=True)
class ClosedSetStats:
    question_id: str
    candidates: list[str]
    wins: dict[str, int]  # candidate -> ok rows whose answer it was
    rows_ok: int
    kept: dict[float, int]  # threshold -> ok rows whose score is at least that


def closed_set_stats(
    output: str, records: Sequence[ProgressRecord], closed_sets: dict[str, dict] | None
) -> list[ClosedSetStats]:
    """The stats of every closed-set question (as the manifest records them) over the committed parts."""
    if not closed_sets:
        return []
    wins: dict[str, Counter[str]] = {name: Counter() for name in closed_sets}
    scores: dict[str, list[float]] = {name: [] for name in closed_sets}
    for record in records:
        table = read_part(output, record, ["question_id", "text", "score", "status"]).to_pydict()
        for question, text, score, status in zip(table["question_id"], table["text"], table["score"], table["status"]):
            if question in wins and status == STATUS_OK:
                wins[question][text] += 1
                scores[question].append(score)
    return [
        ClosedSetStats(
            name,
            list(closed["candidates"]),
            dict(wins[name]),
            len(scores[name]),
            {t: sum(s >= t for s in scores[name]) for t in THRESHOLDS},
        )
        for name, closed in closed_sets.items()
    ]


def closed_set_section(stats: Sequence[ClosedSetStats]) -> str:
    """One HTML section (empty without closed-set questions): per question a bar chart of each candidate's wins, and
    the rows each threshold keeps."""
    if not stats:
        return ""
    parts = [
        '<section id="closed-set"><h2>Closed-set questions</h2><p class="note">Rows whose answer was each '
        "candidate, and how many rows keep a score (the answer's probability among the candidates) of at least "
        "each threshold.</p>"
    ]
    for item in stats:
        title = f"{item.question_id}: answers among {item.rows_ok} ok rows"
        parts.append(
            f"<h3>{html.escape(item.question_id)}</h3>"
            + bar_chart([(c, item.wins.get(c, 0)) for c in item.candidates], "rows", title)
        )
        cells = "".join(
            f"<tr><td>score &ge; {t}</td><td>{item.kept[t]}</td><td>{item.kept[t] / item.rows_ok:.1%}</td></tr>"
            if item.rows_ok
            else f"<tr><td>score &ge; {t}</td><td>0</td><td>-</td></tr>"
            for t in THRESHOLDS
        )
        parts.append(f"<table><tr><th>threshold</th><th>rows kept</th><th>of ok rows</th></tr>{cells}</table>")
    parts.append("</section>")
    return "".join(parts)
