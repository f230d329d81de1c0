"""The plan: stages declare columns, the plan is checked when it is built, and the writer's and
progress' helpers work from metadata and small summaries."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import job_config, job_yaml

import pipeline.plan
from pipeline import columns as S
from pipeline.cli import main as cli_main
from pipeline.model_stage import engine_options
from pipeline.plan import build_stages, reserved_columns, source_columns
from pipeline.progress import InputTotal, ProgressReporter
from pipeline.report.page import throughput_rates
from pipeline.rundir import RunIntegrityError, check_rows
from pipeline.stage import PlanContext, PlanError, Stage, check_columns, declared, declares
from pipeline.summary import RunSummary


def config(fixtures, tmp_path, **extra):
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in.jsonl"),
        output_uri=str(tmp_path / "out"),
        extra=extra,
    )
    return job_config(text, run_id="plan")


def test_a_stage_needing_a_column_nobody_provides_fails_when_the_plan_is_built(
    fixtures, tmp_path, monkeypatch
) -> None:
    def embed_stage(config, context):
        return Stage(name="embed", fn=lambda t: t, requires=(S.ID, "summary_vector"))

    monkeypatch.setitem(pipeline.plan.BUILDERS, "embed", embed_stage)
    monkeypatch.setitem(
        pipeline.plan.TASK_STAGES, "summarize", ("prompt", "model", "embed", "output")
    )
    with pytest.raises(PlanError, match=r"stage 'embed' needs column 'summary_vector'"):
        build_stages(config(fixtures, tmp_path), PlanContext())


def test_the_input_text_leaves_after_prompt_building_unless_inputs_are_scored(
    fixtures, tmp_path
) -> None:
    plain = config(fixtures, tmp_path)
    stages = build_stages(plain, PlanContext())
    assert [s.name for s in stages] == ["prompt", "model", "toxicity", "output"]
    after_prompt = check_columns(source_columns(plain), stages[:1])
    assert S.TEXT not in after_prompt and S.PROMPT_IDS in after_prompt
    final = check_columns(source_columns(plain), stages)
    assert S.PROMPT_IDS not in final and {S.RUN_ID, "title", S.TOXIC} <= set(final)

    scored = config(fixtures, tmp_path, toxicity={"score_inputs": True})
    stages = build_stages(scored, PlanContext())
    assert S.TEXT in check_columns(source_columns(scored), stages[:3])
    assert S.TEXT not in check_columns(source_columns(scored), stages)


def test_the_writer_needs_the_decision_column_under_drop(fixtures, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(pipeline.plan.TASK_STAGES, "summarize", ("prompt", "model", "output"))
    drop = config(fixtures, tmp_path, toxicity={"action": "drop"})
    with pytest.raises(PlanError, match=r"stage 'writer' needs column 'toxicity_decision'"):
        build_stages(drop, PlanContext())


def test_stages_own_their_ray_arguments(fixtures, tmp_path) -> None:
    cfg = config(fixtures, tmp_path, model={"replicas": 3, "cpus_per_replica": 2})
    prompt, model, toxicity, _ = build_stages(cfg, PlanContext())
    assert model.ray_args["compute"].min_size == model.ray_args["compute"].max_size == 3
    assert model.ray_args["num_cpus"] == 2
    assert model.ray_args["batch_size"] == cfg.generation.batch_size
    assert model.ray_args["max_restarts"] == cfg.model.max_restarts  # bounded, unlike Ray's default
    assert prompt.ray_args["compute"].min_size == 1  # autoscaling with the cluster
    assert prompt.ray_args["compute"].max_size == float("inf")  # prompt_workers unset
    capped = build_stages(
        config(fixtures, tmp_path, generation={"prompt_workers": 4}), PlanContext()
    )
    assert capped[0].ray_args["compute"].max_size == 4
    assert toxicity.ray_args["batch_size"] == cfg.toxicity.batch_size
    assert model.constructor_kwargs["generation"] == cfg.generation
    engine = engine_options(model.constructor_kwargs["model"], cfg.generation)
    assert engine["max_slots"] == cfg.generation.max_slots == 8


def test_check_rows_names_files_whose_counts_differ() -> None:
    summary = RunSummary(rows_per_source={"a.jsonl": 3, "b.jsonl": 1})
    per_file = check_rows(["a.jsonl"], {"a.jsonl": 3}, RunSummary(rows_per_source={"a.jsonl": 3}))
    assert per_file == {"a.jsonl": {"rows_in": 3, "rows_out": 3}}
    with pytest.raises(RunIntegrityError) as err:
        check_rows(["a.jsonl", "b.jsonl"], {"a.jsonl": 3, "b.jsonl": 2}, summary)
    assert "b.jsonl: 2 rows in, 1 rows out" in str(err.value)
    with pytest.raises(RunIntegrityError, match="no row count recorded"):
        check_rows(["a.jsonl", "c.jsonl"], {"a.jsonl": 3}, summary)


def test_summaries_merge_in_any_order() -> None:
    table = pa.table(
        {
            S.ID: [f"r{i}" for i in range(12)],
            S.SOURCE: ["a"] * 7 + ["b"] * 5,
            S.OUTPUT_TOKENS: pa.array([i % 4 for i in range(12)], pa.int32()),
            S.FINISH_REASON: ["stop"] * 10 + ["error"] * 2,
            S.ERROR_KIND: [None] * 10 + ["generation"] * 2,
            S.ERROR: [None] * 10 + ["boom"] * 2,
            S.TOXICITY_PREFIX + "insult": pa.array([i / 12 for i in range(12)], pa.float32()),
            S.TOXICITY_DECISION: ["keep"] * 9 + ["drop"] * 3,
        }
    )
    whole = RunSummary.of_table(table, threshold=0.5)
    parts = [RunSummary.of_table(table.slice(i, 4), threshold=0.5) for i in (8, 0, 4)]
    merged = RunSummary.merged(
        (RunSummary.loads(p.dumps()) for p in parts), threshold=0.5
    )  # through JSON, as the files carry them
    for name in ("rows", "rejected", "output_tokens", "finish_reasons", "rows_per_source"):
        assert getattr(merged, name) == getattr(whole, name), name
    assert merged.toxicity == whole.toxicity and merged.toxicity_over == whole.toxicity_over
    assert merged.samples == whole.samples and len(merged.samples) == 5
    assert merged.parts == 3 and merged.rejected == 3
    assert merged.error_examples == {"generation": "boom"}


def test_progress_total_comes_from_metadata(tmp_path) -> None:
    pq.write_table(pa.table({"a": list(range(7))}), tmp_path / "c.parquet")
    assert InputTotal.of_files([str(tmp_path / "c.parquet")], "parquet", None, {}).rows == 7
    # JSONL: the files are never opened (they do not even exist); rows follow from bytes.
    missing = [str(tmp_path / "nope-1.jsonl"), str(tmp_path / "nope-2.jsonl")]
    total = InputTotal.of_files(missing, "jsonl", [600, 400], {})
    assert total.estimate(0, 0) == (None, True)
    assert total.estimate(rows_read := 30, 300) == (100, True) and rows_read == 30


def test_progress_samples_stay_bounded() -> None:
    reporter = ProgressReporter(counter=None, total=None, interval_s=1.0)
    for i in range(1, 5000):
        reporter._sample(float(i), i, 10 * i)
    reporter._sample(4999.5, 5000, 50000, final=True)  # the last poll is always kept
    assert len(reporter.samples) <= 512 + 1
    assert reporter.samples[0] == (0.0, 0, 0) and reporter.samples[-1] == (4999.5, 5000, 50000)


def test_throughput_rates_spread_tokens_over_time() -> None:
    samples = [(0.0, 0, 0), (10.0, 5, 100), (20.0, 10, 300)]
    rates, rows, width = throughput_rates(samples, bins=2)
    assert width == 10.0 and rates == [10.0, 20.0] and rows == [5, 5]
    rates, _, width = throughput_rates(samples, bins=4)  # capped by the samples
    assert len(rates) == 2
    assert throughput_rates([(0.0, 0, 0)]) == ([], [], 0.0)


@pytest.mark.parametrize(
    ("columns", "refused"),
    [
        ("[title,generated_at]", "generated_at"),  # the model stage's
        ("[prefix_len]", "prefix_len"),  # prompt building's
        ("[text]", "text"),  # the reader's own (issue 21 case 8)
        ("[row_key]", "row_key"),
        ("[input_toxicity_insult]", "input_toxicity_insult"),  # even with score_inputs off
        ("[request]", "request"),  # a row's own generation settings
    ],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_passthrough_named_like_a_pipeline_column_is_refused_with_exit_2(
    fixtures, tmp_path, capsys, columns, refused, command
) -> None:
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "x", "title": "t"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(
        job_yaml(
            fixtures,
            task="summarize",
            input_uri=str(tmp_path / "in.jsonl"),
            output_uri=str(tmp_path / "out"),
        )
    )
    argv = [command, str(job), "--set", f"input.passthrough={columns}"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"input.passthrough: column {refused!r} clashes with a column the pipeline writes" in err
    assert not (tmp_path / "out").exists()


def test_reserved_columns_come_from_the_declarations() -> None:
    reserved = reserved_columns()
    # Every column any stage of any plan adds, and every reader's own, is there.
    for builder in pipeline.plan.BUILDERS.values():
        assert set(declared(builder)) <= set(reserved)
    assert {S.GENERATED_AT, S.PREFIX_LEN, S.ROW_KEY, S.RUN_ID, "req_*"} <= set(reserved)
    assert reserved[S.GENERATED_AT] == "the model stage"


def test_a_stage_adding_an_undeclared_column_fails_the_plan(
    fixtures, tmp_path, monkeypatch
) -> None:
    @declares(S.RUN_ID)
    def sneaky(config, context):
        return Stage(name="output", fn=lambda t: t, requires=(S.ID,), adds=(S.RUN_ID, "extra"))

    monkeypatch.setitem(pipeline.plan.BUILDERS, "output", sneaky)
    with pytest.raises(PlanError, match=r"stage 'output' adds \['extra'\], which its builder"):
        build_stages(config(fixtures, tmp_path), PlanContext())
