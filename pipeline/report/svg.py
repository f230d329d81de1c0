"""Formatting and SVG chart primitives for report.html: axes, histograms, bar charts."""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_LENGTH_BINS = 30
_BLUE = "#3563c9"


def escape_html(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_int(value: Any) -> str:
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return "–"


def format_number(value: Any, digits: int = 1) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(number):
        return "–"
    return f"{number:,.{digits}f}"


def _short(value: float) -> str:
    """Compact axis labels: 950, 1.2k, 3.4M, 0.25."""
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}"


def format_duration(seconds: Any) -> str:
    try:
        total = float(seconds)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(total):
        return "–"
    if total < 60:
        return f"{total:.1f} s"
    minutes, secs = divmod(round(total), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def clip_label(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _nice_step(span: float, target: int, integer: bool = False) -> float:
    raw = max(span, 1e-12) / max(target, 1)
    if integer and raw <= 1:
        return 1
    magnitude = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10):
        if multiple * magnitude >= raw * (1 - 1e-9):
            return multiple * magnitude
    return 10 * magnitude


def nice_ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> list[float]:
    step = _nice_step(hi - lo, target, integer)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    index = first
    while index * step <= hi + step * 1e-9:
        ticks.append(round(index * step, 10))
        index += 1
    return ticks


def y_axis_top(peak: float, integer: bool = False) -> tuple[float, list[float]]:
    """A y-axis top at a round number at or above ``peak``, and its ticks from 0."""
    peak = max(peak, 1.0)
    step = _nice_step(peak, 4, integer)
    top = math.ceil(peak / step - 1e-9) * step
    return top, nice_ticks(0, top, 4, integer)


# SVG charts ---------------------------------------------------------------------------------------

_BLUE = "#3563c9"
_PALETTE = ("#3563c9", "#e08a1e", "#2f9e69", "#c94a4a", "#7a57c2", "#2b9bb3", "#a6792d", "#d45b9a")
_NAMED_COLORS = {
    "stop": "#2f9e69",
    "length": "#e08a1e",
    "error": "#c94a4a",
    "keep": "#2f9e69",
    "redact": "#e08a1e",
    "drop": "#c94a4a",
}


def svg_element(name: str, title: str, width: int, height: int, body: str) -> str:
    return (
        f'<svg data-chart="{escape_html(name)}" role="img" aria-label="{escape_html(title)}" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'preserveAspectRatio="xMidYMid meet"><title>{escape_html(title)}</title>{body}</svg>'
    )


def empty_svg(name: str, title: str, message: str, width: int = 560, height: int = 220) -> str:
    body = (
        f'<rect x="1" y="1" width="{width - 2}" height="{height - 2}" rx="6" class="empty"/>'
        f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" dominant-baseline="middle" '
        f'class="empty-text">{escape_html(message)}</text>'
    )
    return svg_element(name, title, width, height, body)


@dataclass(frozen=True)
class ChartFrame:
    """The plot area of a chart with x and y axes; maps data to SVG coordinates."""

    width: int
    height: int
    x_lo: float
    x_hi: float
    y_top: float
    left: int = 60
    right: int = 18
    top: int = 16
    bottom: int = 46

    def x(self, value: float) -> float:
        span = (self.x_hi - self.x_lo) or 1.0
        return self.left + (value - self.x_lo) / span * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        return self.top + (1 - value / (self.y_top or 1.0)) * (self.height - self.top - self.bottom)

    @property
    def base(self) -> float:
        return self.y(0)

    def axes(
        self,
        x_ticks: Sequence[float],
        y_ticks: Sequence[float],
        x_label: str,
        y_label: str,
        x_format=_short,
    ) -> str:
        parts = []
        for tick in y_ticks:
            y = self.y(tick)
            parts.append(
                f'<line x1="{self.left}" x2="{self.width - self.right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                f'<text x="{self.left - 6}" y="{y:.1f}" text-anchor="end" dominant-baseline="middle" class="tick">{escape_html(_short(tick))}</text>'
            )
        for tick in x_ticks:
            x = self.x(tick)
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.base:.1f}" y2="{self.base + 4:.1f}" class="axis"/>'
                f'<text x="{x:.1f}" y="{self.base + 16:.1f}" text-anchor="middle" class="tick">{escape_html(x_format(tick))}</text>'
            )
        parts.append(
            f'<line x1="{self.left}" x2="{self.width - self.right}" y1="{self.base:.1f}" y2="{self.base:.1f}" class="axis"/>'
            f'<line x1="{self.left}" x2="{self.left}" y1="{self.top}" y2="{self.base:.1f}" class="axis"/>'
            f'<text x="{(self.left + self.width - self.right) / 2:.1f}" y="{self.height - 8}" text-anchor="middle" class="label">{escape_html(x_label)}</text>'
            f'<text transform="translate(14 {(self.top + self.base) / 2:.1f}) rotate(-90)" text-anchor="middle" class="label">{escape_html(y_label)}</text>'
        )
        return "".join(parts)


def histogram_svg(
    name: str,
    title: str,
    edges: Sequence[float],
    counts: Sequence[int],
    x_label: str,
    bar_titles: Sequence[str],
    *,
    width: int = 560,
    height: int = 240,
    color: str = _BLUE,
    marker: tuple[float, str] | None = None,
) -> str:
    top, y_ticks = y_axis_top(max(counts, default=0), integer=True)
    frame = ChartFrame(width, height, edges[0], edges[-1], top)
    target = 5 if width >= 500 else 4
    integer = all(float(e).is_integer() for e in edges)
    ticks = nice_ticks(edges[0], edges[-1], target, integer)
    x_ticks = [t for t in ticks if edges[0] <= t <= edges[-1]]
    parts = [frame.axes(x_ticks, y_ticks, x_label, "rows")]
    for lo, hi, count, tip in zip(edges[:-1], edges[1:], counts, bar_titles, strict=True):
        if count <= 0:
            continue
        x0, x1 = frame.x(lo), frame.x(hi)
        y = frame.y(count)
        gap = 1.0 if x1 - x0 > 3 else 0.0
        parts.append(
            f'<rect x="{x0 + gap / 2:.1f}" y="{y:.1f}" width="{max(x1 - x0 - gap, 0.8):.1f}" '
            f'height="{max(frame.base - y, 0.8):.1f}" fill="{color}" class="bar">'
            f"<title>{escape_html(tip)}</title></rect>"
        )
    if marker is not None and edges[0] <= marker[0] <= edges[-1]:
        x = frame.x(marker[0])
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top}" y2="{frame.base:.1f}" class="marker"/>'
            f'<text x="{x - 4:.1f}" y="{frame.top + 10}" text-anchor="end" class="marker-text">{escape_html(marker[1])}</text>'
        )
    return svg_element(name, title, width, height, "".join(parts))


def length_histogram(name: str, title: str, lengths: Counter, x_label: str) -> str:
    if not lengths:
        return empty_svg(name, title, "no rows")
    lo, hi = min(lengths), max(lengths) + 1  # integer bins: [lo, hi)
    if hi - lo < 10:
        lo = max(0, lo - (10 - (hi - lo)) // 2)
        hi = lo + 10
    width = max(1, math.ceil(_nice_step(hi - lo, MAX_LENGTH_BINS)))
    lo = lo // width * width
    n_bins = max(1, math.ceil((hi - lo) / width))
    counts = [0] * n_bins
    for value, count in lengths.items():
        counts[min((value - lo) // width, n_bins - 1)] += count
    edges = [lo + i * width for i in range(n_bins + 1)]
    if width == 1:
        tips = [f"{lo + i} tokens: {c:,} rows" for i, c in enumerate(counts)]
    else:
        tips = [
            f"{e}–{e + width - 1} tokens: {c:,} rows" for e, c in zip(edges, counts, strict=False)
        ]
    return histogram_svg(name, title, edges, counts, x_label, tips)


def bar_svg(name: str, title: str, counts: Counter, empty: str, width: int = 560) -> str:
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if not items:
        return empty_svg(name, title, empty, width, 160)
    row, top, label_w, value_w = 30, 12, 130, 120
    height = top * 2 + row * len(items)
    total = sum(counts.values()) or 1
    peak = max(counts.values()) or 1
    span = width - label_w - value_w
    parts = [
        f'<line x1="{label_w}" x2="{label_w}" y1="{top - 4}" y2="{height - top + 4}" class="axis"/>'
    ]
    for i, (label, count) in enumerate(items):
        y = top + i * row
        bar = max(count / peak * span, 1.5)
        color = _NAMED_COLORS.get(label, _PALETTE[i % len(_PALETTE)])
        parts.append(
            f'<text x="{label_w - 8}" y="{y + row / 2:.1f}" text-anchor="end" dominant-baseline="middle" class="cat">{escape_html(clip_label(label, 18))}</text>'
            f'<rect x="{label_w}" y="{y + 5}" width="{bar:.1f}" height="{row - 10}" rx="3" fill="{color}" class="bar">'
            f"<title>{escape_html(label)}: {count:,} rows ({count / total:.1%})</title></rect>"
            f'<text x="{label_w + bar + 6:.1f}" y="{y + row / 2:.1f}" dominant-baseline="middle" class="value">{count:,} ({count / total:.1%})</text>'
        )
    return svg_element(name, title, width, height, "".join(parts))
