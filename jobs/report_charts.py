"""Inline SVG charts for the report page: a line chart and a horizontal bar chart, nothing loaded from outside."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

_PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d")


def _nice_step(maximum: float, ticks: int = 5) -> float:
    raw = max(maximum, 1e-9) / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def format_number(value: float) -> str:
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

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>'
    ]
    for k in range(int(round(y_max / y_step)) + 1):
        y = sy(k * y_step)
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{format_number(k * y_step)}</text>'
        )
    for k in range(int(x_max / x_step) + 1):
        x = sx(k * x_step)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" class="axis"/>'
            f'<text x="{x:.1f}" y="{top + plot_h + 18}" text-anchor="middle">{format_number(k * x_step)}</text>'
        )
    parts.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" class="axis"/>'
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">{html.escape(x_label)}</text>'
        f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        f"{html.escape(y_label)}</text>"
    )
    for i, (name, points) in enumerate(series.items()):
        colour = _PALETTE[i % len(_PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        dash = "" if i == 0 else ' stroke-dasharray="5 3"'
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="{2.5 if i == 0 else 1.5}"'
            f"{dash}><title>{html.escape(name)}</title></polyline>"
            f'<rect x="{width - right + 14}" y="{top + 4 + i * 18}" width="12" height="12" fill="{colour}"/>'
            f'<text x="{width - right + 32}" y="{top + 14 + i * 18}">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(bars: Sequence[tuple[str, float]], unit: str, title: str) -> str:
    """An SVG horizontal bar chart, one labelled bar per (label, value)."""
    width, left, right, bar, gap = 760, 110, 120, 22, 8
    height = len(bars) * (bar + gap) + gap
    peak = max((value for _, value in bars), default=0.0) or 1.0
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>'
    ]
    for i, (label, value) in enumerate(bars):
        y = gap + i * (bar + gap)
        length = (width - left - right) * value / peak
        parts.append(
            f'<text x="{left - 8}" y="{y + bar / 2 + 4}" text-anchor="end">{html.escape(label)}</text>'
            f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar}" '
            f'fill="{_PALETTE[i % len(_PALETTE)]}"/>'
            f'<text x="{left + length + 6:.1f}" y="{y + bar / 2 + 4}">{format_number(value)} {html.escape(unit)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
