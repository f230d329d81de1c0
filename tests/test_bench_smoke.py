"""The prefill benchmark runs end to end on its tiny preset, and every implementation agrees."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "prefill.py"


def load_benchmark() -> ModuleType:
    """Imports benchmarks/prefill.py by path (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("rgbatch_bench_prefill", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_small_prefill_benchmark_times_every_impl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_benchmark()
    out = tmp_path / "results.json"
    results = bench.main(["--small", "--json", str(out)])

    assert set(results["impls"]) == set(bench.IMPLS)
    for impl, row in results["impls"].items():
        assert "error" not in row, f"{impl}: {row.get('error')}"
        assert row["tokens_per_s"] > 0 and row["compile_s"] > 0, impl
        assert len(row["times_s"]) == 1
    assert results["workload"]["tokens"] == 2 * 16
    assert results["max_abs_diff_ours_vs_official"] <= 1e-4
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    printed = capsys.readouterr().out
    assert "ours-linear" in printed and "official-associative" in printed
