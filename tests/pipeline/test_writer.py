"""One pass over the data: rejected rows written by the plan, counts and figures gathered while rows
flow, a driver that never reads an output part back, and a report that cannot fail a run."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest
from pipeline_helpers import (
    corpus_rows,
    job_config,
    job_yaml,
    read_output,
    write_corpus,
)

import pipeline.runner
from pipeline import columns as S
from pipeline.report.page import throughput_rates
from pipeline.runner import run_job
from pipeline.summary import RunSummary

LOCAL = fsspec.filesystem("file")


class OpenRecorder:
    """Records every file this process opens through Python (fsspec's local filesystem does)."""

    active = False
    paths: list[str] = []  # noqa: RUF012
    installed = False

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.active and event == "open" and isinstance(args[0], str | bytes):
            cls.paths.append(str(args[0]))

    @classmethod
    def __enter__(cls) -> type[OpenRecorder]:
        if not cls.installed:
            sys.addaudithook(cls.hook)  # audit hooks cannot be removed: this one is gated
            cls.installed = True
        cls.paths, cls.active = [], True
        return cls

    @classmethod
    def __exit__(cls, *exc: object) -> None:
        cls.active = False


def recount(run_dir: str, fmt: str) -> tuple[pa.Table, pa.Table]:
    kept = read_output(LOCAL, run_dir, fmt)
    rejected = read_output(LOCAL, run_dir, fmt, sub="rejected")
    return kept, rejected


@pytest.mark.parametrize("out_fmt", ["parquet", "jsonl"])
def test_drop_writes_rejected_from_the_plan_and_the_driver_reads_no_part(
    tmp_path, fixtures, ray_cluster, out_fmt
) -> None:
    rows = corpus_rows(40)
    for row in rows[::7]:
        row["text"] = None  # error rows: never scored, so kept
    write_corpus(LOCAL, str(tmp_path / "in"), rows, "jsonl", files=3)
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in" / "*.jsonl"),
        output_uri=str(tmp_path / "out"),
        output_format=out_fmt,
        # Every scored row is toxic at threshold 0: all but the error rows are dropped.
        extra={"toxicity": {"threshold": 0.0, "action": "drop"}, "output": {"rows_per_file": 8}},
    )
    with OpenRecorder() as recorder:
        result = run_job(job_config(text, run_id="drop"))
    run_dir = str(tmp_path / "out" / "drop")
    opened = [p for p in recorder.paths if p.startswith(run_dir)]
    assert not [p for p in opened if Path(p).name.startswith("part-")], opened
    assert not [p for p in opened if "/_stats/" in p or "/_inputs/" in p], opened

    kept, rejected = recount(run_dir, out_fmt)
    assert rejected.num_rows == len(rows) - 6 and kept.num_rows == 6
    decisions = collections.Counter(
        kept.column(S.TOXICITY_DECISION).to_pylist()
        + rejected.column(S.TOXICITY_DECISION).to_pylist()
    )
    assert set(rejected.column(S.TOXICITY_DECISION).to_pylist()) == {"drop"}
    assert "drop" not in kept.column(S.TOXICITY_DECISION).to_pylist()
    for label in ("toxicity", "insult"):  # the rejected rows keep their scores
        assert rejected.column(S.TOXICITY_PREFIX + label).null_count == 0
    ids = kept.column(S.ID).to_pylist() + rejected.column(S.ID).to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in rows)

    counts = result.manifest["counts"]
    assert counts["rows"] == len(rows)
    assert counts["rows_rejected"] == rejected.num_rows
    assert counts["rows_written"] == kept.num_rows
    assert counts["toxicity_decisions"] == dict(decisions)
    assert len(result.manifest["inputs"]) == 3
    for uri, row in result.manifest["inputs"].items():
        assert (
            row["rows_in"]
            == row["rows_out"]
            == kept.column(S.SOURCE).to_pylist().count(uri)
            + (rejected.column(S.SOURCE).to_pylist().count(uri))
        )


def test_report_figures_equal_a_recount_of_the_files(tmp_path, fixtures, ray_cluster) -> None:
    rows = corpus_rows(30)
    rows[3]["text"] = None  # an error row
    write_corpus(LOCAL, str(tmp_path / "in"), rows, "jsonl", files=2)
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in" / "*.jsonl"),
        output_uri=str(tmp_path / "out"),
        extra={"toxicity": {"threshold": 0.5, "action": "drop"}, "output": {"rows_per_file": 5}},
    )
    result = run_job(job_config(text, run_id="fig"))
    run_dir = tmp_path / "out" / "fig"
    data = json.loads((run_dir / "_summary.json").read_text())
    summary = RunSummary.from_json(data["summary"])
    kept, rejected = recount(str(run_dir), "parquet")
    table = pa.concat_tables([kept, rejected], promote_options="default")

    assert summary.rows == table.num_rows == len(rows)
    assert summary.parts == len(list((run_dir / "_stats").iterdir())) >= 2
    assert dict(summary.output_lengths) == dict(
        collections.Counter(table.column(S.OUTPUT_TOKENS).to_pylist())
    )
    assert dict(summary.prompt_lengths) == dict(
        collections.Counter(table.column(S.PROMPT_TOKENS).to_pylist())
    )
    assert dict(summary.finish_reasons) == dict(
        collections.Counter(table.column(S.FINISH_REASON).to_pylist())
    )
    kinds = [k for k in table.column(S.ERROR_KIND).to_pylist() if k is not None]
    assert dict(summary.error_kinds) == dict(collections.Counter(kinds)) == {"missing_text": 1}
    scores = [s for s in table.column(S.TOXICITY_PREFIX + "insult").to_pylist() if s is not None]
    assert sum(summary.toxicity["insult"]) == len(scores)
    assert summary.toxicity_over["insult"] == sum(s >= 0.5 for s in scores)
    expected_samples = sorted(table.column(S.ID).to_pylist(), key=_sample_key)[:5]
    assert [s[S.ID] for s in summary.samples] == expected_samples
    assert result.manifest["counts"] == {
        **summary.counts(),
        "ids_repeated": 0,
        "rows_with_repeated_ids": 0,
    }

    page = (run_dir / "report.html").read_text()
    assert f"{len(rows):,} rows" in page and 'data-chart="throughput"' in page

    # The throughput chart covers the run, at the rate the run had.
    samples = data["progress"]
    assert samples[0][0] == 0 and samples[-1][0] >= 0.5 * result.manifest["elapsed_s"]
    assert samples[-1][2] == summary.output_tokens
    rates, _, width = throughput_rates(samples)
    assert sum(r * width for r in rates) == pytest.approx(summary.output_tokens, rel=1e-6)


def _sample_key(row_id: str) -> str:
    from pipeline.summary import sample_key

    return sample_key(row_id)


def test_a_report_that_fails_leaves_a_successful_run(
    tmp_path, fixtures, ray_cluster, monkeypatch
) -> None:
    write_corpus(LOCAL, str(tmp_path / "in"), corpus_rows(6), "jsonl", files=1)
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in" / "*.jsonl"),
        output_uri=str(tmp_path / "out"),
    )

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(pipeline.runner, "write_report", broken)
    result = run_job(job_config(text, run_id="noreport"))
    run_dir = tmp_path / "out" / "noreport"
    assert result.status == "succeeded" and (run_dir / "_SUCCESS").exists()
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert manifest["report"] == {"status": "missing", "error": "RuntimeError: no fonts today"}
    assert not (run_dir / "report.html").exists()
    assert read_output(LOCAL, str(run_dir), "parquet").num_rows == 6


def test_date_like_strings_and_a_3_mib_row_survive_jsonl_unchanged(
    tmp_path, fixtures, ray_cluster
) -> None:
    rows = corpus_rows(4)
    big = "long line of body text " * (3 * 2**20 // 23 + 1)
    for i, row in enumerate(rows):
        row["day"] = f"2026-11-2{i}"
        row["body"] = big if i == 2 else f"small {i}"
    write_corpus(LOCAL, str(tmp_path / "in"), rows, "jsonl", files=1)
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in" / "*.jsonl"),
        output_uri=str(tmp_path / "out"),
        output_format="jsonl",
        extra={"input": {"passthrough": ["title", "day", "body"]}},
    )
    run_job(job_config(text, run_id="passthrough"))
    out = {}
    for path in sorted((tmp_path / "out" / "passthrough").glob("part-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out[row["id"]] = row
    assert len(big.encode()) > 3 * 2**20
    for row in rows:
        assert out[row["id"]]["day"] == row["day"] and out[row["id"]]["body"] == row["body"]
