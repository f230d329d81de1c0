"""The estimate before a run: rows and prompt tokens from a sample, within 25% of the whole
corpus, on the sample corpus and on files of mixed sizes (JSONL, gzipped JSONL, Parquet)."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import corpus_rows, job_config, job_yaml

from pipeline import columns as S
from pipeline import estimate as estimate_module
from pipeline.cli import main as cli_main
from pipeline.estimate import Throughput, estimate, prompted
from pipeline.readers import read_file
from pipeline.report.page import estimate_rows, render
from pipeline.runner import driver_tokenizer
from pipeline.summary import RunSummary

REPO = Path(__file__).resolve().parents[2]


def _config(fixtures, input_uri: str, tmp_path: Path, fmt: str | None = None):
    extra: dict = {"generation": {"max_prompt_tokens": 256, "max_new_tokens": 20}}
    if fmt:
        extra["input"] = {"format": fmt}
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=input_uri,
        output_uri=str(tmp_path / "out"),
        extra=extra,
    )
    return job_config(text, run_id="estimate")


def _actual(config, tokenizer) -> tuple[int, int]:
    """Rows and prompt tokens of the whole corpus, every row read and prompted."""
    from pipeline.formats.base import ReadSpec

    spec = ReadSpec.from_config(config)
    rows = tokens = 0
    for uri in config.input_files():
        for table in read_file(uri, spec):
            out = prompted(config, tokenizer, table)
            rows += out.num_rows
            tokens += sum(t or 0 for t in out.column(S.PROMPT_TOKENS).to_pylist())
    return rows, tokens


def _within(estimated: float, actual: float, tolerance: float = 0.25) -> bool:
    return abs(estimated - actual) <= tolerance * actual


def test_estimate_of_the_sample_corpus(fixtures, tmp_path) -> None:
    config = _config(fixtures, str(REPO / "data" / "sample" / "*.jsonl"), tmp_path)
    tokenizer = driver_tokenizer(config)
    rows, tokens = _actual(config, tokenizer)
    result = estimate(config, tokenizer, rows=60)  # 20 lines of each file: its size decides
    assert result.rows_counted == 0 and result.sampled_rows == 60
    assert _within(result.rows, rows), (result.rows, rows)
    assert _within(result.prompt_tokens, tokens), (result.prompt_tokens, tokens)
    assert result.generated_tokens == pytest.approx(20 * result.rows * (1 - result.error_fraction))


def _long_rows(n: int, start: int) -> list[dict]:
    rows = corpus_rows(n, start)
    for i, row in enumerate(rows):
        row["text"] = " ".join([row["text"]] * (1 + (start + i) % 4))
    return rows


def test_estimate_of_files_of_mixed_sizes_and_formats(fixtures, tmp_path, monkeypatch) -> None:
    corpus = tmp_path / "in"
    corpus.mkdir()
    start = 0
    for name, n in (("a.jsonl", 6), ("b.jsonl", 90), ("c.jsonl", 300), ("d.jsonl.gz", 200)):
        text = "".join(json.dumps(r) + "\n" for r in _long_rows(n, start)).encode()
        (corpus / name).write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
        start += n
    config = _config(fixtures, str(corpus / "*.jsonl*"), tmp_path, fmt="jsonl")
    tokenizer = driver_tokenizer(config)
    rows, tokens = _actual(config, tokenizer)
    result = estimate(config, tokenizer, rows=80)
    assert result.rows_counted == 6 + 200  # the small file read to its end, the gzip head whole
    assert _within(result.rows, rows), (result.rows, rows)
    assert _within(result.prompt_tokens, tokens), (result.prompt_tokens, tokens)

    parquet = tmp_path / "pq"
    parquet.mkdir()
    for name, n in (("a.parquet", 3), ("b.parquet", 250), ("c.parquet", 500)):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(_long_rows(n, start)), buffer)
        (parquet / name).write_bytes(buffer.getvalue())
        start += n
    config = _config(fixtures, str(parquet / "*.parquet"), tmp_path)
    rows, tokens = _actual(config, tokenizer)
    result = estimate(config, tokenizer, rows=80)
    assert result.rows == result.rows_counted == rows  # footers count every row
    assert _within(result.prompt_tokens, tokens), (result.prompt_tokens, tokens)
    monkeypatch.setattr(estimate_module, "MAX_FOOTERS", 2)  # the middle file goes by its size
    capped = estimate(config, tokenizer, rows=80)
    assert capped.rows_counted == 3 + 500 and _within(capped.rows, rows), (capped.rows, rows)


def test_wall_time_from_a_given_throughput(fixtures, tmp_path) -> None:
    config = _config(fixtures, str(REPO / "data" / "sample" / "*.jsonl"), tmp_path)
    tokenizer = driver_tokenizer(config)
    one = estimate(config, tokenizer, throughput=Throughput.given(100.0), replicas=1)
    four = estimate(config, tokenizer, throughput=Throughput.given(100.0), replicas=4)
    assert one.wall_s == pytest.approx(one.generated_tokens / 100.0, rel=1e-3)
    assert four.wall_s == pytest.approx(one.wall_s / 4, rel=1e-3)
    mean = estimate(config, tokenizer, generated_mean=5.0)
    assert mean.generated_tokens == round(5.0 * mean.rows * (1 - mean.error_fraction))


def test_wall_time_adds_toxicity_on_cpu_and_overlaps_it_on_an_accelerator(
    fixtures, tmp_path
) -> None:
    config = _config(fixtures, str(REPO / "data" / "sample" / "*.jsonl"), tmp_path)
    tokenizer = driver_tokenizer(config)
    assert config.toxicity.enabled
    base = dict(prompt_s_per_token=1e-4, generated_s_per_token=1e-3, start_s=7.0)
    cpu = estimate(config, tokenizer, throughput=Throughput(**base, toxicity_s_per_row=0.01))
    scored = cpu.rows * (1 - cpu.error_fraction)
    model_s = 1e-4 * cpu.prompt_tokens + 1e-3 * cpu.generated_tokens
    toxicity_s = 0.01 * scored / config.toxicity.replicas
    assert cpu.wall_s == pytest.approx(7.0 + model_s + toxicity_s, rel=1e-3)
    on_gpu = Throughput(**base, toxicity_s_per_row=0.01, stages_overlap=True)
    gpu = estimate(config, tokenizer, throughput=on_gpu)
    assert gpu.wall_s == pytest.approx(7.0 + max(model_s, toxicity_s), rel=1e-3)
    off = config.model_copy(
        update={"toxicity": config.toxicity.model_copy(update={"enabled": False})}
    )
    no_scoring = estimate(off, tokenizer, throughput=Throughput(**base, toxicity_s_per_row=0.01))
    assert no_scoring.wall_s == pytest.approx(7.0 + model_s, rel=1e-3)


def test_cold_import_time_is_measured_in_a_fresh_interpreter() -> None:
    assert estimate_module.cold_import_s(("json",)) > 0
    with pytest.raises(subprocess.CalledProcessError):
        estimate_module.cold_import_s(("no_such_module_here",))


def test_validate_estimate_prints_the_figures(fixtures, tmp_path, capsys) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(
        job_yaml(
            fixtures,
            task="summarize",
            input_uri=str(REPO / "data" / "sample" / "*.jsonl"),
            output_uri=str(tmp_path / "out"),
        )
    )
    code = cli_main(
        ["validate", str(config), "--estimate", "--throughput", "50", "--replicas", "2"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "rows:             300 " in out and "prompt tokens:" in out
    assert "on 2 replica(s) (given throughput)" in out


def test_report_shows_the_estimate_beside_the_actuals() -> None:
    manifest = {
        "run_id": "r",
        "elapsed_s": 30.0,
        "counts": {"rows": 110, "prompt_tokens": 900, "output_tokens": 200},
        "estimate": {"rows": 100, "prompt_tokens": 1000, "generated_tokens": 220, "wall_s": 20.0},
    }
    assert estimate_rows(manifest) == [
        ("Rows", 100, 110),
        ("Prompt tokens", 1000, 900),
        ("Generated tokens", 220, 200),
        ("Wall time (s)", 20.0, 30.0),
    ]
    page = render(manifest, RunSummary(), [], "/tmp/r")
    assert "Estimate and actual" in page and "1.10" in page and "1.50" in page
    assert estimate_rows({"estimate": {"error": "x"}}) == []
