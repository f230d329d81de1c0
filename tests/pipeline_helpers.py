"""Shared pieces of the pipeline tests: offline fixtures, small corpora, job configs, output reads."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import posixpath
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import psutil
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import yaml

from pipeline import columns as S
from pipeline.config import JobConfig, load_job_config
from pipeline.formats import ReadSpec
from pipeline.readers import read_file
from testkit.tiny_detoxify import build_tiny_detoxify
from testkit.tiny_model import build_tiny_checkpoint

WORDS = [
    "the",
    "river",
    "rose",
    "overnight",
    "and",
    "the",
    "old",
    "bridge",
    "was",
    "closed",
    "while",
    "crews",
    "checked",
    "the",
    "supports",
    "a",
    "bakery",
    "on",
    "main",
    "street",
    "sold",
    "out",
    "of",
    "bread",
    "before",
    "noon",
    "as",
    "the",
    "fair",
    "opened",
    "in",
    "the",
    "square",
]


# The readers' test corpus, line by line: good, blank, non-string text, not UTF-8, not JSON, a JSON list, whitespace only,
# two identical rows, a row without id.
LINES: list[bytes] = [
    b'{"id": "a1", "text": "First document.", "question": "What?", "title": "One", "n": 3}',
    b"",
    b'{"id": 2, "text": 42, "question": "Why?", "title": null, "n": {"k": [1, 2]}}',
    b'{"id": "a3", "text": "caf\xe9"}',
    b"{not json",
    b"[1, 2, 3]",
    b"   \t",
    b'{"text": "Same row.", "title": "Dup"}',
    b'{"text": "Same row.", "title": "Dup"}',
    b'{"id": null, "text": "No id.", "prompt": "Write a poem."}',
]
N_ROWS = 8  # the blank and whitespace-only lines are not rows


def write_jsonl(path: Path, lines: list[bytes] = LINES) -> str:
    """Writes ``lines`` as a JSONL file (gzip for a ``.gz`` name); returns its path."""
    data = b"\n".join(lines) + b"\n"
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return str(path)


def build_fixtures(root: Path) -> dict[str, str]:
    """The tiny model (Kaggle layout) and the tiny detoxify checkpoint, as a test would point at."""
    variant_dir = build_tiny_checkpoint(root)
    detox = build_tiny_detoxify(root / "detoxify")
    return {"checkpoint": str(variant_dir), "detoxify": str(detox)}


def corpus_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    rows = []
    for i in range(start, start + n):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(5 + i % 9)]
        rows.append(
            {
                "id": f"doc-{i:04d}",
                "title": f"Title {i}",
                "text": " ".join(words).capitalize() + ".",
                "question": f"What happened on day {i}?",
                "prompt": "Write a line about " + " ".join(words[:3]),
            }
        )
    return rows


def write_corpus(
    fs: fsspec.AbstractFileSystem, directory: str, rows: list[dict[str, Any]], fmt: str, files: int
) -> None:
    fs.makedirs(directory, exist_ok=True)
    for part in range(files):
        chunk = rows[part::files]
        name = f"{directory}/in-{part:03d}.{'jsonl' if fmt == 'jsonl' else 'parquet'}"
        if fmt == "jsonl":
            fs.pipe_file(name, "".join(json.dumps(r) + "\n" for r in chunk).encode())
        else:
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(chunk), buffer)
            fs.pipe_file(name, buffer.getvalue())


def job_yaml(
    fixtures: dict[str, str],
    *,
    task: str,
    input_uri: str,
    output_uri: str,
    output_format: str = "parquet",
    extra: dict[str, Any] | None = None,
) -> str:
    data: dict[str, Any] = {
        "task": task,
        "input": {"uri": input_uri, "id_column": "id", "passthrough": ["title"]},
        "model": {"checkpoint": fixtures["checkpoint"], "dtype": "float32"},
        "generation": {
            "max_new_tokens": 6,
            "max_prompt_tokens": 96,
            "max_slots": 8,
            "prefill_batch": 4,
            "prefill_chunk": 32,
            "batch_size": 8,
        },
        "toxicity": {"checkpoint": fixtures["detoxify"], "batch_size": 16},
        "output": {"uri": output_uri, "format": output_format},
    }
    for section, values in (extra or {}).items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return yaml.safe_dump(data)


def read_table(uri: str, fmt: str | None = None, **settings: Any) -> pa.Table:
    """Every row of one input file in one table: the reader's batches (:func:`read_file`) joined;
    ``fmt`` and ``settings`` make the :class:`ReadSpec`."""
    return pa.concat_tables(list(read_file(uri, ReadSpec(format=fmt, **settings))))


def job_config(text: str, run_id: str, **kwargs: Any) -> JobConfig:
    return load_job_config(text=text, run_id=run_id, date="2026-11-27", **kwargs)


def read_output(fs: fsspec.AbstractFileSystem, run_dir: str, fmt: str, sub: str = "") -> pa.Table:
    ext = "parquet" if fmt == "parquet" else "jsonl"
    directory = f"{run_dir}/{sub}".rstrip("/")
    tables = []
    for path in sorted(fs.glob(f"{directory}/part-*.{ext}")):
        data = fs.cat_file(path)
        table = (
            pq.read_table(io.BytesIO(data))
            if fmt == "parquet"
            else pajson.read_json(io.BytesIO(data))
        )
        tables.append(table)
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


def committed_keys(checkpoint_dir: Path) -> set[str]:
    """Row keys Ray Data's checkpoint recorded as written (parquet files with the resume key).

    Its writes are two-phase: a ``*.pending.parquet`` checkpoint is written before the data file
    and renamed once the data file is complete. A rerun rolls pending ones back (their rows are
    generated again), so only renamed (committed) files count.
    """
    ids: set[str] = set()
    for path in checkpoint_dir.rglob("*.parquet"):
        if path.name.endswith(".pending.parquet"):
            continue
        try:
            table = pq.read_table(io.BytesIO(path.read_bytes()))
            ids.update(table.column(S.ROW_KEY).to_pylist())
        except Exception:  # a file cut off by the kill was never committed
            continue
    return ids


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (the local Ray cluster included)."""
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait(timeout=60)


def run_cli(
    config: Path,
    run_id: str,
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    args: tuple[str, ...] = (),
) -> subprocess.Popen:
    """``python -m pipeline.cli run config --run-id run_id`` in its own session (so that
    :func:`kill_tree` takes its Ray cluster too); ``env`` is added to this environment and the
    output goes to ``log`` (appended) or nowhere."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", str(config), "--run-id", run_id, *args],
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    finally:
        if log is not None:
            out.close()


def part_names(fs: fsspec.AbstractFileSystem, run_dir: str, fmt: str = "parquet") -> set[str]:
    """The part files of a run, kept and rejected (paths relative to the run directory)."""
    fs.invalidate_cache()
    ext = "parquet" if fmt == "parquet" else "jsonl"
    names = set()
    for sub in ("", "rejected/"):
        for path in fs.glob(f"{run_dir}/{sub}part-*.{ext}"):
            names.add(sub + posixpath.basename(path))
    return names


def check_complete_run(
    fs: fsspec.AbstractFileSystem, run_dir: str, rows: list[dict[str, Any]], fmt: str = "parquet"
) -> pa.Table:
    """Asserts what a finished run promises and returns its rows (kept and rejected).

    ``_SUCCESS`` is there; every input row is in the outputs exactly once; the manifest's counts
    are what the files hold (rows, output tokens, rows in = rows out per input file, no repeated
    id); each part has its summary under ``_stats/`` and no summary is left without its part.
    """
    fs.invalidate_cache()
    assert fs.exists(f"{run_dir}/_SUCCESS")
    kept = read_output(fs, run_dir, fmt)
    rejected = read_output(fs, run_dir, fmt, "rejected")
    table = (
        kept
        if not rejected.num_rows
        else pa.concat_tables([kept, rejected], promote_options="default")
    )
    ids = table.column(S.ID).to_pylist()
    assert len(ids) == len(set(ids)), "a row is in the outputs more than once"
    assert sorted(ids) == sorted(r["id"] for r in rows), "a row is missing from the outputs"
    manifest = json.loads(fs.cat_file(f"{run_dir}/_manifest.json"))
    counts = manifest["counts"]
    assert manifest["status"] == "succeeded"
    assert counts["rows"] == len(rows) == table.num_rows
    assert counts["output_tokens"] == sum(table.column(S.OUTPUT_TOKENS).to_pylist())
    assert counts.get("ids_repeated", 0) == 0
    assert all(c["rows_in"] == c["rows_out"] for c in manifest["inputs"].values())
    assert sum(c["rows_in"] for c in manifest["inputs"].values()) == len(rows)
    stems = {posixpath.basename(n).rsplit(".", 1)[0] for n in part_names(fs, run_dir, fmt)}
    stats = {posixpath.basename(p).rsplit(".", 1)[0] for p in fs.find(f"{run_dir}/_stats")}
    assert stats == stems, "the part summaries differ from the parts"
    return table
