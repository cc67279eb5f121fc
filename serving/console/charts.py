"""Geometry of the console's small inline SVG charts (bars, sparklines, control charts).

Numbers only: the templates draw them, so every label goes through Jinja's escaping and the page
needs no chart library and no script.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    x: float
    y: float
    w: float
    h: float
    text: str


@dataclass(frozen=True)
class BarChart:
    width: int
    height: int
    bars: list[Bar]
    line: str = ""  # polyline points (e.g. a Pareto's cumulative share), "" for none


@dataclass(frozen=True)
class LineChart:
    """A run chart; ``limits`` are horizontal lines (label, y) such as SPC control limits."""

    width: int
    height: int
    points: str
    dots: list[tuple[float, float, bool]]  # x, y, out of limits
    limits: list[tuple[str, float]]
    y_min: float
    y_max: float


def hbars(
    items: Sequence[tuple[str, float]], *, width: int = 260, row: int = 18, fmt: str = "{:.3f}"
) -> BarChart:
    """Horizontal bars, one row per item, longest = full width (labels drawn by the template)."""
    top = max((v for _, v in items), default=0.0) or 1.0
    bars = [
        Bar(label, value, 0.0, i * row + 2, max(1.0, width * value / top), row - 5, fmt.format(value))
        for i, (label, value) in enumerate(items)
    ]
    return BarChart(width, max(row, row * len(items)), bars)


def pareto(items: Sequence[tuple[str, int]], *, width: int = 420, height: int = 160) -> BarChart:
    """Vertical bars, largest first, with the cumulative share as a line (top of the bars' range
    = 100 %); 14 px stay free above the tallest bar for its count."""
    if not items:
        return BarChart(width, height, [])
    room = height - 14
    top = max(v for _, v in items) or 1
    total = sum(v for _, v in items) or 1
    slot = width / len(items)
    bars, points, running = [], [], 0
    for i, (label, value) in enumerate(items):
        h = room * value / top
        x = i * slot + slot * 0.15
        bars.append(Bar(label, value, x, height - h, slot * 0.7, h, str(value)))
        running += value
        points.append(f"{x + slot * 0.35:.1f},{height - room * running / total:.1f}")
    return BarChart(width, height, bars, " ".join(points))


def sparkline(series: Sequence[float], *, width: int = 300, height: int = 48) -> LineChart:
    return run_chart(series, width=width, height=height)


def run_chart(
    series: Sequence[float],
    *,
    limits: Sequence[tuple[str, float]] = (),
    width: int = 420,
    height: int = 120,
    lower: float | None = None,
    upper: float | None = None,
) -> LineChart:
    """Points left to right scaled into the box; values beyond ``lower``/``upper`` are flagged."""
    values = [float(v) for v in series]
    bounds = values + [v for _, v in limits]
    lo = min(bounds, default=0.0)
    hi = max(bounds, default=1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 1.0, hi + 1.0
    pad = (hi - lo) * 0.08
    lo, hi = lo - pad, hi + pad

    def y(v: float) -> float:
        return round(height - (v - lo) / (hi - lo) * height, 1)

    step = width / max(1, len(values) - 1)
    dots = [
        (
            round(i * step, 1),
            y(v),
            (upper is not None and v > upper) or (lower is not None and v < lower),
        )
        for i, v in enumerate(values)
    ]
    points = " ".join(f"{x},{yy}" for x, yy, _ in dots)
    return LineChart(width, height, points, dots, [(name, y(v)) for name, v in limits], lo, hi)
