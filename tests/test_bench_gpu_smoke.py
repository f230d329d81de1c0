"""The GPU engine benchmark's reduced CPU path runs end to end (the full size needs a GPU)."""

from __future__ import annotations

import pytest

from benchmarks import gpu_engine


@pytest.mark.slow
def test_gpu_engine_benchmark_runs_at_reduced_size(tmp_path) -> None:
    result = gpu_engine.main(["--cpu-small", "--json", str(tmp_path / "out.json")])
    assert (tmp_path / "out.json").is_file()
    assert [row["slots"] for row in result["rows"]] == [4, 8]
    for row in result["rows"]:
        assert row["generated_tokens"] == row["slots"] * result["new_tokens"]
        assert row["tokens_per_s_decode"] > 0
        assert 0 < row["roofline_fraction"] < 1.5
