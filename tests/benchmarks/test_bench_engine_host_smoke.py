"""The engine host-work benchmark runs at its small size, against a baseline from git."""

from __future__ import annotations

import json

import pytest

from benchmarks import engine_host


@pytest.mark.slow
def test_engine_host_benchmark_small(tmp_path) -> None:
    out = tmp_path / "host.json"
    # HEAD: a commit every clone has, shallow or not; the default (7da69c4) needs the history.
    results = engine_host.main(["--small", "--baseline-ref", "HEAD", "--json", str(out)])
    assert results["baseline_ref"] == "HEAD"
    rows = results["engine"]
    assert [(r["slots"], r["new_tokens"]) for r in rows] == [(4, 1), (4, 8), (8, 1), (8, 8)]
    for row in rows:
        assert row["tokens_equal"], row
        for label in ("ours", "baseline"):
            run = row[label]
            assert run["generated_tokens"] == run["requests"] * row["new_tokens"]
            assert run["instrumented_equal_plain"] and run["compiled_after"] == 3
            assert run["host_s"] > 0 and 0 <= run["device_waits_share"] <= 1
            assert (run["host_us_per_decode_step"] is None) == (row["new_tokens"] == 1)
        assert all(value > 0 for value in row["ratios"].values())
    sampling = results["sampling"]
    assert sampling["shape"] == [8, 4096]
    for label in ("ours", "baseline"):
        assert sampling[label]["over_temperature"]["temperature 0.7"] == 1.0
        assert all(ms > 0 for ms in sampling[label]["ms"].values())
    assert set(sampling["ours/baseline"]) == set(engine_host.SETTINGS)
    assert json.loads(out.read_text()) == results
