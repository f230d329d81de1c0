"""The whole job on a real local Ray cluster: local files, every task, both formats, bad rows,
bad configs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest
from pipeline_helpers import (
    corpus_rows,
    job_config,
    job_yaml,
    kill_tree,
    read_output,
    run_cli,
    write_corpus,
)

from pipeline import columns as S
from pipeline.cli import build_parser, configure_logging, summary_line
from pipeline.cli import main as cli_main
from pipeline.config import load_job_config
from pipeline.runner import run_job
from testkit.tiny_detoxify import TRIGGER_WORDS

REPO = Path(__file__).resolve().parents[2]
RAY_AUTH_NOTICE = (
    "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
)

LOCAL = fsspec.filesystem("file")
TOXICITY_LABELS = (
    "toxicity",
    "severe_toxicity",
    "obscene",
    "threat",
    "insult",
    "identity_attack",
)


def check_output(table: pa.Table, input_ids: list[str], manifest: dict, task: str) -> None:
    ids = table.column(S.ID).to_pylist()
    assert sorted(ids) == sorted(input_ids)  # one row per input row, each exactly once
    assert len(set(ids)) == len(ids)
    expected = {
        S.ID: pa.string(),
        S.TASK: pa.string(),
        "title": pa.string(),
        S.PROMPT_TOKENS: pa.int32(),
        S.PROMPT_TRUNCATED: pa.bool_(),
        S.OUTPUT_TEXT: pa.string(),
        S.OUTPUT_TOKENS: pa.int32(),
        S.FINISH_REASON: pa.string(),
        S.ERROR: pa.string(),
        S.ERROR_KIND: pa.string(),
        S.TOXIC: pa.bool_(),
        S.TOXICITY_DECISION: pa.string(),
        S.MODEL: pa.string(),
        S.RUN_ID: pa.string(),
        **{S.TOXICITY_PREFIX + label: pa.float32() for label in TOXICITY_LABELS},
    }
    for name, dtype in expected.items():
        assert name in table.column_names, name
        if table.column(name).null_count < table.num_rows:  # JSONL cannot carry all-null types
            assert table.schema.field(name).type in (dtype, pa.int64(), pa.float64()), name
    rows = table.to_pylist()
    assert {r[S.TASK] for r in rows} == {task}
    ok = [r for r in rows if r[S.ERROR] is None]
    assert ok and all(r[S.FINISH_REASON] in ("stop", "length") for r in ok)
    for r in ok:
        assert 0 <= r[S.TOXICITY_PREFIX + "toxicity"] <= 1 and r[S.TOXIC] in (True, False)
    counts = manifest["counts"]
    assert counts["rows"] == len(input_ids)
    assert sum(counts["finish_reasons"].values()) == len(input_ids)
    assert sum(counts["toxicity_decisions"].values()) == len(input_ids)
    assert counts["output_tokens"] == sum(r[S.OUTPUT_TOKENS] for r in rows)


@pytest.mark.parametrize(
    ("task", "in_fmt", "out_fmt"),
    [("summarize", "jsonl", "parquet"), ("qa", "parquet", "jsonl"), ("generate", "jsonl", "jsonl")],
)
def test_end_to_end_local(tmp_path, fixtures, ray_cluster, task, in_fmt, out_fmt) -> None:
    rows = corpus_rows(23)
    write_corpus(LOCAL, str(tmp_path / "in"), rows, in_fmt, files=3)
    ext = "jsonl" if in_fmt == "jsonl" else "parquet"
    text = job_yaml(
        fixtures,
        task=task,
        input_uri=str(tmp_path / "in" / f"*.{ext}"),
        output_uri=str(tmp_path / "out"),
        output_format=out_fmt,
    )
    result = run_job(job_config(text, run_id=f"run-{task}"))
    run_dir = str(tmp_path / "out" / f"run-{task}")
    assert result.status == "succeeded" and result.run_dir == run_dir
    assert LOCAL.exists(f"{run_dir}/_SUCCESS") and not LOCAL.exists(f"{run_dir}/_checkpoint")
    manifest = json.loads(LOCAL.cat_file(f"{run_dir}/_manifest.json"))
    table = read_output(LOCAL, run_dir, out_fmt)
    check_output(table, [r["id"] for r in rows], manifest, task)
    assert set(table.column(S.RUN_ID).to_pylist()) == {f"run-{task}"}
    assert manifest["model"] == sorted(set(table.column(S.MODEL).to_pylist()))
    assert 'data-chart="throughput"' in LOCAL.cat_file(f"{run_dir}/report.html").decode()

    # A finished run id is never written again.
    before = sorted(LOCAL.ls(run_dir))
    again = run_job(job_config(text, run_id=f"run-{task}"))
    assert again.status == "already_complete" and sorted(LOCAL.ls(run_dir)) == before


def test_report_command_prints_the_summary(tmp_path, fixtures, ray_cluster, capsys) -> None:
    write_corpus(LOCAL, str(tmp_path / "in"), corpus_rows(5), "jsonl", files=1)
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in" / "*.jsonl"),
        output_uri=str(tmp_path / "out"),
    )
    run_job(job_config(text, run_id="rep"))
    (tmp_path / "out" / "rep" / "report.html").unlink()
    assert cli_main(["report", str(tmp_path / "out" / "rep")]) == 0
    out = capsys.readouterr().out
    assert "rep" in out and "5" in out and (tmp_path / "out" / "rep" / "report.html").is_file()


def test_bad_rows_become_error_rows(tmp_path, fixtures, ray_cluster) -> None:
    good = corpus_rows(3)
    lines = [json.dumps(r) for r in good]
    lines += [
        json.dumps({"id": "no-text", "title": "t"}),
        json.dumps({"id": "null-text", "text": None}),
        json.dumps({"id": "number", "text": 42}),
        json.dumps({"id": "blank", "text": "   \n"}),
        json.dumps({"id": "huge", "text": "word " * 5000}),
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"id": "latin1", "text": "caf\xe9"}\n'
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.jsonl").write_bytes(raw)
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in" / "rows.jsonl"),
        output_uri=str(tmp_path / "out"),
        extra={"generation": {"truncation": "error"}, "run": {"max_error_fraction": 0.9}},
    )
    result = run_job(job_config(text, run_id="bad-rows"))
    table = read_output(LOCAL, f"{tmp_path}/out/bad-rows", "parquet")
    by_id = {r[S.ID]: r for r in table.to_pylist()}
    assert len(by_id) == table.num_rows == len(good) + 5 + 1  # the latin-1 line has a derived id
    kinds = {
        "no-text": "missing_text",
        "null-text": "missing_text",
        "number": "not_a_string",
        "blank": "empty_text",
        "huge": "prompt_too_long",
    }
    for row_id, kind in kinds.items():
        row = by_id[row_id]
        assert row[S.ERROR_KIND] == kind and row[S.ERROR] and row[S.FINISH_REASON] == "error"
        assert row[S.OUTPUT_TEXT] is None and row[S.TOXICITY_PREFIX + "toxicity"] is None
    invalid = [r for r in by_id.values() if r[S.ERROR_KIND] == "invalid_utf8"]
    assert len(invalid) == 1
    counts = result.manifest["counts"]
    assert counts["error_kinds"] == {
        "empty_text": 1,
        "invalid_utf8": 1,
        "missing_text": 2,
        "not_a_string": 1,
        "prompt_too_long": 1,
    }
    assert counts["finish_reasons"]["error"] == 6


def test_long_prompts_are_truncated_and_flagged(tmp_path, fixtures, ray_cluster) -> None:
    rows = [*corpus_rows(2), {"id": "long", "text": "river " * 2000, "title": "x"}]
    write_corpus(LOCAL, str(tmp_path / "in"), rows, "jsonl", files=1)
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in"),
        output_uri=str(tmp_path / "out"),
        extra={"input": {"format": "jsonl"}},
    )
    result = run_job(job_config(text, run_id="trunc"))
    by_id = {r[S.ID]: r for r in read_output(LOCAL, f"{tmp_path}/out/trunc", "parquet").to_pylist()}
    assert by_id["long"][S.PROMPT_TRUNCATED] and by_id["long"][S.ERROR] is None
    assert by_id["long"][S.PROMPT_TOKENS] <= 96
    assert result.manifest["counts"]["prompts_truncated"] == 1


@pytest.mark.slow
def test_sample_corpus_flags_a_small_share(tmp_path, fixtures, ray_cluster) -> None:
    """configs/local.yaml (what ``make run-local`` runs) on the committed sample, with drop: the
    tiny detoxify flags a small share of the tiny model's outputs, and those rows, only those,
    go to rejected/."""
    overrides = [
        f"model.checkpoint={fixtures['checkpoint']}",
        f"toxicity.checkpoint={fixtures['detoxify']}",
        f"input.uri={REPO / 'data' / 'sample' / '*.jsonl'}",
        f"output.uri={tmp_path / 'out'}",
        "toxicity.action=drop",
    ]
    config = load_job_config(
        REPO / "configs" / "local.yaml", overrides=overrides, run_id="sample", date="2026-11-27"
    )
    counts = run_job(config).manifest["counts"]
    assert counts["rows"] == 300
    assert 0.03 <= counts["toxic"] / counts["rows"] <= 0.15, counts
    assert counts["rows_rejected"] == counts["toxic"]
    rejected = read_output(LOCAL, f"{tmp_path}/out/sample", "parquet", sub="rejected")
    kept = read_output(LOCAL, f"{tmp_path}/out/sample", "parquet")
    assert rejected.num_rows == counts["toxic"] and kept.num_rows == 300 - counts["toxic"]
    assert all(rejected.column(S.TOXIC).to_pylist())
    assert not any(kept.column(S.TOXIC).to_pylist())
    texts = rejected.column(S.OUTPUT_TEXT).to_pylist()
    assert all(any(word in t.split() for word in TRIGGER_WORDS) for t in texts), texts


# What only -v shows: libraries' INFO lines, Ray Data's own progress, deprecations of our making.
NOISE = ("logging_progress", "streaming_executor", "libtpu", "Deprecat", "Loading weights")


@pytest.mark.slow
def test_run_is_quiet_unless_verbose(tmp_path, fixtures) -> None:
    write_corpus(LOCAL, str(tmp_path / "in"), corpus_rows(6), "jsonl", files=1)
    config = tmp_path / "job.yaml"
    extra = {"run": {"num_cpus": 4, "progress_interval_s": 1.0}}
    config.write_text(
        job_yaml(
            fixtures,
            task="summarize",
            input_uri=str(tmp_path / "in" / "*.jsonl"),
            output_uri=str(tmp_path / "out"),
            extra=extra,
        )
    )
    log = tmp_path / "quiet.log"
    process = run_cli(config, "quiet", log=log)
    try:
        assert process.wait(timeout=600) == 0, log.read_text()
    finally:
        kill_tree(process)
    lines = log.read_text().splitlines()
    noisy = [line for line in lines if any(word in line for word in NOISE)]
    assert not noisy, noisy
    others = [line for line in lines if "rgbatch.progress" not in line]
    assert len(others) < 10, others  # a line a second of progress aside
    progress = "\n".join(line for line in lines if "rgbatch.progress" in line)
    assert "| loading the model" in progress and "| compiling" in progress, progress
    assert f"report:  {tmp_path}/out/quiet/report.html" in lines
    assert (tmp_path / "out" / "quiet" / "report.html").is_file()
    assert lines[-1].startswith("rows: 6  finish reasons: ") and "toxic: 0 (0.0%)" in lines[-1]


def test_verbose_keeps_the_libraries_logs() -> None:
    names = ("jax", "ray", "ray.data", "absl")
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
        notice = auth.makeRecord(auth.name, logging.WARNING, __file__, 1, RAY_AUTH_NOTICE, (), None)
        configure_logging(verbose=False)
        assert all(logging.getLogger(name).level == logging.WARNING for name in names)
        assert not auth.filter(notice)  # Ray's notice of its own default, at every local start
        configure_logging(verbose=True)
        assert logging.getLogger("jax").level == logging.getLogger("ray.data").level == logging.INFO
        assert auth.filter(notice)
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    parser = build_parser()
    assert parser.parse_args(["run", "job.yaml", "-v"]).verbose
    assert parser.parse_args(["-v", "run", "job.yaml"]).verbose
    assert not parser.parse_args(["run", "job.yaml"]).verbose
    assert "``" not in parser.format_help() and ":mod:" not in parser.format_help()


def test_summary_line_counts_what_the_policy_rejected() -> None:
    counts = {
        "rows": 300,
        "finish_reasons": {"length": 300},
        "toxic": 15,
        "rows_rejected": 15,
        "toxicity_decisions": {"keep": 285, "drop": 15},
    }
    line = summary_line(counts)
    assert line.endswith("toxic: 15 (5.0%), rejected: 15")
    redacted = {**counts, "rows_rejected": 0, "toxicity_decisions": {"redact": 15}}
    assert summary_line(redacted).endswith("toxic: 15 (5.0%), rejected: 0, redacted: 15")
    assert summary_line({"rows": 0}) == "rows: 0  finish reasons: None"


def test_drop_policy_moves_rows_to_rejected(tmp_path, fixtures, ray_cluster) -> None:
    rows = corpus_rows(9)
    write_corpus(LOCAL, str(tmp_path / "in"), rows, "jsonl", files=2)
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in" / "*.jsonl"),
        output_uri=str(tmp_path / "out"),
        extra={"toxicity": {"threshold": 0.0, "action": "drop"}},  # every scored row is toxic
    )
    result = run_job(job_config(text, run_id="drop"))
    kept = read_output(LOCAL, f"{tmp_path}/out/drop", "parquet")
    rejected = read_output(LOCAL, f"{tmp_path}/out/drop", "parquet", sub="rejected")
    assert kept.num_rows == 0 and rejected.num_rows == len(rows)
    assert set(rejected.column(S.TOXICITY_DECISION).to_pylist()) == {"drop"}
    counts = result.manifest["counts"]
    assert counts["rows_rejected"] == len(rows) and counts["toxicity_decisions"] == {"drop": 9}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("input.colour=red", "input.colour: unknown key"),
        ("generation.max_new_tokens=lots", "generation.max_new_tokens:"),
        ("model=null", "model"),
        ("input.uri=/nonexistent/dir/*.jsonl", "input.uri: no files match"),
    ],
)
def test_bad_config_exits_2_before_any_work(tmp_path, fixtures, capsys, override, message) -> None:
    write_corpus(LOCAL, str(tmp_path / "in"), corpus_rows(2), "jsonl", files=1)
    config = tmp_path / "job.yaml"
    config.write_text(
        job_yaml(
            fixtures,
            task="summarize",
            input_uri=str(tmp_path / "in" / "*.jsonl"),
            output_uri=str(tmp_path / "out"),
        )
    )
    assert cli_main(["run", str(config), "--set", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_required_field_names_it(tmp_path, capsys) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("task: summarize\ninput: {uri: x.jsonl}\noutput: {uri: out}\n")
    assert cli_main(["validate", str(config)]) == 2
    assert "model: field required" in capsys.readouterr().err


def test_validate_names_the_run_directory_only_when_it_is_fixed(tmp_path, fixtures, capsys):
    write_corpus(LOCAL, str(tmp_path / "in"), corpus_rows(3), "jsonl", files=1)
    config = tmp_path / "job.yaml"
    config.write_text(
        job_yaml(
            fixtures,
            task="summarize",
            input_uri=str(tmp_path / "in" / "*.jsonl"),
            output_uri=str(tmp_path / "out"),
        )
    )
    assert cli_main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"output would go to {tmp_path}/out/<run id>: run picks a new run id" in out
    assert cli_main(["validate", str(config), "--date", "2026-11-26"]) == 0
    assert f"output would go to {tmp_path}/out/2026-11-26" in capsys.readouterr().out


def test_generation_controls_and_per_row_settings(tmp_path, fixtures, ray_cluster) -> None:
    """One corpus run: job-level logprobs, per-row settings from a column (n, stop, penalties, a
    bad value), one output row per input row."""
    rows = corpus_rows(4)
    rows[0]["params"] = {"n": 3, "temperature": 0.9, "seed": 5, "max_tokens": 4}
    rows[1]["params"] = {"presence_penalty": 1.0, "repetition_penalty": 1.3, "min_tokens": 2}
    rows[2]["params"] = {"temperature": 5}  # out of range: an error row
    write_corpus(LOCAL, str(tmp_path / "in"), rows, "jsonl", 1)
    text = job_yaml(
        fixtures,
        task="generate",
        input_uri=str(tmp_path / "in"),
        output_uri=str(tmp_path / "out"),
        extra={
            "input": {"settings_column": "params"},
            "generation": {"logprobs": 0, "max_new_tokens": 6},
            "run": {"max_error_fraction": 0.5},
        },
    )
    result = run_job(job_config(text, run_id="controls"))
    assert result.status == "succeeded"
    table = read_output(LOCAL, f"{tmp_path}/out/controls", "parquet")
    by_id = {r[S.ID]: r for r in table.to_pylist()}
    assert len(by_id) == table.num_rows == len(rows)
    sampled, penalised, bad, plain = (by_id[r["id"]] for r in rows)
    assert (
        len(sampled[S.OUTPUT_SAMPLES]) == 3
        and sampled[S.OUTPUT_SAMPLES][0] == (sampled[S.OUTPUT_TEXT])
    )
    assert plain[S.OUTPUT_SAMPLES] is None and penalised[S.OUTPUT_TOKENS] >= 2
    for row in (sampled, penalised, plain):
        lps = row[S.OUTPUT_LOGPROBS]
        assert lps and all(v <= 0 for v in lps)
        assert row[S.MEAN_LOGPROB] == pytest.approx(sum(lps) / len(lps), rel=1e-5)
    assert bad[S.ERROR_KIND] == "invalid_settings" and "temperature" in bad[S.ERROR]
    assert bad[S.FINISH_REASON] == "error"
