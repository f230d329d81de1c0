"""The fault soak benchmark runs end to end at a small size: nothing lost through the faults."""

from __future__ import annotations

import json

import pytest

from benchmarks import fault_soak


@pytest.mark.slow
def test_fault_soak_benchmark_small(tmp_path) -> None:
    out = tmp_path / "soak.json"
    results = fault_soak.main(["--rows", "400", "--rate", "0.2", "--json", str(out)])
    assert set(results["runs"]) == {"clean", "faulty"}
    assert results["runs"]["clean"]["faults_total"] == 0
    assert results["runs"]["faulty"]["faults_total"] > 0
    for run in results["runs"].values():
        assert run["exit"] == 0 and run["success_marker"]
        assert run["rows_out"] == run["manifest_rows"] == 400
        assert run["rows_lost"] == run["rows_duplicated"] == 0
    assert results["nothing_lost"] is True
    assert json.loads(out.read_text()) == results
