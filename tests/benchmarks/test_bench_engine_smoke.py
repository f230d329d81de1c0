"""The engine-vs-reference benchmark runs end to end on its tiny preset, and the three agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import engine_vs_reference as bench


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_small_engine_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    results = bench.main(["--small", "--json", str(out)])

    workload = results["workload"]
    assert workload["requests"] == 12
    rows = [*results["ours"], results["official"], results["hf"]]
    defaults, tuned = results["ours"]
    assert defaults["label"] == "ours defaults"
    # The defaults are timed warm only, unless they are the best setting (which gets a cold run).
    assert (defaults["cold_s"] is None) == (results["best_ours"] != defaults["label"])
    for row in rows:
        assert "error" not in row, f"{row['label']}: {row.get('error')}"
        assert row["useful_tokens"] == workload["useful_tokens"]
        assert row["warm_tokens_per_s"] > 0, row["label"]
        if row is not defaults:
            assert row["cold_tokens_per_s"] > 0, row["label"]
            assert row["warm_tokens_equal_cold"], row["label"]
    for row in results["ours"]:
        assert row["exact_lengths"]
        # Fixed shapes: nothing compiles after the first run (or the warm-up).
        assert row["compiled_shapes_after_cold"] == row["compiled_shapes_after_warm"] == 3
    assert results["best_ours"] in (defaults["label"], tuned["label"])

    # Greedy tokens: ours equals the official sampler on every request (it skips left pads as we
    # do) and HF on the rows that needed no left padding (HF's conv reads the pads).
    checks = results["token_checks"]
    official = checks["ours vs official (all requests)"]
    assert official["compared"] == 12 and official["identical"] == 12
    hf = checks["ours vs HF (unpadded rows)"]
    assert hf["compared"] >= 3 and hf["identical"] == hf["compared"]

    ratios = results["ratios"]
    assert all(value > 0 for value in ratios.values())
    assert {"ours best warm / official warm", "ours best warm / hf warm"} <= set(ratios)
    # The ceiling: the workload's matmul FLOPs at the measured rates (at this tiny size the
    # rates are dominated by call overhead, so it bounds nothing here; the arithmetic is checked).
    ceiling = results["ceiling"]
    assert ceiling["decode_gflops"] > 0 and ceiling["prefill_gflops"] > 0
    assert ceiling["flops_per_generated_token"] > ceiling["flops_per_prompt_token"] > 0
    useful, prompt = workload["useful_tokens"], workload["prompt_tokens"]
    decode_s = useful * ceiling["flops_per_generated_token"] / (ceiling["decode_gflops"] * 1e9)
    prefill_s = prompt * ceiling["flops_per_prompt_token"] / (ceiling["prefill_gflops"] * 1e9)
    assert ceiling["min_decode_s"] == pytest.approx(decode_s)
    assert ceiling["min_prefill_s"] == pytest.approx(prefill_s)
    assert ceiling["ceiling_tokens_per_s"] == pytest.approx(useful / (decode_s + prefill_s))
    assert {"ours best warm / ceiling", "ceiling / official warm"} <= set(ratios)

    memory = results["memory"]
    assert "error" not in memory, memory.get("error")
    assert memory["engine_state_bytes_per_slot"] >= memory["cache_bytes_per_sequence"] > 0
    for key in ("short", "long"):
        run = memory[key]
        assert run["exact_lengths"] and run["tokens_per_s"] > 0
        assert run["generated_tokens"] == run["requests"] * run["max_new"]
        assert run["compiled_shapes"] == run["compiled_shapes_after_warmup"] >= 3
    # A 4x longer generation must not need more than a few MiB beyond the short one.
    assert memory["growth_diff"] < 32 * 2**20

    assert json.loads(out.read_text()) == results
    printed = capsys.readouterr().out
    assert "official Sampler" in printed and "HF generate" in printed and "ratios" in printed
