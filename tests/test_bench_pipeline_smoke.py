"""The pipeline efficiency benchmark runs end to end at a small size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_pipeline_efficiency_benchmark_small(tmp_path) -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline_efficiency.py"
    spec = importlib.util.spec_from_file_location("pipeline_efficiency", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--small", "--json", str(tmp_path / "out.json")])
    assert result["engine_tokens"] == result["end_to_end_tokens"] == 64 * 8
    assert result["efficiency"] > 0 and (tmp_path / "out.json").is_file()
