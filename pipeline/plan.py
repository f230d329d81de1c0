"""The plan of a job: the reader, the task's stages in order, the writer.

Each stage's module builds it from the job config (:data:`BUILDERS` maps a stage name to its
builder); :data:`TASK_STAGES` says which stages a task runs. :func:`build_stages` checks, before
any work, that every stage finds the columns it needs (:class:`pipeline.stage.PlanError` names
the stage and the column), and :func:`build_dataset` applies them to the reader's dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pyarrow as pa
import ray

from pipeline import columns as S
from pipeline import formats
from pipeline.config import ConfigError
from pipeline.formats.base import ReadSpec
from pipeline.model_stage import model_stage
from pipeline.prompts import prompt_stage
from pipeline.readers import CorpusDatasource, FileLedger
from pipeline.stage import (
    PlanContext,
    PlanError,
    Stage,
    check_columns,
    declared,
    declares,
    matches,
)
from pipeline.toxicity import toxicity_stage

if TYPE_CHECKING:
    from pipeline.config import JobConfig

StageBuilder = Callable[["JobConfig", PlanContext], "Stage | None"]

INPUT_TEXT = (S.TEXT, S.QUESTION, S.PROMPT)


@declares(S.RUN_ID)
def output_stage(config: JobConfig, context: PlanContext) -> Stage:
    """The documented output row: stamps the run id; drops input text still in the plan (a qa
    row keeps its question)."""
    drop = tuple(c for c in INPUT_TEXT if not (config.task == "qa" and c == S.QUESTION))
    return Stage(
        name="output",
        fn=stamp_run_id,
        requires=(S.ID, S.SOURCE),
        adds=(S.RUN_ID,),
        drops=drop,
        fn_kwargs={"run_id": config.run_id, "drop": drop},
    )


def stamp_run_id(table: pa.Table, run_id: str, drop: Sequence[str] = INPUT_TEXT) -> pa.Table:
    table = table.drop_columns([c for c in drop if c in table.column_names])
    return table.append_column(S.RUN_ID, pa.array([run_id] * table.num_rows, pa.string()))


BUILDERS: dict[str, StageBuilder] = {
    "prompt": prompt_stage,
    "model": model_stage,
    "toxicity": toxicity_stage,
    "output": output_stage,
}
_GENERATION = ("prompt", "model", "toxicity", "output")
TASK_STAGES: dict[str, tuple[str, ...]] = {
    "summarize": _GENERATION,
    "qa": _GENERATION,
    "generate": _GENERATION,
}


def source_columns(config: JobConfig) -> list[str]:
    """What the reader provides: the read schema, then the passthrough columns or the format's
    own."""
    return formats.reader(config.input.format).columns(ReadSpec.from_config(config))


def sink_columns(config: JobConfig) -> tuple[str, ...]:
    """What the writer needs: ids, the resume key, sources (counts per file), and the decision
    to route on."""
    needs = (S.ID, S.ROW_KEY, S.SOURCE)
    if config.toxicity.enabled and config.toxicity.action == "drop":
        needs += (S.TOXICITY_DECISION,)
    needs += tuple(c for c in formats.writer(config.output.format).requires if c not in needs)
    return needs


def reserved_columns() -> dict[str, str]:
    """Every column name the pipeline may write, in any configuration (``x_*``: a prefix), and
    what writes it: every reader's own columns and every stage builder's declared ones."""
    reserved: dict[str, str] = {}
    for reader in formats.READERS.values():
        for name in [*reader.columns(ReadSpec()), *reader.reserved]:
            reserved.setdefault(name, f"the {reader.name} reader")
    for stage, builder in BUILDERS.items():
        for name in declared(builder):
            reserved.setdefault(name, f"the {stage} stage")
    return reserved


def check_passthrough(config: JobConfig) -> None:
    """Raises ConfigError (at ``input.passthrough``) for a passthrough column of a name the
    pipeline writes itself (:func:`reserved_columns`): the output would hold it twice."""
    reserved = reserved_columns()
    errors = []
    for name in config.input.passthrough:
        owner = next((who for col, who in reserved.items() if matches(name, [col])), None)
        if owner is not None:
            errors.append(
                (
                    "input.passthrough",
                    f"column {name!r} clashes with a column the pipeline writes ({owner} adds "
                    "it); rename it in the input or leave it out",
                )
            )
    if errors:
        raise ConfigError(errors)


def build_stages(config: JobConfig, context: PlanContext) -> list[Stage]:
    """The task's stages, checked against each other (PlanError before any work)."""
    built = []
    for name in TASK_STAGES[config.task]:
        builder = BUILDERS[name]
        stage = builder(config, context)
        if stage is None:
            continue
        undeclared = [c for c in stage.adds if not matches(c, declared(builder))]
        if undeclared:
            raise PlanError(f"stage {name!r} adds {undeclared}, which its builder does not declare")
        built.append(stage)
    check_columns(source_columns(config), built, sink_columns(config))
    return built


def build_dataset(
    config: JobConfig,
    files: Sequence[str],
    context: PlanContext,
    *,
    sizes: Sequence[int] | None = None,
    ledger: FileLedger | None = None,
) -> ray.data.Dataset:
    """The lazy Ray Data plan for a job: one row out for every row in."""
    stages = build_stages(config, context)
    spec = ReadSpec.from_config(config)
    types = formats.reader(config.input.format).plan_passthrough(files, spec)
    spec = dataclasses.replace(spec, passthrough_types=types)
    source = CorpusDatasource(files, spec, file_sizes=sizes, ledger=ledger, run_id=config.run_id)
    dataset = ray.data.read_datasource(source)
    if config.input.num_blocks:
        dataset = dataset.repartition(config.input.num_blocks)
    for stage in stages:
        dataset = stage.apply(dataset, run_id=config.run_id)
    return dataset
