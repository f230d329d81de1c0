"""report.html: one self-contained static page that describes a finished run.

The page sits beside the manifest (``<output uri>/<run id>/report.html``) and needs nothing else:
inline CSS, inline SVG charts drawn here, no JavaScript, no fonts, no network requests. It shows

- a summary of the manifest (run id, task, model, rows, tokens, tokens/s, elapsed, status),
- output tokens per second over time (from the ``generated_at`` column, when the rows have it),
- histograms of prompt and output lengths,
- finish reasons, toxicity score histograms per label and the toxicity decisions taken,
- errors by kind with one example message each, a few sample outputs,
- the (redacted) config the run used.

Rows are read column by column: only the handful of columns the charts need, from every part file
and from ``rejected/``; everything is tallied per file (counts, fixed bins), so memory stays small
whatever the size of the run. ``rgbatch report RUN_URI`` calls :func:`rebuild`.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.writer import EXTENSIONS, MANIFEST, REJECTED, output_filesystem, part_files, read_part

REPORT = "report.html"
GENERATED_AT = S.GENERATED_AT

TIME_RESOLUTION_S = 0.1  # generated_at is tallied in buckets this wide
MAX_TIME_BINS = 60
MAX_LENGTH_BINS = 30
TOXICITY_BINS = 20
SAMPLE_ROWS = 5
SAMPLE_CHARS = 400
EXAMPLE_CHARS = 300

_SCALAR_COLUMNS = (
    S.PROMPT_TOKENS,
    S.OUTPUT_TOKENS,
    S.FINISH_REASON,
    S.ERROR,
    S.ERROR_KIND,
    S.TOXICITY_DECISION,
    GENERATED_AT,
)
_SAMPLE_COLUMNS = (S.ID, S.OUTPUT_TEXT, S.FINISH_REASON, S.ERROR)


# Reading and tallying ----------------------------------------------------------------------------


def _is_label(name: str) -> bool:
    return name.startswith(S.TOXICITY_PREFIX) and name != S.TOXICITY_DECISION


def _wanted(names: Iterable[str]) -> list[str]:
    return [n for n in names if n in _SCALAR_COLUMNS or _is_label(n)]


@dataclass
class _Tally:
    """Everything the page plots, accumulated one part file at a time."""

    threshold: float | None = None
    rows: int = 0
    rejected: int = 0
    files: int = 0
    prompt_tokens: Counter = field(default_factory=Counter)  # length -> rows
    output_tokens: Counter = field(default_factory=Counter)
    finish_reasons: Counter = field(default_factory=Counter)
    decisions: Counter = field(default_factory=Counter)
    error_kinds: Counter = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    toxicity: dict[str, np.ndarray] = field(default_factory=dict)  # label -> rows per bin
    toxicity_unscored: Counter = field(default_factory=Counter)  # label -> null scores
    toxicity_over: Counter = field(default_factory=Counter)  # label -> scores >= threshold
    has_time_column: bool = False
    timed_rows: int = 0
    time_tokens: Counter = field(default_factory=Counter)  # time bucket -> output tokens
    time_rows: Counter = field(default_factory=Counter)  # time bucket -> rows
    samples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, table: pa.Table, rejected: bool) -> None:
        self.files += 1
        if table.num_rows == 0:
            return
        self.rows += table.num_rows
        if rejected:
            self.rejected += table.num_rows
        names = set(table.column_names)
        for name, counter in (
            (S.PROMPT_TOKENS, self.prompt_tokens),
            (S.OUTPUT_TOKENS, self.output_tokens),
        ):
            if name in names:
                values = _ints(table.column(name))
                keys, counts = np.unique(np.clip(values, 0, None), return_counts=True)
                counter.update(dict(zip(keys.tolist(), counts.tolist(), strict=True)))
        for name, counter in (
            (S.FINISH_REASON, self.finish_reasons),
            (S.TOXICITY_DECISION, self.decisions),
            (S.ERROR_KIND, self.error_kinds),
        ):
            if name in names:
                counter.update(_value_counts(table.column(name)))
        if S.ERROR_KIND in names and S.ERROR in names:
            self._add_examples(table)
        for name in table.column_names:
            if _is_label(name):
                self._add_scores(name[len(S.TOXICITY_PREFIX) :], table.column(name))
        if GENERATED_AT in names:
            self.has_time_column = True
            self._add_times(table)

    def _add_examples(self, table: pa.Table) -> None:
        kinds = table.column(S.ERROR_KIND)
        for kind in _value_counts(kinds):
            if kind in self.error_examples:
                continue
            index = pc.index(pc.cast(kinds, pa.string()), kind).as_py()
            message = table.column(S.ERROR)[index].as_py() if index >= 0 else None
            if message is not None:
                self.error_examples[kind] = str(message)

    def _add_scores(self, label: str, column: pa.ChunkedArray) -> None:
        bins = self.toxicity.setdefault(label, np.zeros(TOXICITY_BINS, dtype=np.int64))
        scores = _floats(column)
        finite = scores[np.isfinite(scores)]
        self.toxicity_unscored[label] += len(column) - len(finite)
        if finite.size:
            bins += np.histogram(np.clip(finite, 0.0, 1.0), bins=TOXICITY_BINS, range=(0.0, 1.0))[0]
            if self.threshold is not None:
                self.toxicity_over[label] += int(np.count_nonzero(finite >= self.threshold))

    def _add_times(self, table: pa.Table) -> None:
        times = _floats(table.column(GENERATED_AT))
        if S.OUTPUT_TOKENS in table.column_names:
            tokens = np.nan_to_num(_floats(table.column(S.OUTPUT_TOKENS)), nan=0.0)
        else:
            tokens = np.zeros(len(times))
        keep = np.isfinite(times)
        if not keep.any():
            return
        buckets = np.floor(times[keep] / TIME_RESOLUTION_S).astype(np.int64)
        keys, inverse = np.unique(buckets, return_inverse=True)
        token_sums = np.bincount(inverse, weights=tokens[keep])
        row_counts = np.bincount(inverse)
        self.timed_rows += int(keep.sum())
        for key, tok, n in zip(
            keys.tolist(), token_sums.tolist(), row_counts.tolist(), strict=True
        ):
            self.time_tokens[key] += tok
            self.time_rows[key] += n

    def add_samples(self, table: pa.Table) -> None:
        need = SAMPLE_ROWS - len(self.samples)
        if need > 0 and table.num_rows:
            self.samples.extend(table.slice(0, need).to_pylist())


def _ints(column: pa.ChunkedArray) -> np.ndarray:
    values = column.drop_null()
    if len(values) == 0 or not (
        pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
    ):
        return np.zeros(0, dtype=np.int64)
    array = np.asarray(values.to_numpy(), dtype=np.float64)
    return array[np.isfinite(array)].astype(np.int64)


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """Float64 values with nulls as NaN (non-numeric columns count as all null)."""
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        return np.full(len(column), np.nan)
    return np.asarray(
        pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64
    )


def _value_counts(column: pa.ChunkedArray) -> Counter:
    values = column.drop_null()
    if len(values) == 0:
        return Counter()
    return Counter(
        {str(item["values"]): item["counts"] for item in pc.value_counts(values).to_pylist()}
    )


def _read_file(
    fs: fsspec.AbstractFileSystem, path: str, fmt: str, want_samples: bool
) -> tuple[pa.Table, pa.Table | None]:
    """(the tallied columns, the first rows' sample columns when asked) of one part file."""
    if fmt == "parquet":
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            table = parquet.read(columns=_wanted(names))
            samples = None
            if want_samples and parquet.metadata.num_rows:
                columns = [n for n in _SAMPLE_COLUMNS if n in names]
                batch = next(parquet.iter_batches(batch_size=SAMPLE_ROWS, columns=columns), None)
                samples = pa.Table.from_batches([batch]) if batch is not None else None
        return table, samples
    table = read_part(fs, path, fmt)
    samples = table.select([n for n in _SAMPLE_COLUMNS if n in table.column_names])
    return table.select(_wanted(table.column_names)), samples.slice(
        0, SAMPLE_ROWS
    ) if want_samples else None


def collect(
    fs: fsspec.AbstractFileSystem, run_dir: str, fmt: str, threshold: float | None = None
) -> _Tally:
    """Tallies every part file of a run, kept rows and rejected/ rows alike."""
    tally = _Tally(threshold=threshold)
    for directory, rejected in ((run_dir, False), (posixpath.join(run_dir, REJECTED), True)):
        for path in part_files(fs, directory, fmt):
            table, samples = _read_file(
                fs, path, fmt, not rejected and len(tally.samples) < SAMPLE_ROWS
            )
            tally.add(table, rejected)
            if samples is not None:
                tally.add_samples(samples)
    return tally


# Formatting ---------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _int(value: Any) -> str:
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return "–"


def _num(value: Any, digits: int = 1) -> str:
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


def _duration(seconds: Any) -> str:
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


def _clip(text: str, limit: int) -> str:
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


def _ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> list[float]:
    step = _nice_step(hi - lo, target, integer)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    index = first
    while index * step <= hi + step * 1e-9:
        ticks.append(round(index * step, 10))
        index += 1
    return ticks


def _y_top(peak: float, integer: bool = False) -> tuple[float, list[float]]:
    """A y-axis top at a round number at or above ``peak``, and its ticks from 0."""
    peak = max(peak, 1.0)
    step = _nice_step(peak, 4, integer)
    top = math.ceil(peak / step - 1e-9) * step
    return top, _ticks(0, top, 4, integer)


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


def _svg(name: str, title: str, width: int, height: int, body: str) -> str:
    return (
        f'<svg data-chart="{_e(name)}" role="img" aria-label="{_e(title)}" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'preserveAspectRatio="xMidYMid meet"><title>{_e(title)}</title>{body}</svg>'
    )


def _empty_svg(name: str, title: str, message: str, width: int = 560, height: int = 220) -> str:
    body = (
        f'<rect x="1" y="1" width="{width - 2}" height="{height - 2}" rx="6" class="empty"/>'
        f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" dominant-baseline="middle" '
        f'class="empty-text">{_e(message)}</text>'
    )
    return _svg(name, title, width, height, body)


@dataclass(frozen=True)
class _Frame:
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
                f'<text x="{self.left - 6}" y="{y:.1f}" text-anchor="end" dominant-baseline="middle" class="tick">{_e(_short(tick))}</text>'
            )
        for tick in x_ticks:
            x = self.x(tick)
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.base:.1f}" y2="{self.base + 4:.1f}" class="axis"/>'
                f'<text x="{x:.1f}" y="{self.base + 16:.1f}" text-anchor="middle" class="tick">{_e(x_format(tick))}</text>'
            )
        parts.append(
            f'<line x1="{self.left}" x2="{self.width - self.right}" y1="{self.base:.1f}" y2="{self.base:.1f}" class="axis"/>'
            f'<line x1="{self.left}" x2="{self.left}" y1="{self.top}" y2="{self.base:.1f}" class="axis"/>'
            f'<text x="{(self.left + self.width - self.right) / 2:.1f}" y="{self.height - 8}" text-anchor="middle" class="label">{_e(x_label)}</text>'
            f'<text transform="translate(14 {(self.top + self.base) / 2:.1f}) rotate(-90)" text-anchor="middle" class="label">{_e(y_label)}</text>'
        )
        return "".join(parts)


def _histogram_svg(
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
    top, y_ticks = _y_top(max(counts, default=0), integer=True)
    frame = _Frame(width, height, edges[0], edges[-1], top)
    target = 5 if width >= 500 else 4
    integer = all(float(e).is_integer() for e in edges)
    ticks = _ticks(edges[0], edges[-1], target, integer)
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
            f"<title>{_e(tip)}</title></rect>"
        )
    if marker is not None and edges[0] <= marker[0] <= edges[-1]:
        x = frame.x(marker[0])
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top}" y2="{frame.base:.1f}" class="marker"/>'
            f'<text x="{x - 4:.1f}" y="{frame.top + 10}" text-anchor="end" class="marker-text">{_e(marker[1])}</text>'
        )
    return _svg(name, title, width, height, "".join(parts))


def _length_histogram(name: str, title: str, lengths: Counter, x_label: str) -> str:
    if not lengths:
        return _empty_svg(name, title, "no rows")
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
    return _histogram_svg(name, title, edges, counts, x_label, tips)


def _bar_svg(name: str, title: str, counts: Counter, empty: str, width: int = 560) -> str:
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if not items:
        return _empty_svg(name, title, empty, width, 160)
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
            f'<text x="{label_w - 8}" y="{y + row / 2:.1f}" text-anchor="end" dominant-baseline="middle" class="cat">{_e(_clip(label, 18))}</text>'
            f'<rect x="{label_w}" y="{y + 5}" width="{bar:.1f}" height="{row - 10}" rx="3" fill="{color}" class="bar">'
            f"<title>{_e(label)}: {count:,} rows ({count / total:.1%})</title></rect>"
            f'<text x="{label_w + bar + 6:.1f}" y="{y + row / 2:.1f}" dominant-baseline="middle" class="value">{count:,} ({count / total:.1%})</text>'
        )
    return _svg(name, title, width, height, "".join(parts))


def _time_unit(span: float) -> tuple[float, str]:
    if span >= 3 * 3600:
        return 3600.0, "h"
    if span >= 5 * 60:
        return 60.0, "min"
    return 1.0, "s"


def _throughput(tally: _Tally) -> tuple[str, str]:
    """(the chart, a caption) for output tokens per second over time."""
    name, title = "throughput", "Output tokens per second over time"
    width = 1120
    if not tally.time_tokens:
        message = "no timing data" if tally.rows else "no rows"
        if tally.rows and not tally.has_time_column:
            caption = f"The rows have no {GENERATED_AT} column, so there is no timing data."
        elif tally.rows:
            caption = f"No row has a {GENERATED_AT} timestamp."
        else:
            caption = "The run has no rows."
        return _empty_svg(name, title, message, width, 200), caption
    first, last = min(tally.time_tokens), max(tally.time_tokens)
    span = (last - first + 1) * TIME_RESOLUTION_S
    buckets = last - first + 1
    n_bins = min(MAX_TIME_BINS, buckets)
    bin_s = span / n_bins
    tokens = [0.0] * n_bins
    rows = [0] * n_bins
    for key, value in tally.time_tokens.items():
        index = (key - first) * n_bins // buckets  # integer arithmetic: no float edge errors
        tokens[index] += value
        rows[index] += tally.time_rows[key]
    rates = [t / bin_s for t in tokens]
    unit_s, unit = _time_unit(span)
    top, y_ticks = _y_top(max(rates))
    frame = _Frame(width, 300, 0.0, span / unit_s, top, left=70)
    x_ticks = _ticks(0.0, span / unit_s, 10)
    parts = [
        frame.axes(
            x_ticks, y_ticks, f"time since the first row finished ({unit})", "output tokens/s"
        )
    ]
    points = []
    for i, rate in enumerate(rates):
        x0, x1 = frame.x(i * bin_s / unit_s), frame.x((i + 1) * bin_s / unit_s)
        y = frame.y(rate)
        points.append(f"{x0:.1f},{y:.1f} {x1:.1f},{y:.1f}")
    line = " ".join(points)
    x_start, x_end = frame.x(0.0), frame.x(span / unit_s)
    parts.append(
        f'<polygon points="{x_start:.1f},{frame.base:.1f} {line} {x_end:.1f},{frame.base:.1f}" class="area"/>'
    )
    parts.append(f'<polyline points="{line}" class="line"/>')
    for i, (rate, n) in enumerate(zip(rates, rows, strict=True)):
        x0, x1 = frame.x(i * bin_s / unit_s), frame.x((i + 1) * bin_s / unit_s)
        parts.append(
            f'<rect x="{x0:.1f}" y="{frame.top}" width="{max(x1 - x0, 0.5):.1f}" height="{frame.base - frame.top:.1f}" class="hover">'
            f"<title>{_num(i * bin_s, 1)}–{_num((i + 1) * bin_s, 1)} s: {_num(rate)} tokens/s, {n:,} rows</title></rect>"
        )
    mean = sum(tokens) / span
    y = frame.y(mean)
    parts.append(
        f'<line x1="{frame.left}" x2="{width - frame.right}" y1="{y:.1f}" y2="{y:.1f}" class="marker"/>'
        f'<text x="{width - frame.right - 4}" y="{y - 5:.1f}" text-anchor="end" class="marker-text">mean {_e(_num(mean))} tokens/s</text>'
    )
    start = dt.datetime.fromtimestamp(first * TIME_RESOLUTION_S, dt.UTC)
    caption = (
        f"{tally.timed_rows:,} rows with timestamps, {sum(tokens):,.0f} output tokens over "
        f"{_duration(span)} from {start:%Y-%m-%d %H:%M:%S} UTC, in bins of {_num(bin_s, 2)} s; "
        f"peak {_num(max(rates))} tokens/s, mean {_num(mean)} tokens/s while rows were finishing."
    )
    return _svg(name, title, width, 300, "".join(parts)), caption


def _toxicity_svg(tally: _Tally, label: str) -> str:
    bins = tally.toxicity[label]
    name = f"toxicity_{label}"
    title = f"{label} score"
    if not bins.sum():
        return _empty_svg(name, title, "no scores", 360, 200)
    edges = [i / TOXICITY_BINS for i in range(TOXICITY_BINS + 1)]
    tips = [
        f"{lo:.2f}–{hi:.2f}: {int(c):,} rows"
        for lo, hi, c in zip(edges, edges[1:], bins, strict=False)
    ]
    marker = None
    if tally.threshold is not None:
        marker = (tally.threshold, f"threshold {tally.threshold:g}")
    return _histogram_svg(
        name,
        title,
        edges,
        [int(c) for c in bins],
        f"{label} score",
        tips,
        width=360,
        height=200,
        color="#7a57c2",
        marker=marker,
    )


# The page -----------------------------------------------------------------------------------------

_CSS = """
:root { color-scheme: light; --ink: #1d2433; --muted: #5d6677; --line: #dde2ea; --card: #fff;
  --bg: #f4f6f9; --accent: #3563c9; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 40px; }
header h1 { font-size: 22px; margin: 0 0 4px; word-break: break-all; }
header .sub { color: var(--muted); margin: 0 0 16px; }
.badge { display: inline-block; padding: 1px 10px; border-radius: 10px; font-size: 13px;
  vertical-align: middle; background: #e3e8f0; color: var(--ink); margin-left: 8px; }
.badge.ok { background: #d8f0e3; color: #17603d; }
.badge.bad { background: #f6dada; color: #8a2424; }
.stats { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 10px; }
.stat { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.stat .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.stat .v { font-size: 20px; font-weight: 600; margin-top: 2px; word-break: break-all; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 14px 16px 16px; margin-top: 18px; }
section h2 { font-size: 16px; margin: 0 0 8px; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; }
.grid3 { display: grid; grid-template-columns: repeat(3, 1fr); gap: 14px; }
.grid2 > section, .grid3 > figure { margin-top: 0; }
.row2 { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; margin-top: 18px; }
.row2 > section { margin-top: 0; }
figure { margin: 0; }
figcaption, .caption { color: var(--muted); font-size: 12.5px; margin-top: 4px; }
figure h3 { font-size: 13.5px; margin: 0 0 2px; }
svg { display: block; width: 100%; height: auto; font-family: inherit; }
svg .grid { stroke: #eceff4; }
svg .axis { stroke: #9aa3b2; }
svg .tick { fill: var(--muted); font-size: 11px; }
svg .label { fill: var(--ink); font-size: 12px; }
svg .cat { fill: var(--ink); font-size: 12.5px; }
svg .value { fill: var(--muted); font-size: 12px; }
svg .bar:hover { opacity: .8; }
svg .area { fill: var(--accent); fill-opacity: .18; stroke: none; }
svg .line { fill: none; stroke: var(--accent); stroke-width: 2; stroke-linejoin: round; }
svg .hover { fill: transparent; }
svg .hover:hover { fill: rgba(53, 99, 201, .08); }
svg .marker { stroke: #c94a4a; stroke-dasharray: 5 4; stroke-width: 1.3; }
svg .marker-text { fill: #c94a4a; font-size: 11px; paint-order: stroke; stroke: #fff;
  stroke-width: 4px; stroke-linejoin: round; }
svg .empty { fill: #f7f8fa; stroke: var(--line); stroke-dasharray: 4 4; }
svg .empty-text { fill: var(--muted); font-size: 15px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
th.n, td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td code { white-space: nowrap; }
td code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; font-size: 12.5px; }
td .text { white-space: pre-wrap; word-break: break-word; max-height: 9em; overflow: auto; }
pre { background: #f7f8fa; border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px;
  overflow: auto; max-height: 520px; font: 12.5px/1.4 ui-monospace, "DejaVu Sans Mono", Menlo, monospace; }
details summary { cursor: pointer; color: var(--muted); }
footer { color: var(--muted); font-size: 12px; margin-top: 22px; }
.none { color: var(--muted); font-style: italic; }
"""


def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _threshold(manifest: dict[str, Any]) -> float | None:
    value = _get(manifest, "config", "toxicity", "threshold")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _models(manifest: dict[str, Any]) -> str:
    model = manifest.get("model")
    if isinstance(model, list):
        return ", ".join(str(m) for m in model) or "–"
    if model:
        return str(model)
    return str(_get(manifest, "config", "model", "checkpoint") or "–")


def _header(manifest: dict[str, Any], tally: _Tally) -> str:
    counts = manifest.get("counts") or {}
    throughput = manifest.get("throughput") or {}
    status = str(manifest.get("status") or "unknown")
    badge = "ok" if status in ("succeeded", "already_complete") else "bad"
    task = manifest.get("task") or _get(manifest, "config", "task") or "–"
    rows = counts.get("rows", tally.rows)
    errors = (
        sum(int(v) for v in (counts.get("error_kinds") or {}).values())
        if counts
        else sum(tally.error_kinds.values())
    )
    stats = [
        ("Rows", _int(rows)),
        ("Rows written", _int(counts.get("rows_written", tally.rows - tally.rejected))),
        ("Rows rejected", _int(counts.get("rows_rejected", tally.rejected))),
        ("Rows with errors", _int(errors)),
        ("Prompt tokens", _int(counts.get("prompt_tokens"))),
        ("Prompts truncated", _int(counts.get("prompts_truncated"))),
        ("Output tokens", _int(counts.get("output_tokens"))),
        ("Output tokens/s", _num(throughput.get("output_tokens_per_s"))),
        ("Rows/s", _num(throughput.get("rows_per_s"), 2)),
        ("Elapsed", _duration(manifest.get("elapsed_s"))),
        ("Toxic rows", _int(counts.get("toxic"))),
        ("Status", status),
    ]
    cards = "".join(
        f'<div class="stat"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>'
        for k, v in stats
    )
    started, finished = manifest.get("started_at") or "?", manifest.get("finished_at") or "?"
    return (
        f"<header><h1>Run {_e(manifest.get('run_id') or '?')}"
        f'<span class="badge {badge}">{_e(status)}</span></h1>'
        f'<p class="sub">task <b>{_e(task)}</b> · model <span class="mono">{_e(_models(manifest))}</span>'
        f" · {_e(started)} → {_e(finished)}</p>"
        f'<div class="stats">{cards}</div></header>'
    )


def _figure(svg: str, caption: str = "", heading: str = "") -> str:
    head = f"<h3>{_e(heading)}</h3>" if heading else ""
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f"<figure>{head}{svg}{cap}</figure>"


def _length_caption(lengths: Counter) -> str:
    total = sum(lengths.values())
    if not total:
        return ""
    mean = sum(k * v for k, v in lengths.items()) / total
    return f"{total:,} rows · min {min(lengths):,} · mean {mean:,.1f} · max {max(lengths):,} tokens"


def _toxicity_section(tally: _Tally) -> str:
    decisions = _bar_svg(
        "toxicity_decisions", "Toxicity decisions", tally.decisions, "no toxicity decisions"
    )
    if tally.toxicity:
        figures = []
        for label in tally.toxicity:
            scored = int(tally.toxicity[label].sum())
            caption = f"{scored:,} scored"
            if tally.threshold is not None:
                caption += f" · {tally.toxicity_over[label]:,} ≥ {tally.threshold:g}"
            caption += f" · {tally.toxicity_unscored[label]:,} unscored"
            figures.append(_figure(_toxicity_svg(tally, label), caption, label))
        scores = f'<div class="grid3">{"".join(figures)}</div>'
        note = "Scores of every row, kept and rejected; rows that were not scored (errors) are counted as unscored."
    else:
        scores = '<p class="none">No toxicity scores in this run (toxicity scoring was off).</p>'
        note = ""
    return (
        f"<section><h2>Toxicity scores per label</h2>"
        f"{f'<p class=caption>{_e(note)}</p>' if note else ''}{scores}</section>"
        f'<div class="row2"><section><h2>Toxicity decisions</h2>{_figure(decisions)}</section>'
        f"<section><h2>Finish reasons</h2>"
        f"{_figure(_bar_svg('finish_reasons', 'Finish reasons', tally.finish_reasons, 'no rows'))}"
        f"</section></div>"
    )


def _errors_section(tally: _Tally) -> str:
    if not tally.error_kinds:
        body = '<p class="none">No errors.</p>'
    else:
        rows = "".join(
            f"<tr><td><code>{_e(kind)}</code></td><td class=n>{count:,}</td>"
            f'<td><div class="text">{_e(_clip(tally.error_examples.get(kind, ""), EXAMPLE_CHARS))}</div></td></tr>'
            for kind, count in sorted(tally.error_kinds.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        body = f"<table><thead><tr><th>Kind</th><th class=n>Rows</th><th>Example message</th></tr></thead><tbody>{rows}</tbody></table>"
    return f"<section><h2>Errors by kind</h2>{body}</section>"


def _samples_section(tally: _Tally) -> str:
    if not tally.samples:
        return ""
    rows = []
    for sample in tally.samples:
        text = sample.get(S.OUTPUT_TEXT)
        if text is None:
            content = f'<span class="none">no output: {_e(_clip(str(sample.get(S.ERROR) or ""), EXAMPLE_CHARS))}</span>'
        else:
            content = _e(_clip(str(text), SAMPLE_CHARS))
        rows.append(
            f"<tr><td><code>{_e(_clip(str(sample.get(S.ID, '')), 24))}</code></td>"
            f"<td>{_e(sample.get(S.FINISH_REASON) or '')}</td>"
            f'<td><div class="text">{content}</div></td></tr>'
        )
    return (
        "<section><h2>Sample outputs</h2>"
        f'<p class="caption">The first {len(tally.samples)} rows of the output, as written.</p>'
        f"<table><thead><tr><th>Id</th><th>Finish</th><th>Output text</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _config_section(manifest: dict[str, Any]) -> str:
    config = manifest.get("config")
    text = (
        json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        if config is not None
        else "{}"
    )
    files = manifest.get("input_files") or []
    listing = "".join(f"<li class=mono>{_e(f)}</li>" for f in files[:200])
    if len(files) > 200:
        listing += f"<li>… and {len(files) - 200:,} more</li>"
    inputs = (
        f"<details><summary>Input files ({len(files):,})</summary><ul>{listing}</ul></details>"
        if files
        else ""
    )
    return (
        "<section><h2>Config</h2>"
        '<p class="caption">As recorded in the manifest; secrets and storage options are redacted.</p>'
        f"<pre>{_e(text)}</pre>{inputs}</section>"
    )


def render(manifest: dict[str, Any], tally: _Tally, run_dir: str) -> str:
    """The page for a manifest and the tallies of its rows."""
    throughput_svg, throughput_caption = _throughput(tally)
    prompt_svg = _length_histogram(
        "prompt_tokens", "Prompt length (tokens)", tally.prompt_tokens, "prompt tokens"
    )
    output_svg = _length_histogram(
        "output_tokens", "Output length (tokens)", tally.output_tokens, "output tokens"
    )
    body = [
        _header(manifest, tally),
        f"<section><h2>Throughput over time</h2>{_figure(throughput_svg, throughput_caption)}</section>",
        '<div class="row2">',
        f"<section><h2>Prompt length</h2>{_figure(prompt_svg, _length_caption(tally.prompt_tokens))}</section>",
        f"<section><h2>Output length</h2>{_figure(output_svg, _length_caption(tally.output_tokens))}</section>",
        "</div>",
        _toxicity_section(tally),
        _errors_section(tally),
        _samples_section(tally),
        _config_section(manifest),
        f"<footer>rg-batch report for <span class=mono>{_e(run_dir)}</span> · {tally.rows:,} rows read "
        f"from {tally.files:,} part files ({tally.rejected:,} rejected) · built "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC</footer>",
    ]
    title = f"rg-batch run {manifest.get('run_id') or ''}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


# Public API ---------------------------------------------------------------------------------------


def build_report(
    fs: fsspec.AbstractFileSystem, run_dir: str, fmt: str, manifest: dict[str, Any]
) -> str:
    """The self-contained HTML page for the run in ``run_dir`` (fsspec path, part files in ``fmt``)."""
    if fmt not in EXTENSIONS:
        raise ValueError(f"unknown output format {fmt!r}: expected one of {sorted(EXTENSIONS)}")
    return render(manifest, collect(fs, run_dir, fmt, _threshold(manifest)), run_dir)


def write_report(
    fs: fsspec.AbstractFileSystem, run_dir: str, fmt: str, manifest: dict[str, Any]
) -> str:
    """Writes ``report.html`` into ``run_dir`` in one put and returns its path."""
    page = build_report(fs, run_dir, fmt, manifest)
    path = posixpath.join(run_dir, REPORT)
    fs.pipe_file(path, page.encode("utf-8"))
    return path


def summarize(manifest: dict[str, Any], report_path: str | None = None) -> str:
    """A few lines of plain text about a run, for the terminal."""
    counts = manifest.get("counts") or {}
    throughput = manifest.get("throughput") or {}

    def listing(values: Any) -> str:
        items = sorted((values or {}).items(), key=lambda kv: (-int(kv[1]), str(kv[0])))
        return ", ".join(f"{k} {int(v):,}" for k, v in items) or "none"

    task = manifest.get("task") or _get(manifest, "config", "task") or "?"
    lines = [
        f"run {manifest.get('run_id') or '?'}: {manifest.get('status') or 'unknown'} "
        f"({task}, model {_models(manifest)})",
        f"rows:           {_int(counts.get('rows'))} ({_int(counts.get('rows_written'))} written, "
        f"{_int(counts.get('rows_rejected'))} rejected); {_int(counts.get('prompt_tokens'))} prompt "
        f"tokens ({_int(counts.get('prompts_truncated'))} truncated), "
        f"{_int(counts.get('output_tokens'))} output tokens",
        f"finish reasons: {listing(counts.get('finish_reasons'))}",
        f"errors:         {listing(counts.get('error_kinds'))}",
        f"toxicity:       {listing(counts.get('toxicity_decisions'))} "
        f"({_int(counts.get('toxic'))} toxic)",
        f"throughput:     {_num(throughput.get('output_tokens_per_s'))} output tokens/s, "
        f"{_num(throughput.get('rows_per_s'), 2)} rows/s; elapsed {_duration(manifest.get('elapsed_s'))}",
    ]
    if report_path:
        lines.append(f"report:         {report_path}")
    return "\n".join(lines)


def rebuild(run_uri: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str]:
    """Rebuilds ``report.html`` of a finished run: (summary text, URI of the page)."""
    fs, run_dir = output_filesystem(run_uri, storage_options)
    manifest_path = posixpath.join(run_dir, MANIFEST)
    if not fs.exists(manifest_path):
        raise FileNotFoundError(
            f"{run_uri.rstrip('/')}/{MANIFEST} does not exist: not a finished rg-batch run directory"
        )
    manifest = json.loads(fs.cat_file(manifest_path))
    fmt = _get(manifest, "config", "output", "format")
    if fmt not in EXTENSIONS:
        found = [f for f in EXTENSIONS if part_files(fs, run_dir, f)]
        if len(found) != 1:
            raise ValueError(
                f"{run_uri}: the manifest names no output format and the part files do not tell"
            )
        fmt = found[0]
    write_report(fs, run_dir, fmt, manifest)
    uri = f"{run_uri.rstrip('/')}/{REPORT}"
    return summarize(manifest, uri), uri
