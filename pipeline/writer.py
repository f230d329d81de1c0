"""Output layout, finalisation and the run manifest.

Ray Data writes the part files (two-phase, checkpointed by row id, so a rerun only adds the rows
that were not committed). Finalisation then runs on the driver and is idempotent: rows the
toxicity policy dropped move from each part file to ``rejected/`` (same file name), every id is
checked to appear exactly once, ``_manifest.json`` is written, and ``_SUCCESS`` last.

    <output uri>/<run id>/part-*.parquet | part-*.jsonl
    <output uri>/<run id>/rejected/part-*
    <output uri>/<run id>/_manifest.json
    <output uri>/<run id>/_SUCCESS
"""

from __future__ import annotations

import collections
import io
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq
from ray.data.datasource import FilenameProvider

from pipeline import schema as S

SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"
REJECTED = "rejected"
CHECKPOINT_DIR = "_checkpoint"
EXTENSIONS = {"parquet": "parquet", "jsonl": "jsonl"}


class DuplicateRowsError(RuntimeError):
    """The output holds an id more than once: the exactly-once guarantee was broken."""


class PartFilenames(FilenameProvider):
    """part-<write uuid>-<task>-<block>.<ext>: unique per write attempt, sortable."""

    def __init__(self, fmt: str) -> None:
        self.ext = EXTENSIONS[fmt]

    def get_filename_for_block(
        self, block: Any, write_uuid: str, task_index: int, block_index: int
    ) -> str:
        return f"part-{write_uuid}-{task_index:06d}-{block_index:06d}.{self.ext}"

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}-{task_index:06d}.{self.ext}"


def output_filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """(fsspec filesystem, path without protocol) for an output URI."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path.rstrip("/")


def arrow_filesystem(fs: fsspec.AbstractFileSystem):
    """A pyarrow filesystem over an fsspec one (what Ray Data's writers and checkpoints take)."""
    import pyarrow.fs as pafs

    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def is_complete(fs: fsspec.AbstractFileSystem, run_dir: str) -> bool:
    return fs.exists(posixpath.join(run_dir, SUCCESS))


def part_files(fs: fsspec.AbstractFileSystem, directory: str, fmt: str) -> list[str]:
    if not fs.exists(directory):
        return []
    pattern = posixpath.join(directory, f"part-*.{EXTENSIONS[fmt]}")
    return sorted(fs.glob(pattern))


def read_part(fs: fsspec.AbstractFileSystem, path: str, fmt: str) -> pa.Table:
    with fs.open(path, "rb") as handle:
        data = handle.read()
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data))
    if not data.strip():
        return pa.table({})
    return pajson.read_json(io.BytesIO(data))


def write_part(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, fmt: str) -> None:
    """Writes a whole file in one put (atomic on object stores; rename-free on local disk)."""
    buffer = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, buffer)
    else:
        for row in table.to_pylist():
            buffer.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
    fs.pipe_file(path, buffer.getvalue())


@dataclass
class RunStats:
    """What the manifest counts."""

    rows: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    truncated: int = 0
    finish_reasons: collections.Counter = field(default_factory=collections.Counter)
    error_kinds: collections.Counter = field(default_factory=collections.Counter)
    toxicity_decisions: collections.Counter = field(default_factory=collections.Counter)
    toxic: int = 0
    models: set[str] = field(default_factory=set)

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.rows += table.num_rows
        self.prompt_tokens += _sum(table, S.PROMPT_TOKENS)
        self.output_tokens += _sum(table, S.OUTPUT_TOKENS)
        self.truncated += _sum(table, S.PROMPT_TRUNCATED)
        self.toxic += _sum(table, S.TOXIC)
        for name, counter in (
            (S.FINISH_REASON, self.finish_reasons),
            (S.ERROR_KIND, self.error_kinds),
            (S.TOXICITY_DECISION, self.toxicity_decisions),
        ):
            if name in table.column_names:
                counter.update(v for v in table.column(name).to_pylist() if v is not None)
        if S.MODEL in table.column_names:
            self.models.update(v for v in table.column(S.MODEL).to_pylist() if v)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "rows_written": self.rows - self.rejected,
            "rows_rejected": self.rejected,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "prompts_truncated": self.truncated,
            "finish_reasons": dict(sorted(self.finish_reasons.items())),
            "error_kinds": dict(sorted(self.error_kinds.items())),
            "toxicity_decisions": dict(sorted(self.toxicity_decisions.items())),
            "toxic": self.toxic,
        }


def _sum(table: pa.Table, name: str) -> int:
    if name not in table.column_names:
        return 0
    value = pc.sum(pc.cast(table.column(name), pa.int64())).as_py()
    return int(value or 0)


def finalize(fs: fsspec.AbstractFileSystem, run_dir: str, fmt: str) -> RunStats:
    """Moves dropped rows to rejected/, checks ids are unique, and counts everything."""
    stats, seen = RunStats(), set()
    rejected_dir = posixpath.join(run_dir, REJECTED)
    for path in part_files(fs, run_dir, fmt):
        table = read_part(fs, path, fmt)
        if S.TOXICITY_DECISION in table.column_names and table.num_rows:
            dropped = pc.fill_null(pc.equal(table.column(S.TOXICITY_DECISION), "drop"), False)
            if pc.any(dropped).as_py():
                fs.makedirs(rejected_dir, exist_ok=True)
                target = posixpath.join(rejected_dir, posixpath.basename(path))
                write_part(fs, target, table.filter(dropped), fmt)
                table = table.filter(pc.invert(dropped))
                write_part(fs, path, table, fmt)
        _check_ids(table, seen, path)
        stats.add(table)
    for path in part_files(fs, rejected_dir, fmt):
        table = read_part(fs, path, fmt)
        _check_ids(table, seen, path)
        stats.add(table)
        stats.rejected += table.num_rows
    return stats


def _check_ids(table: pa.Table, seen: set[str], path: str) -> None:
    if table.num_rows == 0:
        return
    for row_id in table.column(S.ID).to_pylist():
        if row_id in seen:
            raise DuplicateRowsError(f"row id {row_id!r} appears more than once (again in {path})")
        seen.add(row_id)


def write_manifest(fs: fsspec.AbstractFileSystem, run_dir: str, manifest: dict[str, Any]) -> None:
    fs.pipe_file(
        posixpath.join(run_dir, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode()
    )


def mark_success(fs: fsspec.AbstractFileSystem, run_dir: str) -> None:
    fs.pipe_file(posixpath.join(run_dir, SUCCESS), b"")
