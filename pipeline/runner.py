"""One job, end to end, on Ray Data: read -> prompts -> model -> toxicity -> write -> finalise.

Ray Data does the sharding, streaming, backpressure, retries and resume: its checkpointing is keyed
on the row id, so rerunning an interrupted run id generates only the rows that were not committed.
The caller connects to Ray (``ray.init``) before calling :func:`run_job`; nothing here changes
global Ray state except the current DataContext's checkpoint config for this run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.data.checkpoint import CheckpointConfig

from model.tokenizer import Tokenizer
from pipeline import schema as S
from pipeline.config import JobConfig, redacted_dict
from pipeline.model_stage import ModelStage
from pipeline.progress import ProgressCounter, ProgressReporter, count_rows
from pipeline.prompts import PromptBuilder
from pipeline.readers import CorpusDatasource
from pipeline.report import write_report
from pipeline.toxicity import ToxicityStage
from pipeline.writer import (
    CHECKPOINT_DIR,
    MANIFEST,
    PartFilenames,
    arrow_filesystem,
    finalize,
    is_complete,
    mark_success,
    output_filesystem,
    write_manifest,
)

log = logging.getLogger(__name__)

# Columns the output never carries: the inputs are large and already in the input files.
_DROPPED = (S.TEXT, S.QUESTION, S.PROMPT)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    run_dir: str  # URI of <output uri>/<run id>
    status: str  # "succeeded" | "already_complete"
    manifest: dict[str, Any]


def run_dir_uri(config: JobConfig) -> str:
    """<output uri>/<run id>, unless the output URI template already names the run id."""
    uri = config.output.uri.rstrip("/")
    if "{run_id}" in (config.templates.get("output.uri") or ""):
        return uri
    return f"{uri}/{config.run_id}"


def run_job(config: JobConfig) -> RunResult:
    """Runs (or resumes) ``config`` as its run id; a run id that has _SUCCESS is not touched."""
    if not config.is_rendered:
        raise ValueError("run_job needs a rendered config (load_job_config renders it)")
    run_uri = run_dir_uri(config)
    fs, run_dir = output_filesystem(run_uri, config.output.storage_options)
    if is_complete(fs, run_dir):
        log.info("run %s already complete at %s: nothing to do", config.run_id, run_uri)
        manifest = json.loads(fs.cat_file(posixpath.join(run_dir, MANIFEST)))
        return RunResult(config.run_id, run_uri, "already_complete", manifest)

    started = time.time()
    files = config.input_files()
    log.info("run %s: %d input files -> %s", config.run_id, len(files), run_uri)
    fs.makedirs(run_dir, exist_ok=True)
    pa_fs = arrow_filesystem(fs)
    _set_checkpoint(config, fs, run_dir, pa_fs)
    counter = ProgressCounter.remote()
    dataset = build_dataset(config, files, progress=counter)
    names = PartFilenames(config.output.format)
    total = count_rows(files, config.input.format, config.input.storage_options)
    with ProgressReporter(counter, total, interval_s=config.run.progress_interval_s):
        if config.output.format == "parquet":
            dataset.write_parquet(run_dir, filesystem=pa_fs, filename_provider=names)
        else:
            dataset.write_json(
                run_dir, filesystem=pa_fs, filename_provider=names, force_ascii=False
            )
    stats = finalize(fs, run_dir, config.output.format)
    finished = time.time()
    manifest = _manifest(config, files, stats, started, finished)
    write_manifest(fs, run_dir, manifest)
    write_report(fs, run_dir, config.output.format, manifest)
    mark_success(fs, run_dir)
    _drop_checkpoint(fs, config, run_dir)
    log.info("run %s succeeded: %s", config.run_id, json.dumps(manifest["counts"]))
    return RunResult(config.run_id, run_uri, "succeeded", manifest)


def build_dataset(config: JobConfig, files: list[str], progress: Any = None) -> ray.data.Dataset:
    """The lazy Ray Data plan for a job: one row out for every row in."""
    inp, gen, tox = config.input, config.generation, config.toxicity
    source = CorpusDatasource(
        files,
        fmt=inp.format,
        id_column=inp.id_column,
        text_column=inp.text_column,
        question_column=inp.question_column,
        prompt_column=inp.prompt_column,
        passthrough=inp.passthrough,
        storage_options=inp.storage_options,
    )
    ds = ray.data.read_datasource(source)
    if inp.num_blocks:
        ds = ds.repartition(inp.num_blocks)
    ds = ds.map_batches(
        PromptBuilder,
        fn_constructor_kwargs=dict(
            tokenizer=_driver_tokenizer(config),
            task=config.task,
            template=config.prompt_template(),
            chat=config.model.use_chat_template,
            max_prompt_tokens=gen.max_prompt_tokens,
            truncation=gen.truncation,
        ),
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_format="pyarrow",
        batch_size=gen.batch_size,
    )
    ds = ds.map_batches(
        ModelStage,
        fn_constructor_kwargs=dict(
            checkpoint=config.model.checkpoint,
            storage_options=config.model.storage_options,
            dtype=config.model.dtype,
            chat=config.model.use_chat_template,
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_k=gen.top_k,
            top_p=gen.top_p,
            seed=gen.seed,
            engine_options=dict(
                max_slots=gen.max_slots,
                prefill_batch=gen.prefill_batch,
                prefill_chunk=gen.prefill_chunk,
                decode_steps=gen.decode_steps,
                max_prompt_tokens=gen.max_prompt_tokens,
            ),
            progress=progress,
            compilation_cache=config.model.compilation_cache,
        ),
        # Two calls in flight per actor: the next batch queues into the engine while the
        # current one drains, so the accelerator does not wait between batches.
        compute=ray.data.ActorPoolStrategy(
            size=config.model.replicas,
            max_concurrent_calls_per_actor=2,
            enable_true_multi_threading=True,
        ),
        num_gpus=config.model.gpus_per_replica or None,
        num_cpus=config.model.cpus_per_replica,
        resources=config.model.resources_per_replica or None,
        batch_size=gen.batch_size,
        batch_format="pyarrow",
    )
    if tox.enabled:
        ds = ds.map_batches(
            ToxicityStage,
            fn_constructor_kwargs=dict(
                model=tox.model,
                checkpoint=tox.checkpoint,
                storage_options=tox.storage_options,
                threshold=tox.threshold,
                action=tox.action,
                score_inputs=tox.score_inputs,
                redaction_text=tox.redaction_text,
                device="cuda" if tox.gpus_per_replica else "cpu",
            ),
            compute=ray.data.ActorPoolStrategy(size=tox.replicas),
            num_gpus=tox.gpus_per_replica or None,
            num_cpus=tox.cpus_per_replica,
            batch_size=tox.batch_size,
            batch_format="pyarrow",
        )
    return ds.map_batches(
        output_columns, fn_kwargs={"run_id": config.run_id}, batch_format="pyarrow"
    )


def output_columns(table: pa.Table, run_id: str) -> pa.Table:
    """Drops the input text columns and stamps the run id: the documented output row."""
    table = table.drop_columns([c for c in _DROPPED if c in table.column_names])
    return table.append_column(S.RUN_ID, pa.array([run_id] * table.num_rows, pa.string()))


def _driver_tokenizer(config: JobConfig) -> Tokenizer:
    from model.checkpoint import find_tokenizer

    path = find_tokenizer(config.model.checkpoint, config.model.storage_options)
    if path is None:
        raise FileNotFoundError(
            f"model.checkpoint: no tokenizer.model in or beside {config.model.checkpoint}"
        )
    return Tokenizer.load(path)


def _set_checkpoint(config: JobConfig, fs: Any, run_dir: str, pa_fs: Any) -> None:
    ctx = ray.data.DataContext.get_current()
    if config.run.checkpoint_uri:
        ctx.checkpoint_config = CheckpointConfig(
            id_column=S.ID,
            checkpoint_path=config.run.checkpoint_uri,
            delete_checkpoint_on_success=False,
        )
    else:
        ctx.checkpoint_config = CheckpointConfig(
            id_column=S.ID,
            checkpoint_path=posixpath.join(run_dir, CHECKPOINT_DIR),
            override_filesystem=pa_fs,
            delete_checkpoint_on_success=False,
        )


def _drop_checkpoint(fs: Any, config: JobConfig, run_dir: str) -> None:
    if config.run.checkpoint_uri:
        return  # the user's location: theirs to manage
    path = posixpath.join(run_dir, CHECKPOINT_DIR)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _manifest(
    config: JobConfig, files: list[str], stats: Any, started: float, finished: float
) -> dict[str, Any]:
    elapsed = max(finished - started, 1e-9)
    counts = stats.to_dict()
    return {
        "run_id": config.run_id,
        "date": config.date,
        "status": "succeeded",
        "task": config.task,
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "elapsed_s": round(elapsed, 3),
        "model": sorted(stats.models),
        "input_files": files,
        "counts": counts,
        "throughput": {
            "rows_per_s": round(counts["rows"] / elapsed, 3),
            "output_tokens_per_s": round(counts["output_tokens"] / elapsed, 3),
        },
        "config": redacted_dict(config),
    }


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")
