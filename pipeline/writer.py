"""The writer: one pass from the plan to the run directory, and the run's small ledgers.

:class:`RunDatasink` is the plan's last step (``Dataset.write_datasink``). Each write task gets a
bundle of at least ``output.rows_per_file`` rows and writes, all under the same name prefix::

    <run dir>/part-<write uuid>-<task>.<ext>           rows the toxicity policy keeps
    <run dir>/rejected/part-<write uuid>-<task>.<ext>  rows it drops (with their scores)
    <run dir>/_stats/part-<write uuid>-<task>.json     the RunSummary of both

Ray Data's resume writes a pending checkpoint of the bundle's ids before the task writes and
commits it after; a pending checkpoint found by the next attempt deletes every file under the run
directory whose name starts with its prefix, so a part, its rejected rows and its summary are
committed or rolled back together. Rows are written once, to their final place: nothing reads a
part back.

The reader records each input file's row count under ``_inputs/`` once it has read the whole file
(idempotent: every attempt rereads the files and writes the same count). At the end,
:func:`collect` merges the summaries and input counts in Ray tasks and hands the driver one
summary: its size does not grow with the number of rows.

    <run dir>/_manifest.json   counts, rows in / out per input file, timings, redacted config
    <run dir>/_summary.json    the merged summary and progress samples (what report.html plots)
    <run dir>/report.html
    <run dir>/_SUCCESS         written last
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import posixpath
from collections.abc import Iterable
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray._common.retry import call_with_retry
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink, FilenameProvider

from model.storage import filesystem
from pipeline import columns as S
from pipeline import formats
from pipeline.secrets import mask_text
from pipeline.summary import DROP, RunSummary

SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"
SUMMARY = "_summary.json"
REJECTED = "rejected"
STATS_DIR = "_stats"
INPUTS_DIR = "_inputs"
IDS_DIR = "_ids"
CHECKPOINT_DIR = "_checkpoint"
MERGE_GROUP = 256  # summaries merged per task


class RunIntegrityError(RuntimeError):
    """The outputs do not hold every input row exactly once."""


class PartFilenames(FilenameProvider):
    """part-<write uuid>-<task>.<ext>: unique per write attempt, sortable."""

    def __init__(self, fmt: str) -> None:
        self.ext = formats.writer(fmt).extension

    def get_filename_for_block(
        self, block: Any, write_uuid: str, task_index: int, block_index: int
    ) -> str:
        return f"part-{write_uuid}-{task_index:06d}-{block_index:06d}.{self.ext}"

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}-{task_index:06d}.{self.ext}"


class RunDatasink(BlockBasedFileDatasink):
    """Writes kept rows, rejected rows and the bundle's summary (see the module docstring)."""

    def __init__(
        self,
        path: str,
        *,
        fmt: str,
        filesystem: Any,
        rows_per_file: int,
        threshold: float | None,
    ) -> None:
        super().__init__(
            path,
            filesystem=filesystem,
            filename_provider=PartFilenames(fmt),
            min_rows_per_file=rows_per_file,
        )
        self.encoder = formats.writer(fmt)
        self.threshold = threshold

    def write_block(self, block: BlockAccessor, block_index: int, ctx: Any) -> dict[str, int]:
        from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

        name = self.filename_provider.get_filename_for_task(
            ctx.kwargs[WRITE_UUID_KWARG_NAME], ctx.task_idx
        )
        table = block.to_arrow()
        summary = RunSummary.of_table(table, self.threshold)
        dropped = _dropped(table)
        kept, rejected = table.filter(pc.invert(dropped)), table.filter(dropped)
        if kept.num_rows:
            self._put(posixpath.join(self.path, name), self.encoder.encode(kept))
        if rejected.num_rows:
            self._put(posixpath.join(self.path, REJECTED, name), self.encoder.encode(rejected))
        stats_name = name.rsplit(".", 1)[0] + ".json"
        self._put(posixpath.join(self.path, STATS_DIR, stats_name), summary.dumps())
        return {"rows": table.num_rows, "rejected": rejected.num_rows}

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, int]:
        from ray.data._internal.delegating_block_builder import DelegatingBlockBuilder

        builder = DelegatingBlockBuilder()
        for block in blocks:
            builder.add_block(block)
        accessor = BlockAccessor.for_block(builder.build())
        if accessor.num_rows() == 0:
            return {"rows": 0, "rejected": 0}
        return self.write_block(accessor, 0, ctx)

    def on_write_complete(self, write_result: Any) -> None:
        """Nothing to do: the run directory is the runner's, and so is finalisation."""

    def _put(self, path: str, data: bytes) -> None:
        def put() -> None:
            with self.open_output_stream(path) as stream:
                stream.write(data)

        call_with_retry(
            put,
            description=f"write {mask_text(path)!r}",
            match=self._data_context.retried_io_errors,
        )


def _dropped(table: pa.Table) -> pa.Array:
    if S.TOXICITY_DECISION not in table.column_names or table.num_rows == 0:
        return pa.array([False] * table.num_rows, pa.bool_())
    return pc.fill_null(pc.equal(table.column(S.TOXICITY_DECISION), DROP), False)


# Input counts --------------------------------------------------------------------------------------


class InputLedger:
    """What read tasks record about the input (see :class:`pipeline.readers.FileLedger`).

    ``_inputs/<file digest>.json`` holds a file's row count once it is read in full, and
    ``_ids/<file digest>-<batch>.parquet`` the typed id keys of each batch: both are rewritten
    identically by every attempt (every attempt rereads the files), so they never need rolling
    back. Picklable (a URI and storage options); an optional progress counter also hears of each
    file, which lets the progress line estimate a JSONL corpus' rows from its bytes.
    """

    def __init__(
        self, run_uri: str, storage_options: dict[str, Any] | None, progress: Any = None
    ) -> None:
        self.run_uri = run_uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.progress = progress

    def batch(self, source: str, index: int, id_keys: list[str | None]) -> None:
        keys = pa.array([k for k in id_keys if k is not None], pa.string())
        buffer = io.BytesIO()
        pq.write_table(pa.table({"key": keys}), buffer)
        fs, run_dir = filesystem(self.run_uri, self.storage_options)
        name = f"{_digest(source)}-{index:06d}.parquet"
        fs.pipe_file(posixpath.join(run_dir, IDS_DIR, name), buffer.getvalue())

    def done(self, source: str, rows: int, size: int | None) -> None:
        fs, run_dir = filesystem(self.run_uri, self.storage_options)
        record = json.dumps({"source": source, "rows": rows}, ensure_ascii=False).encode()
        fs.pipe_file(posixpath.join(run_dir, INPUTS_DIR, _digest(source) + ".json"), record)
        if self.progress is not None:
            self.progress.file_read.remote(rows, size)


SMALL_ID_COUNT = 2_000_000  # up to this many ids, one task counts them (~200 MB at most)
IDS_PER_PARTITION = 1_000_000


def count_repeats(
    run_uri: str, storage_options: dict[str, Any], pa_fs: Any, rows: int
) -> dict[str, int]:
    """Ids that occur more than once in the input, and the rows that hold them.

    Counted on the cluster from the id keys the readers recorded, never on the driver, which
    receives two numbers: up to :data:`SMALL_ID_COUNT` rows by one task, above that by a Ray Data
    group-by with a partition per million ids. Call it only for a run with an id column.
    """
    if rows <= SMALL_ID_COUNT:
        return ray.get(_count_repeats_small.remote(run_uri, storage_options))
    ids_dir = posixpath.join(filesystem(run_uri, storage_options)[1], IDS_DIR)
    partitions = max(1, rows // IDS_PER_PARTITION)
    counts = (
        ray.data.read_parquet(ids_dir, filesystem=pa_fs)
        .groupby("key", num_partitions=partitions)
        .count()
    )
    totals = counts.map_batches(_repeat_totals, batch_format="pyarrow").sum(["ids", "rows"])
    totals = totals or {"sum(ids)": 0, "sum(rows)": 0}  # no id at all: an empty dataset
    return {
        "ids_repeated": int(totals["sum(ids)"] or 0),
        "rows_with_repeated_ids": int(totals["sum(rows)"] or 0),
    }


@ray.remote
def _count_repeats_small(run_uri: str, storage_options: dict[str, Any]) -> dict[str, int]:
    fs, run_dir = filesystem(run_uri, storage_options)
    paths = _listing(fs, posixpath.join(run_dir, IDS_DIR), ".parquet")
    seen: collections.Counter = collections.Counter()
    for i in range(0, len(paths), MERGE_GROUP):
        for raw in fs.cat(paths[i : i + MERGE_GROUP]).values():
            if isinstance(raw, Exception):
                raise raw
            seen.update(pq.read_table(io.BytesIO(raw)).column("key").to_pylist())
    repeated = [n for n in seen.values() if n > 1]
    return {"ids_repeated": len(repeated), "rows_with_repeated_ids": sum(repeated)}


def _repeat_totals(table: pa.Table) -> pa.Table:
    count = next(table.column(c) for c in table.column_names if c != "key")
    repeated = pc.filter(count, pc.greater(count, 1))
    total = pc.sum(repeated).as_py() or 0
    return pa.table({"ids": pa.array([len(repeated)], pa.int64()), "rows": [total]})


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# Finalisation -------------------------------------------------------------------------------------


def collect(
    run_uri: str, storage_options: dict[str, Any] | None, threshold: float | None
) -> tuple[RunSummary, dict[str, int]]:
    """(merged summary of every committed part, rows read per input file), merged in Ray tasks."""
    summary, inputs = ray.get(_collect.remote(run_uri, dict(storage_options or {}), threshold))
    return RunSummary.from_json(summary), inputs


@ray.remote(num_cpus=0)
def _collect(
    run_uri: str, storage_options: dict[str, Any], threshold: float | None
) -> tuple[dict[str, Any], dict[str, int]]:
    fs, run_dir = filesystem(run_uri, storage_options)
    fs.invalidate_cache()
    stats = _listing(fs, posixpath.join(run_dir, STATS_DIR))
    inputs = _listing(fs, posixpath.join(run_dir, INPUTS_DIR))
    groups = [stats[i : i + MERGE_GROUP] for i in range(0, len(stats), MERGE_GROUP)]
    pending = [_merge_group.remote(run_uri, storage_options, g, threshold) for g in groups]
    counts_ref = _read_inputs.remote(run_uri, storage_options, inputs)
    total = RunSummary(threshold=threshold)
    for part in ray.get(pending):
        total.merge(RunSummary.from_json(part))
    return total.to_json(), ray.get(counts_ref)


def _listing(fs: fsspec.AbstractFileSystem, directory: str, suffix: str = ".json") -> list[str]:
    if not fs.exists(directory):
        return []
    return sorted(p for p in fs.find(directory) if p.endswith(suffix))


@ray.remote
def _merge_group(
    run_uri: str, storage_options: dict[str, Any], paths: list[str], threshold: float | None
) -> dict[str, Any]:
    fs, _ = filesystem(run_uri, storage_options)
    total = RunSummary(threshold=threshold)
    for _, raw in sorted(fs.cat(paths).items()):
        if isinstance(raw, Exception):
            raise raw
        total.merge(RunSummary.loads(raw))
    return total.to_json()


@ray.remote
def _read_inputs(run_uri: str, storage_options: dict[str, Any], paths: list[str]) -> dict[str, int]:
    fs, _ = filesystem(run_uri, storage_options)
    counts: dict[str, int] = {}
    for i in range(0, len(paths), MERGE_GROUP):
        for raw in fs.cat(paths[i : i + MERGE_GROUP]).values():
            if isinstance(raw, Exception):
                raise raw
            record = json.loads(raw)
            counts[record["source"]] = int(record["rows"])
    return counts


def check_rows(files: list[str], rows_in: dict[str, int], summary: RunSummary) -> dict[str, Any]:
    """Rows in and out per input file; raises RunIntegrityError naming the files that differ."""
    per_file = {
        uri: {"rows_in": rows_in.get(uri), "rows_out": int(summary.rows_per_source.get(uri, 0))}
        for uri in files
    }
    unread = [uri for uri, c in per_file.items() if c["rows_in"] is None]
    differ = [uri for uri, c in per_file.items() if c["rows_in"] not in (None, c["rows_out"])]
    strays = sorted(set(summary.rows_per_source) - set(files))
    if unread or differ or strays:
        lines = [f"{uri}: no row count recorded by the reader" for uri in unread[:10]]
        lines += [
            f"{uri}: {per_file[uri]['rows_in']} rows in, {per_file[uri]['rows_out']} rows out"
            for uri in differ[:10]
        ]
        lines += [f"{uri}: rows out from a file that is not an input" for uri in strays[:10]]
        raise RunIntegrityError(
            "the outputs do not hold every input row exactly once:\n  " + "\n  ".join(lines)
        )
    return per_file


def is_complete(fs: fsspec.AbstractFileSystem, run_dir: str) -> bool:
    return fs.exists(posixpath.join(run_dir, SUCCESS))


def write_json(fs: fsspec.AbstractFileSystem, path: str, data: Any) -> None:
    fs.pipe_file(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False).encode())


def mark_success(fs: fsspec.AbstractFileSystem, run_dir: str) -> None:
    fs.pipe_file(posixpath.join(run_dir, SUCCESS), b"")
