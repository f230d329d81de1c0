"""The GPU engine benchmark's reduced CPU path runs end to end (the full size needs a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_engine_benchmark_runs_at_reduced_size(tmp_path) -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_engine.py"
    spec = importlib.util.spec_from_file_location("gpu_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    result = module.main(["--cpu-small", "--json", str(tmp_path / "out.json")])
    assert (tmp_path / "out.json").is_file()
    assert [row["slots"] for row in result["rows"]] == [4, 8]
    for row in result["rows"]:
        assert row["generated_tokens"] == row["slots"] * result["new_tokens"]
        assert row["tokens_per_s_decode"] > 0
        assert 0 < row["roofline_fraction"] < 1.5
