"""The run directory: its layout, the reader's ledgers, resume, finalisation and ``_SUCCESS``.

Everything a run keeps under ``<output uri>/<run id>/`` (:func:`run_dir_uri`), apart from the part
encoding (:mod:`pipeline.writer`) and the run contract's two files (:mod:`pipeline.contract`)::

    part-<write uuid>-<task>.<ext>            rows the toxicity policy keeps (the writer's)
    rejected/part-...                          rows it drops, with their scores (the writer's)
    errors/part-...                            an output format's error file (request lines it
                                               cannot answer in place; the writer's)
    _stats/part-....json                       each part's RunSummary (the writer's)
    _inputs/<file digest>.json                 each input file's row count, once read in full
    _ids/<file digest>-<batch>.parquet         the typed id keys of each batch (repeat counts)
    _checkpoint/                               Ray Data's resume checkpoint (removed on success)
    _run.json, _lease.json                     the run contract: its identity, its driver
    _manifest.json                             counts, rows in / out per input file, config
    _summary.json                              the merged summary and progress samples
    report.html
    _SUCCESS                                   written last

Resume: Ray Data's checkpoint lists the committed rows by resume key (``row_key``: input file and
position, unique even where ids repeat; not the id). A rerun of the run id reads only the rows it
does not list (:func:`checkpoint_config`). The checkpoint lives under the run directory, or in
``<run.checkpoint_uri>/<run id>`` (:func:`checkpoint_uri`): a checkpoint belongs to one run id.

Ledgers: read tasks write ``_inputs/`` and ``_ids/`` (:class:`InputLedger`) identically on every
attempt (each attempt rereads the files), so they never need rolling back. Finalisation reads no
output part: :func:`collect` merges the per-part summaries and the input counts in Ray tasks and
hands the driver one summary, whose size does not grow with the number of rows;
:func:`check_rows` compares rows in and out per input file; :func:`mark_success` ends the run.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import posixpath
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.checkpoint import CheckpointConfig

from model.storage import filesystem
from pipeline import columns as S
from pipeline.summary import RunSummary

if TYPE_CHECKING:
    from pipeline.config import JobConfig

SUCCESS = "_SUCCESS"
MANIFEST = "_manifest.json"
SUMMARY = "_summary.json"
REJECTED = "rejected"
STATS_DIR = "_stats"
INPUTS_DIR = "_inputs"
IDS_DIR = "_ids"
CHECKPOINT_DIR = "_checkpoint"
RUN_RECORD = "_run.json"
LEASE = "_lease.json"
MERGE_GROUP = 256  # summaries merged per task


class RunIntegrityError(RuntimeError):
    """The outputs do not hold every input row exactly once."""


# Layout and resume -------------------------------------------------------------------------------


def run_dir_uri(config: JobConfig) -> str:
    """<output uri>/<run id>, unless the output URI template already names the run id."""
    uri = config.output.uri.rstrip("/")
    if "{run_id}" in (config.templates.get("output.uri") or ""):
        return uri
    return f"{uri}/{config.run_id}"


def checkpoint_uri(config: JobConfig) -> str | None:
    """The run's own place in ``run.checkpoint_uri``: ``<checkpoint uri>/<run id>``, unless the
    template already names the run id; None when the checkpoint lives under the run directory.

    A checkpoint belongs to one run id: it lists the rows that run committed, so a second run id
    sharing the location would take those rows as its own and write none of them.
    """
    uri = config.run.checkpoint_uri
    if not uri:
        return None
    if "{run_id}" in (config.templates.get("run.checkpoint_uri") or ""):
        return uri
    return posixpath.join(uri.rstrip("/"), config.run_id)


def checkpoint_config(config: JobConfig, run_dir: str, pa_fs: Any) -> CheckpointConfig:
    """Ray Data's resume, keyed on the row key (unique even when ids repeat; not the id): in
    the run's place of the user's location (:func:`checkpoint_uri`) or under the run."""
    own = checkpoint_uri(config)
    if own is not None:
        return CheckpointConfig(
            id_column=S.ROW_KEY, checkpoint_path=own, delete_checkpoint_on_success=False
        )
    return CheckpointConfig(
        id_column=S.ROW_KEY,
        checkpoint_path=posixpath.join(run_dir, CHECKPOINT_DIR),
        override_filesystem=pa_fs,
        delete_checkpoint_on_success=False,
    )


def drop_checkpoint(fs: Any, config: JobConfig, run_dir: str) -> None:
    """Removes the checkpoint under the run directory once the run succeeded."""
    if config.run.checkpoint_uri:
        return  # the user's location (its <run id> directory): theirs to manage
    path = posixpath.join(run_dir, CHECKPOINT_DIR)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def prepare(
    fs: fsspec.AbstractFileSystem, run_dir: str, *, rejected: bool, error_dir: str | None = None
) -> None:
    """Creates the run directory and the ledgers' directories (and ``rejected/`` when asked, and
    the output format's error file directory when it has one)."""
    for sub in ("", STATS_DIR, INPUTS_DIR, IDS_DIR, REJECTED if rejected else "", error_dir or ""):
        fs.makedirs(posixpath.join(run_dir, sub).rstrip("/"), exist_ok=True)


def read_manifest(fs: fsspec.AbstractFileSystem, run_dir: str) -> dict[str, Any]:
    return json.loads(fs.cat_file(posixpath.join(run_dir, MANIFEST)))


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
    """Rows in and out per input file (and why, for a file that could not be read in full);
    raises RunIntegrityError naming the files that differ."""
    per_file: dict[str, Any] = {
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
    for uri, reason in summary.unreadable.items():
        if uri in per_file:
            per_file[uri]["unreadable"] = reason
    return per_file


def is_complete(fs: fsspec.AbstractFileSystem, run_dir: str) -> bool:
    return fs.exists(posixpath.join(run_dir, SUCCESS))


def write_json(fs: fsspec.AbstractFileSystem, path: str, data: Any) -> None:
    fs.pipe_file(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False).encode())


def mark_success(fs: fsspec.AbstractFileSystem, run_dir: str) -> None:
    fs.pipe_file(posixpath.join(run_dir, SUCCESS), b"")
