"""The page: a header of figures, charts and tables built from a run's summary and progress.

Throughput over time is drawn from the run's own progress samples (seconds since the start, rows
and output tokens finished), so the chart covers the whole run, from the first read to the last
write, at the rate the run actually had.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pipeline import columns as S
from pipeline.report.svg import (
    ChartFrame,
    bar_svg,
    clip_label,
    empty_svg,
    escape_html,
    format_duration,
    format_int,
    format_number,
    histogram_svg,
    length_histogram,
    nice_ticks,
    svg_element,
    y_axis_top,
)
from pipeline.secrets import mask_text, mask_uri
from pipeline.summary import EXAMPLE_CHARS, RunSummary

MAX_TIME_BINS = 60
SAMPLE_CHARS = 400
TOXICITY_BINS = 20


def _time_unit(span: float) -> tuple[float, str]:
    if span >= 3 * 3600:
        return 3600.0, "h"
    if span >= 5 * 60:
        return 60.0, "min"
    return 1.0, "s"


def throughput_rates(
    samples: Sequence[Sequence[float]], bins: int = MAX_TIME_BINS
) -> tuple[list[float], list[int], float]:
    """(output tokens/s per bin, rows per bin, bin width in s) over the span of ``samples``.

    Each sample is (seconds since the start, rows, output tokens) as counted so far; tokens between
    two samples are spread evenly over the time between them.
    """
    points = sorted((float(t), int(r), int(k)) for t, r, k in samples)
    span = points[-1][0] if points else 0.0
    if span <= 0:
        return [], [], 0.0
    n_bins = max(1, min(bins, len(points) - 1))
    width = span / n_bins
    tokens, rows = [0.0] * n_bins, [0.0] * n_bins
    for (t0, r0, k0), (t1, r1, k1) in itertools.pairwise(points):
        if t1 <= t0:
            continue
        for i in range(int(t0 // width), min(n_bins, int(t1 // width) + 1)):
            lo, hi = max(t0, i * width), min(t1, (i + 1) * width)
            if hi > lo:
                share = (hi - lo) / (t1 - t0)
                tokens[i] += (k1 - k0) * share
                rows[i] += (r1 - r0) * share
    return [t / width for t in tokens], [round(r) for r in rows], width


def _throughput(samples: Sequence[Sequence[float]], rows: int) -> tuple[str, str]:
    """(the chart, a caption) for output tokens per second over the run."""
    name, title = "throughput", "Output tokens per second over time"
    width = 1120
    rates, row_bins, bin_s = throughput_rates(samples)
    if not rates:
        caption = "No progress samples were recorded." if rows else "The run has no rows."
        return empty_svg(name, title, "no timing data" if rows else "no rows", width, 200), caption
    span = bin_s * len(rates)
    unit_s, unit = _time_unit(span)
    top, y_ticks = y_axis_top(max(rates))
    frame = ChartFrame(width, 300, 0.0, span / unit_s, top, left=70)
    x_ticks = nice_ticks(0.0, span / unit_s, 10)
    parts = [
        frame.axes(x_ticks, y_ticks, f"time since the run started ({unit})", "output tokens/s")
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
    for i, (rate, n) in enumerate(zip(rates, row_bins, strict=True)):
        x0, x1 = frame.x(i * bin_s / unit_s), frame.x((i + 1) * bin_s / unit_s)
        parts.append(
            f'<rect x="{x0:.1f}" y="{frame.top}" width="{max(x1 - x0, 0.5):.1f}" height="{frame.base - frame.top:.1f}" class="hover">'
            f"<title>{format_number(i * bin_s, 1)}–{format_number((i + 1) * bin_s, 1)} s: {format_number(rate)} tokens/s, {n:,} rows</title></rect>"
        )
    total_tokens = sum(rate * bin_s for rate in rates)
    mean = total_tokens / span
    y = frame.y(mean)
    parts.append(
        f'<line x1="{frame.left}" x2="{width - frame.right}" y1="{y:.1f}" y2="{y:.1f}" class="marker"/>'
        f'<text x="{width - frame.right - 4}" y="{y - 5:.1f}" text-anchor="end" class="marker-text">mean {escape_html(format_number(mean))} tokens/s</text>'
    )
    caption = (
        f"{total_tokens:,.0f} output tokens over the run's {format_duration(span)}, from {len(samples):,} "
        f"progress samples, in bins of {format_number(bin_s, 2)} s; peak {format_number(max(rates))} tokens/s, "
        f"mean {format_number(mean)} tokens/s."
    )
    return svg_element(name, title, width, 300, "".join(parts)), caption


def _toxicity_svg(summary: RunSummary, label: str) -> str:
    bins = summary.toxicity[label]
    name = f"toxicity_{label}"
    title = f"{label} score"
    if not sum(bins):
        return empty_svg(name, title, "no scores", 360, 200)
    edges = [i / TOXICITY_BINS for i in range(TOXICITY_BINS + 1)]
    tips = [
        f"{lo:.2f}–{hi:.2f}: {int(c):,} rows"
        for lo, hi, c in zip(edges, edges[1:], bins, strict=False)
    ]
    marker = None
    if summary.threshold is not None:
        marker = (summary.threshold, f"threshold {summary.threshold:g}")
    return histogram_svg(
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


def nested_value(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _threshold(manifest: dict[str, Any]) -> float | None:
    value = nested_value(manifest, "config", "toxicity", "threshold")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def model_names(manifest: dict[str, Any]) -> str:
    model = manifest.get("model")
    if isinstance(model, list):
        return mask_text(", ".join(str(m) for m in model)) or "–"
    if model:
        return mask_text(str(model))
    return mask_text(str(nested_value(manifest, "config", "model", "checkpoint") or "–"))


def _header(manifest: dict[str, Any], summary: RunSummary) -> str:
    counts = manifest.get("counts") or {}
    throughput = manifest.get("throughput") or {}
    status = str(manifest.get("status") or "unknown")
    badge = "ok" if status in ("succeeded", "already_complete") else "bad"
    task = manifest.get("task") or nested_value(manifest, "config", "task") or "–"
    rows = counts.get("rows", summary.rows)
    errors = (
        sum(int(v) for v in (counts.get("error_kinds") or {}).values())
        if counts
        else sum(summary.error_kinds.values())
    )
    stats = [
        ("Rows", format_int(rows)),
        ("Rows written", format_int(counts.get("rows_written", summary.rows - summary.rejected))),
        ("Rows rejected", format_int(counts.get("rows_rejected", summary.rejected))),
        ("Rows with errors", format_int(errors)),
        ("Prompt tokens", format_int(counts.get("prompt_tokens"))),
        ("Prompts truncated", format_int(counts.get("prompts_truncated"))),
        ("Output tokens", format_int(counts.get("output_tokens"))),
        ("Output tokens/s", format_number(throughput.get("output_tokens_per_s"))),
        ("Rows/s", format_number(throughput.get("rows_per_s"), 2)),
        ("Elapsed", format_duration(manifest.get("elapsed_s"))),
        ("Toxic rows", format_int(counts.get("toxic"))),
        ("Status", status),
    ]
    cards = "".join(
        f'<div class="stat"><div class="k">{escape_html(k)}</div><div class="v">{escape_html(v)}</div></div>'
        for k, v in stats
    )
    started, finished = manifest.get("started_at") or "?", manifest.get("finished_at") or "?"
    return (
        f"<header><h1>Run {escape_html(manifest.get('run_id') or '?')}"
        f'<span class="badge {badge}">{escape_html(status)}</span></h1>'
        f'<p class="sub">task <b>{escape_html(task)}</b> · model <span class="mono">{escape_html(model_names(manifest))}</span>'
        f" · {escape_html(started)} → {escape_html(finished)}</p>"
        f'<div class="stats">{cards}</div></header>'
    )


def _figure(svg: str, caption: str = "", heading: str = "") -> str:
    head = f"<h3>{escape_html(heading)}</h3>" if heading else ""
    cap = f"<figcaption>{escape_html(caption)}</figcaption>" if caption else ""
    return f"<figure>{head}{svg}{cap}</figure>"


def _length_caption(lengths: Counter) -> str:
    total = sum(lengths.values())
    if not total:
        return ""
    mean = sum(k * v for k, v in lengths.items()) / total
    return f"{total:,} rows · min {min(lengths):,} · mean {mean:,.1f} · max {max(lengths):,} tokens"


def _toxicity_section(summary: RunSummary) -> str:
    decisions = bar_svg(
        "toxicity_decisions", "Toxicity decisions", summary.decisions, "no toxicity decisions"
    )
    if summary.toxicity:
        figures = []
        for label in summary.toxicity:
            scored = sum(summary.toxicity[label])
            caption = f"{scored:,} scored"
            if summary.threshold is not None:
                caption += f" · {summary.toxicity_over[label]:,} ≥ {summary.threshold:g}"
            caption += f" · {summary.toxicity_unscored[label]:,} unscored"
            figures.append(_figure(_toxicity_svg(summary, label), caption, label))
        scores = f'<div class="grid3">{"".join(figures)}</div>'
        note = "Scores of every row, kept and rejected; rows that were not scored (errors) are counted as unscored."
    else:
        scores = '<p class="none">No toxicity scores in this run (toxicity scoring was off).</p>'
        note = ""
    return (
        f"<section><h2>Toxicity scores per label</h2>"
        f"{f'<p class=caption>{escape_html(note)}</p>' if note else ''}{scores}</section>"
        f'<div class="row2"><section><h2>Toxicity decisions</h2>{_figure(decisions)}</section>'
        f"<section><h2>Finish reasons</h2>"
        f"{_figure(bar_svg('finish_reasons', 'Finish reasons', summary.finish_reasons, 'no rows'))}"
        f"</section></div>"
    )


def _errors_section(summary: RunSummary) -> str:
    if not summary.error_kinds:
        body = '<p class="none">No errors.</p>'
    else:
        rows = "".join(
            f"<tr><td><code>{escape_html(kind)}</code></td><td class=n>{count:,}</td>"
            f'<td><div class="text">{escape_html(clip_label(mask_text(summary.error_examples.get(kind, "")), EXAMPLE_CHARS))}</div></td></tr>'
            for kind, count in sorted(summary.error_kinds.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        body = f"<table><thead><tr><th>Kind</th><th class=n>Rows</th><th>Example message</th></tr></thead><tbody>{rows}</tbody></table>"
    return f"<section><h2>Errors by kind</h2>{body}</section>"


def estimate_rows(manifest: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(figure, estimated, actual) for the run's estimate (none when the manifest has none)."""
    estimate = manifest.get("estimate") or {}
    if not estimate or "error" in estimate:
        return []
    counts = manifest.get("counts") or {}
    return [
        ("Rows", estimate.get("rows"), counts.get("rows")),
        ("Prompt tokens", estimate.get("prompt_tokens"), counts.get("prompt_tokens")),
        ("Generated tokens", estimate.get("generated_tokens"), counts.get("output_tokens")),
        ("Wall time (s)", estimate.get("wall_s"), manifest.get("elapsed_s")),
    ]


def _estimate_section(manifest: dict[str, Any]) -> str:
    figures = estimate_rows(manifest)
    if not figures:
        return ""

    def cell(value: Any) -> str:
        return format_number(value) if isinstance(value, float) else format_int(value)

    rows = "".join(
        f"<tr><td>{escape_html(name)}</td><td class=n>{escape_html(cell(est))}</td>"
        f"<td class=n>{escape_html(cell(act))}</td><td class=n>"
        f"{escape_html(f'{act / est:.2f}' if est and act is not None else '–')}</td></tr>"
        for name, est, act in figures
    )
    return (
        "<section><h2>Estimate and actual</h2><table><thead><tr><th>Figure</th>"
        "<th class=n>Estimated</th><th class=n>Actual</th><th class=n>Actual / estimated</th>"
        f"</tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _samples_section(summary: RunSummary) -> str:
    if not summary.samples:
        return ""
    rows = []
    for sample in summary.samples:
        text = sample.get(S.OUTPUT_TEXT)
        if text is None:
            content = f'<span class="none">no output: {escape_html(clip_label(str(sample.get(S.ERROR) or ""), EXAMPLE_CHARS))}</span>'
        else:
            content = escape_html(clip_label(str(text), SAMPLE_CHARS))
        rows.append(
            f"<tr><td><code>{escape_html(clip_label(str(sample.get(S.ID, '')), 24))}</code></td>"
            f"<td>{escape_html(sample.get(S.FINISH_REASON) or '')}</td>"
            f'<td><div class="text">{content}</div></td></tr>'
        )
    return (
        "<section><h2>Sample outputs</h2>"
        f'<p class="caption">{len(summary.samples)} rows of the output (kept and rejected), '
        "chosen by a hash of their ids.</p>"
        f"<table><thead><tr><th>Id</th><th>Finish</th><th>Output text</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _config_section(manifest: dict[str, Any]) -> str:
    config = manifest.get("config")
    text = mask_text(
        json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        if config is not None
        else "{}"
    )
    files = manifest.get("input_files") or []
    listing = "".join(f"<li class=mono>{escape_html(mask_uri(str(f)))}</li>" for f in files[:200])
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
        f"<pre>{escape_html(text)}</pre>{inputs}</section>"
    )


def render(
    manifest: dict[str, Any],
    summary: RunSummary,
    samples: Sequence[Sequence[float]],
    run_dir: str,
) -> str:
    """The page for a manifest, the summary of its rows and its progress samples."""
    throughput_svg, throughput_caption = _throughput(samples, summary.rows)
    prompt_svg = length_histogram(
        "prompt_tokens", "Prompt length (tokens)", summary.prompt_lengths, "prompt tokens"
    )
    output_svg = length_histogram(
        "output_tokens", "Output length (tokens)", summary.output_lengths, "output tokens"
    )
    body = [
        _header(manifest, summary),
        f"<section><h2>Throughput over time</h2>{_figure(throughput_svg, throughput_caption)}</section>",
        '<div class="row2">',
        f"<section><h2>Prompt length</h2>{_figure(prompt_svg, _length_caption(summary.prompt_lengths))}</section>",
        f"<section><h2>Output length</h2>{_figure(output_svg, _length_caption(summary.output_lengths))}</section>",
        "</div>",
        _toxicity_section(summary),
        _errors_section(summary),
        _estimate_section(manifest),
        _samples_section(summary),
        _config_section(manifest),
        f"<footer>rg-batch report for <span class=mono>{escape_html(mask_uri(run_dir))}</span> · {summary.rows:,} rows "
        f"in {summary.parts:,} parts ({summary.rejected:,} rejected) · built "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC</footer>",
    ]
    title = f"rg-batch run {manifest.get('run_id') or ''}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape_html(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )
