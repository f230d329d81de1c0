"""Shared pieces of the pipeline tests: offline fixtures, small corpora, job configs, output reads."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import yaml

from pipeline.config import JobConfig, load_job_config
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
