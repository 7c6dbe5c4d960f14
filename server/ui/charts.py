"""Chart geometry for the dashboard's inline SVG: data in, pixel coordinates and tick labels out.

The `chart` macro in templates/charts.html draws a `Chart`; nothing here emits markup, so every
label goes through Jinja's escaping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

WIDTH, HEIGHT = 560, 320
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 20, 16, 48


@dataclass(frozen=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    title: str
    #: drawn hollow: a value to show but not to trust (a flagged measurement)
    hollow: bool = False


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    width: float
    height: float
    title: str = ""


@dataclass(frozen=True)
class Segment:
    x1: float
    y1: float
    x2: float
    y2: float
    #: the CSS class that styles it: "diagonal", "baseline"
    kind: str
    title: str = ""


@dataclass
class Chart:
    width: int
    height: int
    left: float
    top: float
    right: float
    bottom: float
    x_label: str = ""
    y_label: str = ""
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    bars: list[Box] = field(default_factory=list)
    bands: list[Box] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    #: SVG polyline `points`, empty for none
    line: str = ""
    points: list[Point] = field(default_factory=list)


def fmt(value: float) -> str:
    """A short number for a label: 3 significant digits, no exponent for everyday values."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def nice_step(span: float, count: int) -> float:
    raw = span / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


class Scale:
    """A linear map from the data interval [lo, hi] to pixels [start, end], widened to round ticks."""

    def __init__(self, lo: float, hi: float, start: float, end: float, count: int = 5, integer: bool = False) -> None:
        if hi <= lo:
            pad = abs(lo) * 0.1 or 1.0
            lo, hi = lo - pad, hi + pad
        step = nice_step(hi - lo, count)
        if integer:
            step = max(1.0, round(step))
        self.step = step
        self.lo = math.floor(lo / step) * step
        self.hi = math.ceil(hi / step) * step
        self.start, self.end = start, end

    def __call__(self, value: float) -> float:
        return self.start + (value - self.lo) / (self.hi - self.lo) * (self.end - self.start)

    def ticks(self) -> list[Tick]:
        count = round((self.hi - self.lo) / self.step)
        return [Tick(self(self.lo + i * self.step), fmt(self.lo + i * self.step)) for i in range(count + 1)]


def _frame(x: Scale, y: Scale, x_label: str, y_label: str) -> Chart:
    return Chart(WIDTH, HEIGHT, MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM,
                 x_label=x_label, y_label=y_label, x_ticks=x.ticks(), y_ticks=y.ticks())


def _x_scale(lo: float, hi: float, integer: bool = False) -> Scale:
    return Scale(lo, hi, MARGIN_LEFT, WIDTH - MARGIN_RIGHT, integer=integer)


def _y_scale(lo: float, hi: float, integer: bool = False) -> Scale:
    return Scale(lo, hi, HEIGHT - MARGIN_BOTTOM, MARGIN_TOP, integer=integer)


def histogram(values: Sequence[float], x_label: str, bins: int = 30) -> Chart:
    """Counts of `values` in equal-width bins."""
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(int((value - lo) / width), bins - 1)] += 1
    x = _x_scale(lo, lo + width * bins)
    y = _y_scale(0, max(counts), integer=True)
    chart = _frame(x, y, x_label, "count")
    for i, count in enumerate(counts):
        left, right = lo + i * width, lo + (i + 1) * width
        top = y(count)
        chart.bars.append(Box(x(left) + 0.5, top, max(x(right) - x(left) - 1, 1), y(0) - top,
                              f"{fmt(left)}–{fmt(right)} ms: {count}"))
    return chart


def scatter(pairs: Sequence[tuple[float, float]], label: str = "latency (ms)") -> Chart:
    """Predicted (y) against measured (x) on one shared range, with the y = x line."""
    every = [v for pair in pairs for v in pair]
    lo, hi = min(every), max(every)
    x, y = _x_scale(lo, hi), _y_scale(lo, hi)
    chart = _frame(x, y, f"measured {label}", f"predicted {label}")
    low, high = max(x.lo, y.lo), min(x.hi, y.hi)
    chart.segments.append(Segment(x(low), y(low), x(high), y(high), "diagonal", "predicted = measured"))
    chart.points = [Point(x(m), y(p), f"measured {fmt(m)} ms, predicted {fmt(p)} ms") for m, p in pairs]
    return chart


def curve(samples: Sequence[int], rho: Sequence[float]) -> Chart:
    """Validation rank correlation against the number of adaptation samples."""
    x = _x_scale(min(samples), max(samples), integer=True)
    y = _y_scale(min(0.0, min(rho)), 1.0)
    chart = _frame(x, y, "adaptation samples", "Spearman's rho")
    chart.points = [Point(x(k), y(r), f"{k} samples: rho {r:.3f}") for k, r in zip(samples, rho)]
    chart.line = " ".join(f"{p.x:.1f},{p.y:.1f}" for p in chart.points)
    return chart


def canary(medians: Sequence[float], titles: Sequence[str], flagged: Sequence[bool], baseline: float | None,
           drift: float) -> Chart:
    """Canary medians in run order (flagged ones hollow), with the baseline and the band a healthy
    canary stays within."""
    span = [*medians, *([baseline * (1 - drift), baseline * (1 + drift)] if baseline else [])]
    x = _x_scale(1, max(len(medians), 2), integer=True)
    y = _y_scale(min(span), max(span))
    chart = _frame(x, y, "canary run", "median (ms)")
    if baseline:
        top, bottom = y(baseline * (1 + drift)), y(baseline * (1 - drift))
        chart.bands.append(Box(chart.left, top, chart.right - chart.left, bottom - top,
                               f"baseline ±{drift:.0%}: "
                               f"{fmt(baseline * (1 - drift))}–{fmt(baseline * (1 + drift))} ms"))
        chart.segments.append(Segment(chart.left, y(baseline), chart.right, y(baseline), "baseline",
                                      f"baseline {fmt(baseline)} ms"))
    chart.points = [Point(x(i), y(ms), title, hollow) for i, (ms, title, hollow)
                    in enumerate(zip(medians, titles, flagged), start=1)]
    chart.line = " ".join(f"{p.x:.1f},{p.y:.1f}" for p in chart.points)
    return chart


def sparkline(values: Sequence[float], width: int = 120, height: int = 28) -> Chart:
    """A bare trend line for a table cell (no axes)."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or max(abs(hi) * 0.05, 1e-9)
    lo, hi = lo - pad, hi + pad
    step = (width - 4) / max(len(values) - 1, 1)
    points = [Point(2 + i * step, height - 2 - (v - lo) / (hi - lo) * (height - 4), f"{fmt(v)} ms")
              for i, v in enumerate(values)]
    return Chart(width, height, 0, 0, width, height, points=points[-1:],
                 line=" ".join(f"{p.x:.1f},{p.y:.1f}" for p in points))
