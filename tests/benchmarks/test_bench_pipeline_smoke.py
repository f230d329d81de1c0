"""The pipeline efficiency benchmark runs end to end at a small size."""

from __future__ import annotations

import os

import jax
import pytest

from benchmarks import pipeline_efficiency


@pytest.mark.slow
def test_pipeline_efficiency_benchmark_small(tmp_path) -> None:
    before_env, before_cache = (
        os.environ.get("RGBATCH_CACHE_DIR"),
        jax.config.jax_compilation_cache_dir,
    )
    result = pipeline_efficiency.main(["--small", "--json", str(tmp_path / "out.json")])
    # Same prompts, greedy, same stop ids: both sides generate the same number of tokens.
    assert 0 < result["engine_tokens"] == result["end_to_end_tokens"] <= 64 * 8
    assert result["efficiency"] > 0 and (tmp_path / "out.json").is_file()
    assert result["compile_cache"] == "warm"
    # The run's cache directory and JAX setting do not leak into the caller.
    assert os.environ.get("RGBATCH_CACHE_DIR") == before_env
    assert jax.config.jax_compilation_cache_dir == before_cache
