"""report.html: one self-contained static page that describes a finished run.

The page sits beside the manifest (``<output uri>/<run id>/report.html``) and needs nothing else:
inline CSS, inline SVG charts drawn here, no JavaScript, no fonts, no network requests. It shows

- the manifest's figures (run id, task, model, rows, tokens, tokens/s, elapsed, status),
- output tokens per second over the whole run, from the run's progress samples,
- histograms of prompt and output lengths,
- finish reasons, toxicity score histograms per label and the toxicity decisions taken,
- errors by kind with one example message each, a few sample outputs,
- the (redacted) config the run used.

Everything comes from the run's merged :class:`pipeline.summary.RunSummary` and progress samples
(kept in ``_summary.json``), never from the part files: building the page costs the same for ten
rows or fifty million. ``rgbatch report RUN_URI`` calls :func:`rebuild`. The modules: ``svg``
(formatting and chart primitives) and ``page`` (the sections and the page).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from typing import Any

import fsspec

from model.storage import filesystem
from pipeline.report.page import model_names, nested_value, render
from pipeline.report.svg import format_duration, format_int, format_number
from pipeline.rundir import MANIFEST, SUMMARY
from pipeline.summary import RunSummary

REPORT = "report.html"


def build_report(
    manifest: dict[str, Any],
    summary: RunSummary,
    samples: Sequence[Sequence[float]],
    run_dir: str = "",
) -> str:
    """The self-contained HTML page of a run."""
    return render(manifest, summary, samples, run_dir)


def write_report(
    fs: fsspec.AbstractFileSystem,
    run_dir: str,
    manifest: dict[str, Any],
    summary: RunSummary,
    samples: Sequence[Sequence[float]],
) -> str:
    """Writes ``report.html`` into ``run_dir`` in one put and returns its path."""
    page = build_report(manifest, summary, samples, run_dir)
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

    task = manifest.get("task") or nested_value(manifest, "config", "task") or "?"
    lines = [
        f"run {manifest.get('run_id') or '?'}: {manifest.get('status') or 'unknown'} "
        f"({task}, model {model_names(manifest)})",
        f"rows:           {format_int(counts.get('rows'))} ({format_int(counts.get('rows_written'))} written, "
        f"{format_int(counts.get('rows_rejected'))} rejected); {format_int(counts.get('prompt_tokens'))} prompt "
        f"tokens ({format_int(counts.get('prompts_truncated'))} truncated), "
        f"{format_int(counts.get('output_tokens'))} output tokens",
        f"finish reasons: {listing(counts.get('finish_reasons'))}",
        f"errors:         {listing(counts.get('error_kinds'))}",
        f"toxicity:       {listing(counts.get('toxicity_decisions'))} "
        f"({format_int(counts.get('toxic'))} toxic)",
        f"throughput:     {format_number(throughput.get('output_tokens_per_s'))} output tokens/s, "
        f"{format_number(throughput.get('rows_per_s'), 2)} rows/s; elapsed {format_duration(manifest.get('elapsed_s'))}",
    ]
    if report_path:
        lines.append(f"report:         {report_path}")
    return "\n".join(lines)


def rebuild(run_uri: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str]:
    """Rebuilds ``report.html`` of a finished run from its manifest and ``_summary.json``."""
    fs, run_dir = filesystem(run_uri, storage_options)
    paths = {name: posixpath.join(run_dir, name) for name in (MANIFEST, SUMMARY)}
    for name, path in paths.items():
        if not fs.exists(path):
            raise FileNotFoundError(
                f"{run_uri.rstrip('/')}/{name} does not exist: not a finished rg-batch run directory"
            )
    manifest = json.loads(fs.cat_file(paths[MANIFEST]))
    data = json.loads(fs.cat_file(paths[SUMMARY]))
    summary = RunSummary.from_json(data.get("summary") or {})
    write_report(fs, run_dir, manifest, summary, data.get("progress") or [])
    uri = f"{run_uri.rstrip('/')}/{REPORT}"
    return summarize(manifest, uri), uri
