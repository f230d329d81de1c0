"""report.html: the static run report, checked as text and rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pytest

from pipeline import report
from pipeline.rundir import MANIFEST, SUMMARY
from pipeline.summary import SAMPLE_ROWS, RunSummary

LABELS = ("toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack")
NASTY = "<script>alert('x')</script>"
T0 = 1_790_000_000.0


def _schema(labels: tuple[str, ...], timed: bool) -> pa.Schema:
    fields = [
        pa.field("id", pa.string()),
        pa.field("task", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("prompt_truncated", pa.bool_()),
        pa.field("output_text", pa.string()),
        pa.field("output_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),
        pa.field("model", pa.string()),
        *(pa.field(f"toxicity_{label}", pa.float32()) for label in labels),
        pa.field("toxic", pa.bool_()),
        pa.field("toxicity_decision", pa.string()),
        pa.field("run_id", pa.string()),
    ]
    if timed:
        fields.append(pa.field("generated_at", pa.float64()))
    return pa.schema(fields)


def _rows(
    start: int, n: int, rng: np.random.Generator, labels: tuple[str, ...], dropped: bool = False
) -> list[dict[str, Any]]:
    rows = []
    for i in range(start, start + n):
        error = i % 17 == 5 and not dropped
        row: dict[str, Any] = {
            "id": f"doc-{i:04d}",
            "task": "summarize",
            "prompt_tokens": 0 if error else int(rng.integers(40, 900)),
            "prompt_truncated": (not error) and i % 11 == 0,
            "output_text": None
            if error
            else f"summary {i}: " + "words " * int(rng.integers(1, 30)),
            "output_tokens": 0 if error else int(min(64, rng.geometric(0.04))),
            "finish_reason": "error" if error else ("length" if i % 3 == 0 else "stop"),
            "error": None,
            "error_kind": None,
            "model": "tiny-it@a7b89bc3bad2c73c",
            "toxic": None if error else dropped,
            "toxicity_decision": None if error else ("drop" if dropped else "keep"),
            "run_id": "run-1",
            # Rows finish over about a minute, faster in the middle.
            "generated_at": T0 + 60 * (i / 250) ** 1.5 + rng.uniform(0, 0.5),
        }
        if error:
            kind = "missing_text" if i % 2 else "prompt_too_long"
            row["error"], row["error_kind"] = f"{kind} in row {i}: {NASTY}", kind
        for label in labels:
            score = None if error else float(rng.beta(0.4, 6))
            row[f"toxicity_{label}"] = (0.93 if dropped else score) if not error else None
        rows.append(row)
    return rows


def _manifest(rows: int, rejected: int, fmt: str, toxicity: bool = True) -> dict[str, Any]:
    return {
        "run_id": "run-1",
        "date": "2026-11-27",
        "status": "succeeded",
        "task": "summarize",
        "started_at": "2026-11-27T03:49:02+00:00",
        "finished_at": "2026-11-27T03:50:12+00:00",
        "elapsed_s": 70.2,
        "model": ["tiny-it@a7b89bc3bad2c73c"],
        "input_files": ["/data/in/part-000.jsonl", "/data/in/part-001.jsonl"],
        "counts": {
            "rows": rows,
            "rows_written": rows - rejected,
            "rows_rejected": rejected,
            "prompt_tokens": 123456,
            "output_tokens": 7890,
            "prompts_truncated": 3,
            "finish_reasons": {"stop": 150, "length": 80, "error": 15} if rows else {},
            "error_kinds": {"missing_text": 8, "prompt_too_long": 7} if rows else {},
            "toxicity_decisions": {"keep": 230, "drop": rejected} if rows and toxicity else {},
            "toxic": rejected,
        },
        "throughput": {"rows_per_s": round(rows / 70.2, 3), "output_tokens_per_s": 112.4},
        "config": {
            "task": "summarize",
            "output": {"uri": "out/x/", "format": fmt, "storage_options": {"key": "***"}},
            "toxicity": {"threshold": 0.5, "action": "drop", "enabled": toxicity},
            "prompts": {"summarize": "Summarize: {text} <b>bold?</b>"},
        },
    }


def make_run(
    root: Path, fmt: str = "parquet", toxicity: bool = True, timed: bool = True, parts: int = 3
) -> tuple[str, dict[str, Any], RunSummary, list[tuple[float, int, int]]]:
    """A finished run directory's manifest and _summary.json: the summaries of ``parts`` parts of
    80 rows and of 6 rejected rows, and a minute of progress samples (none when not ``timed``)."""
    run_dir = str(root / "run-1")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = LABELS if toxicity else ()
    schema = _schema(labels, timed)
    threshold = 0.5 if toxicity else None

    def summary_of(rows: list[dict[str, Any]]) -> RunSummary:
        if not toxicity:
            for row in rows:
                row["toxic"] = row["toxicity_decision"] = None
        return RunSummary.of_table(pa.Table.from_pylist(rows, schema=schema), threshold)

    summary = RunSummary(threshold=threshold)
    for p in range(parts):
        summary.merge(summary_of(_rows(p * 80, 80, rng, labels)))
    rejected = 6 if toxicity else 0
    if rejected:
        summary.merge(summary_of(_rows(parts * 80, rejected, rng, labels, dropped=True)))
    # Rows finish over about a minute, faster in the middle.
    samples = (
        [(t, int(summary.rows * (t / 60) ** 1.5), int(7890 * (t / 60) ** 1.5)) for t in range(61)]
        if timed and summary.rows
        else [(0.0, 0, 0)]
    )
    manifest = _manifest(parts * 80 + rejected, rejected, fmt, toxicity)
    Path(run_dir, MANIFEST).write_text(json.dumps(manifest))
    Path(run_dir, SUMMARY).write_text(
        json.dumps({"summary": summary.to_json(), "progress": samples})
    )
    return run_dir, manifest, summary, samples


def charts(page: str) -> set[str]:
    return set(re.findall(r'<svg[^>]*\bdata-chart="([^"]+)"', page))


BASE_CHARTS = {
    "throughput",
    "prompt_tokens",
    "output_tokens",
    "finish_reasons",
    "toxicity_decisions",
}
ALL_CHARTS = BASE_CHARTS | {f"toxicity_{label}" for label in LABELS}


def assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""\b(?:src|href)\s*=|url\(|@import""", page)
    assert "<script" not in page.lower()  # no JavaScript at all, and data never becomes markup


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_report_has_every_chart_and_escapes_data(tmp_path: Path, fmt: str) -> None:
    run_dir, manifest, summary, samples = make_run(tmp_path, fmt)
    fs = fsspec.filesystem("file")
    path = report.write_report(fs, run_dir, manifest, summary, samples)
    assert path == f"{run_dir}/{report.REPORT}"
    page = Path(path).read_text(encoding="utf-8")

    assert charts(page) == ALL_CHARTS
    for name in ALL_CHARTS:  # every chart is labelled for screen readers and has a <title>
        svg = re.search(rf'<svg[^>]*data-chart="{name}"[^>]*>(.*?)</svg>', page, re.S)
        assert svg and 'aria-label="' in svg.group(0) and "<title>" in svg.group(1)
    assert_self_contained(page)
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page  # the error examples
    assert "&lt;b&gt;bold?&lt;/b&gt;" in page  # the config
    assert "no timing data" not in page
    # Errors: both kinds with counts from the rows (kept and rejected alike), one example each.
    assert re.search(r"<code>missing_text</code></td><td class=n>\d+</td>", page)
    assert "prompt_too_long in row" in page
    # The header summary comes from the manifest.
    for text in ("run-1", "summarize", "tiny-it@a7b89bc3bad2c73c", "246", "112.4", "1 min 10 s"):
        assert text in page
    assert '"format": "' + fmt + '"' in page.replace("&quot;", '"')


def test_report_counts_rejected_rows(tmp_path: Path) -> None:
    _, _, summary, _ = make_run(tmp_path)
    assert summary.rows == 246 and summary.rejected == 6 and summary.parts == 4
    assert summary.decisions == {"keep": 226, "drop": 6}
    assert sum(summary.finish_reasons.values()) == 246
    assert sum(summary.toxicity["toxicity"]) + summary.toxicity_unscored["toxicity"] == 246
    assert summary.toxicity_over["insult"] >= 6  # the rejected rows are in the histograms
    assert len(summary.samples) == SAMPLE_ROWS


def test_report_without_toxicity_or_timing(tmp_path: Path) -> None:
    run_dir, manifest, summary, samples = make_run(tmp_path, toxicity=False, timed=False, parts=1)
    page = report.build_report(manifest, summary, samples, run_dir)
    assert charts(page) == BASE_CHARTS
    assert "no timing data" in page and "no toxicity decisions" in page
    assert_self_contained(page)


def test_report_of_an_empty_run(tmp_path: Path) -> None:
    run_dir, _, summary, samples = make_run(tmp_path, parts=0, toxicity=False)
    manifest = _manifest(0, 0, "parquet")
    fs = fsspec.filesystem("file")
    page = Path(report.write_report(fs, run_dir, manifest, summary, samples)).read_text()
    assert charts(page) == BASE_CHARTS
    assert "no rows" in page and "No errors." in page
    assert_self_contained(page)


def test_rebuild_and_summary(tmp_path: Path) -> None:
    run_dir, *_ = make_run(tmp_path, fmt="jsonl", parts=1)
    summary, uri = report.rebuild(run_dir + "/")
    assert uri == f"{run_dir}/{report.REPORT}" and Path(uri).is_file()
    assert "data-chart" in Path(uri).read_text()
    lines = summary.splitlines()
    assert lines[0].startswith("run run-1: succeeded")
    assert any("86 (80 written, 6 rejected)" in line for line in lines)
    assert any("stop 150, length 80, error 15" in line for line in lines)
    assert any("missing_text 8, prompt_too_long 7" in line for line in lines)
    assert any("112.4 output tokens/s" in line and "1 min 10 s" in line for line in lines)
    assert lines[-1].endswith(uri)

    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        report.rebuild(str(tmp_path / "nowhere"))


# Headless Chromium ---------------------------------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,2400",
)


def chromium(tmp: Path, name: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail(
            "chromium is not installed (needed to render report.html): `make test` installs it "
            "(apt-get install -y chromium)",
            pytrace=False,
        )
    profile = tmp / f"profile-{name}"
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def console_lines(stderr: str) -> list[str]:
    """Chromium's console log lines (``...:INFO:CONSOLE:1] "msg", source: ...``) and errors."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    run_dir, manifest, summary, samples = make_run(tmp_path / "data")
    fs = fsspec.filesystem("file")
    path = Path(report.write_report(fs, run_dir, manifest, summary, samples))
    url = path.resolve().as_uri()

    # (1) A screenshot of the page.
    shot = tmp_path / "report.png"
    chromium(tmp_path, "shot", url, f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert png_size(shot) == (1280, 2400)

    # (2) The page loads without console errors and every chart is in the rendered DOM.
    result = chromium(tmp_path, "dom", url, "--dump-dom", "--enable-logging=stderr", "--v=0")
    assert charts(result.stdout) == ALL_CHARTS
    assert "<script" not in result.stdout.lower()
    assert console_lines(result.stderr) == [], result.stderr


def test_console_error_detection_works(tmp_path: Path) -> None:
    """The console check above would see a failing page: Chromium logs it to stderr."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><p>x</p><script>throw new Error('boom')</script>")
    result = chromium(
        tmp_path, "bad", bad.as_uri(), "--dump-dom", "--enable-logging=stderr", "--v=0"
    )
    lines = console_lines(result.stderr)
    assert any("Uncaught" in line and "boom" in line for line in lines), result.stderr
