"""One job, end to end, on Ray Data: the plan (read -> stages -> write), then finalisation.

Ray Data does the sharding, streaming, backpressure, retries and resume: its checkpointing is keyed
on the resume key (the ``row_key`` column: file and position, unique even where ids repeat), so
rerunning an interrupted run id generates only the rows that were not committed.
The caller connects to Ray (``ray.init``) before calling :func:`run_job`; nothing here changes
global Ray state: the current DataContext's checkpoint config is set for the run and restored.
Before anything is written the run waits (``run.resource_wait_s``) until the cluster has room for
one actor of each stage (:mod:`pipeline.resources`). A finished run id is left as it is, except
what a driver killed after ``_SUCCESS`` left: its lease and the resume checkpoint are removed.

The run's state and start time, and the counts of its tasks, go to the run metrics
(:mod:`pipeline.metrics`).

Finalisation reads no output part: the per-part summaries and the reader's per-file row counts
are merged in Ray tasks (:func:`pipeline.rundir.collect`), rows in and out are compared per input
file (a difference fails the run), then ``_summary.json``, ``report.html`` (a report that fails
to build is recorded in the manifest, and the run still succeeds), ``_manifest.json`` and
``_SUCCESS`` are written, in that order.

Retries: the storage clients retry most faults themselves when told to (for S3, botocore's
``config_kwargs: {retries: {mode: standard, max_attempts: 10}}`` in the storage options). What
still gets through to Ray Data is retried by it when the message matches its
``retried_io_errors``, whose defaults name only Arrow's own S3 client's errors: the runner adds
:data:`RETRIED_IO_ERRORS` (what s3fs / botocore raise) for the run. A model batch whose engine step
failed is retried too (:data:`ENGINE_RETRIED_ERRORS`, ``model.batch_retries`` times).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import ray

from model.storage import arrow_filesystem, file_sizes, filesystem
from model.tokenizer import Tokenizer
from pipeline import formats, metrics
from pipeline.config import JobConfig, redacted_dict
from pipeline.contract import (
    Lease,
    check_identity,
    record_identity,
    release_dead_lease,
    run_identity,
)
from pipeline.formats.base import ReadSpec
from pipeline.plan import build_dataset, check_passthrough
from pipeline.progress import InputTotal, ProgressCounter, ProgressReporter
from pipeline.report import write_report
from pipeline.resources import wait_for_resources
from pipeline.rundir import (
    MANIFEST,
    SUMMARY,
    InputLedger,
    check_rows,
    checkpoint_config,
    collect,
    count_repeats,
    drop_checkpoint,
    is_complete,
    mark_success,
    prepare,
    read_manifest,
    run_dir_uri,
    write_json,
)
from pipeline.secrets import mask_text, mask_uri
from pipeline.stage import PlanContext
from pipeline.summary import RunSummary
from pipeline.writer import RunDatasink

log = logging.getLogger(__name__)

# Errors from fsspec-based storage (s3fs over aiobotocore) that a later attempt may not meet: a
# connection refused, reset or cut mid-transfer, a timeout, S3 throttling (503 SlowDown) or
# unavailability. Regexes matched against "ExceptionClass: message" by Ray Data's file reads,
# writes (pipeline.writer.RunDatasink too) and checkpoint writes, on top of its own defaults. The
# corpus reader relies on the storage client's retries alone.
RETRIED_IO_ERRORS = (
    r"EndpointConnectionError",
    r"ConnectionClosedError",
    r"ConnectTimeoutError",
    r"ReadTimeoutError",
    r"ResponseStreamingError",
    r"IncompleteRead",
    r"[Rr]esponse payload is not completed",
    r"[Rr]educe your request rate",
    r"SlowDown",
    r"Service ?Unavailable",
    r"ServerDisconnectedError",
    r"ClientOSError",
)
# A model batch that failed because an engine step raised (pipeline.model_stage.EngineStepError).
ENGINE_RETRIED_ERRORS = (r"EngineStepError",)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    run_dir: str  # URI of <output uri>/<run id>
    status: str  # "succeeded" | "already_complete"
    manifest: dict[str, Any]


def precheck(config: JobConfig) -> RunResult | None:
    """What can be answered from the run directory alone, before any cluster is joined: a
    config that differs from the run id's recorded one, or a lease held by a live driver, raise
    :class:`~pipeline.contract.RunRefused` (exit 2); a complete run id is returned as
    ``already_complete``. None: the run has work to do (:func:`run_job` checks all this too)."""
    return _precheck(config)[0]


def _precheck(config: JobConfig) -> tuple[RunResult | None, dict[str, Any], bool]:
    if not config.is_rendered:
        raise ValueError("run_job needs a rendered config (load_job_config renders it)")
    check_passthrough(config)  # what load_job_config checks, for configs built otherwise
    run_uri = run_dir_uri(config)
    out = config.output
    fs, run_dir = filesystem(run_uri, out.storage_options)
    identity = run_identity(config)
    recorded = check_identity(fs, run_dir, config.run_id, identity)
    if is_complete(fs, run_dir):
        log.info("run %s already complete at %s: nothing to do", config.run_id, mask_uri(run_uri))
        _tidy_finished_run(config, run_uri, fs, run_dir)
        manifest = read_manifest(fs, run_dir)
        return RunResult(config.run_id, run_uri, "already_complete", manifest), identity, recorded
    Lease(run_uri, out.storage_options, config.run.lease_timeout_s).check()
    return None, identity, recorded


def run_job(config: JobConfig) -> RunResult:
    """Runs (or resumes) ``config`` as its run id; a run id that has _SUCCESS is not touched."""
    done, identity, recorded = _precheck(config)
    if done is not None:
        return done
    metrics.run_state(config.run_id, "waiting")
    run_uri = run_dir_uri(config)
    out = config.output
    fs, run_dir = filesystem(run_uri, out.storage_options)
    wait_for_resources(config)  # nothing is written before the cluster has room for the plan
    fs.makedirs(run_dir, exist_ok=True)
    with Lease(run_uri, out.storage_options, config.run.lease_timeout_s):
        if not recorded:
            record_identity(fs, run_dir, identity)
        return _attempt(config, run_uri, fs, run_dir)


def _attempt(config: JobConfig, run_uri: str, fs: Any, run_dir: str) -> RunResult:
    started = time.time()
    prepare(
        fs,
        run_dir,
        rejected=_drops(config),
        error_dir=formats.writer(config.output.format).error_dir,
    )
    pa_fs = arrow_filesystem(fs)
    context = ray.data.DataContext.get_current()
    settings = {
        "checkpoint_config": checkpoint_config(config, run_dir, pa_fs),
        "retried_io_errors": _merged(context.retried_io_errors, RETRIED_IO_ERRORS),
        "retried_map_errors": list(ENGINE_RETRIED_ERRORS),
        "max_map_retries": config.model.batch_retries,
    }
    previous = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    metrics.run_state(config.run_id, "running", started)
    try:
        result = _run(config, run_uri, fs, run_dir, pa_fs, started)
    except Exception:  # not on SIGTERM / Ctrl-C: the driver unwinds at once (lease released)
        metrics.run_state(config.run_id, "failed")
        raise
    else:
        metrics.run_state(config.run_id, "succeeded")
        return result
    finally:
        for name, value in previous.items():
            setattr(context, name, value)


def _merged(patterns: list[str], more: tuple[str, ...]) -> list[str]:
    return [*patterns, *(p for p in more if p not in patterns)]


def _run(
    config: JobConfig, run_uri: str, fs: Any, run_dir: str, pa_fs: Any, started: float
) -> RunResult:
    out = config.output
    files = config.input_files()
    sizes = file_sizes(files, config.input.storage_options)
    log.info("run %s: %d input files -> %s", config.run_id, len(files), mask_uri(run_uri))
    counter = ProgressCounter.remote()
    context = PlanContext(tokenizer=driver_tokenizer(config), progress=counter)
    ledger = InputLedger(run_uri, out.storage_options, progress=counter)
    predicted = _estimate(config, files, sizes, context.tokenizer)
    dataset = build_dataset(config, files, context, sizes=sizes, ledger=ledger)
    total = InputTotal.of_files(files, config.input.format, sizes, config.input.storage_options)
    threshold = config.toxicity.threshold if config.toxicity.enabled else None
    sink = RunDatasink(
        run_dir,
        fmt=out.format,
        filesystem=pa_fs,
        rows_per_file=out.rows_per_file,
        threshold=threshold,
        run_id=config.run_id,
    )
    with ProgressReporter(counter, total, interval_s=config.run.progress_interval_s) as progress:
        dataset.write_datasink(sink)
    metrics.run_state(config.run_id, "finalizing")
    operators = operator_seconds(dataset)
    ray.data.DataContext.get_current().checkpoint_config = None  # the counts below are not resumed
    summary, rows_in = collect(run_uri, out.storage_options, threshold)
    per_file = check_rows([mask_uri(f) for f in files], rows_in, summary)
    repeats = {}
    if formats.reader(config.input.format).records_ids(ReadSpec.from_config(config)):
        repeats = count_repeats(run_uri, out.storage_options, pa_fs, summary.rows)
    finished = time.time()
    manifest = _manifest(config, per_file, summary, started, finished)
    manifest["operator_task_s"] = operators
    if predicted is not None:
        manifest["estimate"] = predicted
    manifest["counts"].update(repeats)
    answered = formats.reader(config.input.format).answered_errors
    failure = error_policy(summary, config.run.max_error_fraction, answered)
    if failure is not None:
        manifest.update(status="failed", error=failure)
    write_json(
        fs,
        posixpath.join(run_dir, SUMMARY),
        {"summary": summary.to_json(), "progress": progress.samples},
    )
    manifest["report"] = _report(fs, run_dir, manifest, summary, progress.samples)
    write_json(fs, posixpath.join(run_dir, MANIFEST), manifest)
    if failure is not None:  # the data, summary and report stand; no _SUCCESS: a rerun resumes
        raise RunFailed(
            f"run {config.run_id}: {failure} (report: {mask_uri(run_uri.rstrip('/'))}/report.html)"
        )
    mark_success(fs, run_dir)
    drop_checkpoint(fs, config, run_dir)
    log.info("run %s succeeded: %s", config.run_id, json.dumps(manifest["counts"]))
    return RunResult(config.run_id, run_uri, "succeeded", manifest)


def _estimate(
    config: JobConfig, files: list[str], sizes: list[int] | None, tokenizer: Tokenizer
) -> dict[str, Any] | None:
    """The run's estimate from a sample (``run.estimate``); one that fails is recorded, not
    raised: it describes the run and decides nothing."""
    if not config.run.estimate:
        return None
    from pipeline.estimate import Throughput, estimate

    given = config.run.estimate_tokens_per_s
    try:
        result = estimate(
            config,
            tokenizer,
            files=files,
            sizes=sizes,
            throughput=Throughput.given(given) if given else None,
        )
    except Exception as exc:
        log.warning("run %s: no estimate (%s: %s)", config.run_id, type(exc).__name__, exc)
        return {"error": mask_text(f"{type(exc).__name__}: {exc}")}
    log.info("run %s: estimate %s", config.run_id, "; ".join(result.lines()))
    return result.to_json()


class RunFailed(RuntimeError):
    """The run ended without _SUCCESS (its manifest says why); a rerun may resume it."""


def error_policy(
    summary: RunSummary, max_fraction: float, answered: tuple[str, ...] = ()
) -> str | None:
    """Why the run fails under ``run.max_error_fraction``, or None. Error kinds in ``answered``
    (the input format's answers to bad requests: :attr:`Reader.answered_errors
    <pipeline.formats.base.Reader.answered_errors>`) are output, not failures, and do not count."""
    errors = sum(n for kind, n in summary.error_kinds.items() if kind not in answered)
    if not summary.rows or errors <= max_fraction * summary.rows:
        return None
    counted = [(k, n) for k, n in summary.error_kinds.most_common() if k not in answered]
    kinds = ", ".join(f"{k} {n:,}" for k, n in counted[:3])
    return (
        f"{errors:,} of {summary.rows:,} rows are errors ({errors / summary.rows:.0%}), over "
        f"run.max_error_fraction {max_fraction:g}; most: {kinds}"
    )


def _report(
    fs: Any, run_dir: str, manifest: dict[str, Any], summary: RunSummary, samples: list
) -> dict[str, Any]:
    """Writes report.html; a report that fails to build leaves the run successful, and says why."""
    try:
        path = write_report(fs, run_dir, manifest, summary, samples)
    except Exception as exc:
        log.exception("report.html could not be built; the run's data and manifest stand")
        return {"status": "missing", "error": mask_text(f"{type(exc).__name__}: {exc}")}
    return {"status": "written", "path": posixpath.basename(path)}


def operator_seconds(dataset: ray.data.Dataset) -> dict[str, float]:
    """Task seconds per plan operator this attempt (Ray Data's own stats; {} if unavailable)."""
    try:
        stats = dataset._write_ds.get_stats_summary()  # the executed write's stats
    except Exception:  # stats are informative only; their shape is Ray's to change
        return {}
    seconds: dict[str, float] = {}
    while stats is not None:
        for op in stats.operators_stats:
            if op.wall_time is not None:
                seconds[op.operator_name] = round(float(op.wall_time.sum), 3)
        stats = stats.parents[0] if stats.parents else None
    return seconds


def _drops(config: JobConfig) -> bool:
    return config.toxicity.enabled and config.toxicity.action == "drop"


def driver_tokenizer(config: JobConfig) -> Tokenizer:
    """The tokenizer of the job's checkpoint, loaded in this process."""
    from model.checkpoint import find_tokenizer

    path = find_tokenizer(config.model.checkpoint, config.model.storage_options)
    if path is None:
        raise FileNotFoundError(
            f"model.checkpoint: no tokenizer.model in or beside {mask_uri(config.model.checkpoint)}"
        )
    return Tokenizer.load(path)


def _tidy_finished_run(config: JobConfig, run_uri: str, fs: Any, run_dir: str) -> None:
    """What a driver killed after ``_SUCCESS`` left behind: its lease and the resume checkpoint
    (kept while a live driver still holds the run: it removes them itself)."""
    if release_dead_lease(run_uri, config.output.storage_options, config.run.lease_timeout_s):
        drop_checkpoint(fs, config, run_dir)


def _manifest(
    config: JobConfig,
    per_file: dict[str, Any],
    summary: RunSummary,
    started: float,
    finished: float,
) -> dict[str, Any]:
    elapsed = max(finished - started, 1e-9)
    counts = summary.counts()
    return {
        "run_id": config.run_id,
        "date": config.date,
        "status": "succeeded",
        "task": config.task,
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "elapsed_s": round(elapsed, 3),
        "model": sorted(summary.models),
        "input_files": list(per_file),
        "inputs": per_file,
        "counts": counts,
        "throughput": {
            "rows_per_s": round(counts["rows"] / elapsed, 3),
            "output_tokens_per_s": round(counts["output_tokens"] / elapsed, 3),
        },
        "config": redacted_dict(config),
    }


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")
