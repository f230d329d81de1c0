"""The pipeline scale benchmark runs end to end at a small size and reports driver figures."""

from __future__ import annotations

import json

import pytest

from benchmarks import pipeline_scale


@pytest.mark.slow
def test_pipeline_scale_benchmark_small(tmp_path) -> None:
    out = tmp_path / "scale.json"
    results = pipeline_scale.main(["--sizes", "300", "900", "--json", str(out)])
    assert set(results["sizes"]) == {"300", "900"}
    for rows, size in results["sizes"].items():
        assert size["rows"] == int(rows) and size["rows_per_s"] > 0
        assert size["driver_peak_rss_mb"] > 50 and size["driver_read_bytes"] > 0
        assert size["corpus_bytes"] > 20 * int(rows)  # 20 to 60 words per row
        assert "MapBatches(ModelStage)" in size["operator_us_per_row"]
    assert isinstance(results["meets_targets"], bool)
    assert json.loads(out.read_text()) == results
