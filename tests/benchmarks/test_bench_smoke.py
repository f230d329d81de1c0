"""The prefill benchmark runs end to end on its tiny preset, and every implementation agrees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import prefill as bench


@pytest.mark.timeout(120)
def test_small_prefill_benchmark_times_every_impl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
