"""The GPU benchmarks' toy-size CPU paths run end to end (the full sizes need a GPU).

Speed targets (roofline fraction, ours against the official sampler) are reported in the
benchmarks' JSON, never asserted here: these tests check that every part runs and writes its
figures.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import engine_host

# The repository root, wherever under tests/ this file sits.
ROOT = next(
    p for p in Path(__file__).resolve().parents if (p / "benchmarks" / "gpu_all.sh").is_file()
)
PARTS = ("preflight", "engine", "reference", "numerics", "engine9b", "host")
# gpu_all.sh reads these from the environment; the test must not inherit a caller's.
SCRIPT_SETTINGS = (
    "PARTS",
    "SMALL",
    "BUDGET_S",
    "ENGINE_SLOTS",
    "PROMPT_LEN",
    "NEW_TOKENS",
    "PREFILL_BATCH",
    "PREFILL_CHUNK",
    "DECODE_STEPS",
    "REF_REQUESTS",
    "REF_NEW_TOKENS",
    "NUMERICS_PROMPTS",
    "NUMERICS_PROMPT_LEN",
    "NUMERICS_STEPS",
    "SLOTS_9B",
    "NEW_TOKENS_9B",
    *(f"CAP_{part.upper()}" for part in PARTS),
)


def test_gpu_benchmarks_import_neither_ray_nor_the_pipeline() -> None:
    code = (
        "import sys\n"
        "import benchmarks.gpu_engine, benchmarks.gpu_numerics, benchmarks.gpu_reference\n"
        "import benchmarks.gpu_report, benchmarks.engine_host\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pipeline', 'detoxify'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@pytest.mark.slow
def test_gpu_all_script_runs_every_part_at_toy_size(tmp_path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_SETTINGS}
    env.update(
        OUT=str(out),
        PYTHON=sys.executable,
        HOST_BASELINE_REF="HEAD",  # a commit every clone has, shallow or not
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_all.sh"), "--cpu-small"],
        cwd=tmp_path,  # the script finds the repository from its own path
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,  # a hang guard only: the script's own caps stop each part sooner
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in PARTS}
    for name, data in results.items():
        assert data["run"]["status"] == "ok", (name, data.get("error"), data["run"])
        assert (out / f"{name}.log").is_file()

    preflight = results["preflight"]
    assert preflight["official_imports"] is True
    assert preflight["ray_imported"] is False and preflight["pipeline_imported"] is False

    for name, slots, new_tokens in (("engine", [4, 8], 16), ("engine9b", [4], 16)):
        data = results[name]
        assert data["complete"] and data["new_tokens"] == new_tokens
        assert [row["slots"] for row in data["rows"]] == slots
        for row in data["rows"]:
            assert row["generated_tokens"] == row["slots"] * new_tokens
            assert row["tokens_per_s_decode"] > 0 and row["roofline_fraction"] > 0
        assert set(data["target"]) >= {"slots", "min_roofline_fraction", "roofline_fraction"}
        assert data["target"]["roofline_fraction"] is None  # no 128-slot row at this size
    assert results["engine9b"]["preset"] == "9b"

    reference = results["reference"]
    useful = reference["workload"]["useful_tokens"]
    assert useful == 4 * 8
    for key in ("ours", "official", "hf"):
        row = reference[key]
        assert "error" not in row, row
        assert row["useful_tokens"] == useful and row["warm_tokens_per_s"] > 0
    assert set(reference["ratios"]) >= {"ours warm / official warm", "ours warm / hf warm"}
    assert _finite(reference["target"]["ratio"]) and reference["target"]["min_ratio"] == 3.0
    assert {c["compared"] for c in reference["token_checks"].values()} == {4}
    assert (
        reference["hf"]["attention_window_size"]
        == reference["workload"]["config"]["attention_window_size"] + 1
    )

    numerics = results["numerics"]
    for key in ("max_abs_diff", "mean_abs_diff"):
        assert _finite(numerics[key]) and numerics[key] >= 0
    for key in ("greedy_agreement_teacher_forced", "greedy_agreement_free_running"):
        assert 0 <= numerics[key] <= 1
    assert len(numerics["teacher_forced"]["generated_positions"]["max_abs_diff_by_step"]) == 8
    assert len(numerics["free_running"]["first_divergence"]) == 2

    # The host part is also engine_host's smoke test: ours against a baseline from git.
    host = results["host"]
    assert host["small"] is True and host["baseline_ref"] == "HEAD"
    assert [(row["slots"], row["new_tokens"]) for row in host["engine"]] == [
        (4, 1), (4, 8), (8, 1), (8, 8)
    ]  # fmt: skip
    for row in host["engine"]:
        assert row["tokens_equal"], row
        for label in ("ours", "baseline"):
            run = row[label]
            assert run["generated_tokens"] == run["requests"] * row["new_tokens"]
            assert run["instrumented_equal_plain"] and run["compiled_after"] == 3
            assert run["tokens_per_s"] > 0 and run["host_s"] > 0
            assert 0 <= run["device_waits_share"] <= 1
            assert (run["host_us_per_decode_step"] is None) == (row["new_tokens"] == 1)
        assert all(value > 0 for value in row["ratios"].values())
    sampling = host["sampling"]
    assert sampling["shape"] == [8, 4096]
    for label in ("ours", "baseline"):
        assert sampling[label]["over_temperature"]["temperature 0.7"] == 1.0
        assert all(ms > 0 for ms in sampling[label]["ms"].values())
        assert set(sampling[label]["ms"]) == set(engine_host.SETTINGS)
    assert set(sampling["ours/baseline"]) == set(engine_host.SETTINGS)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["small"] is True
    assert {name: entry["status"] for name, entry in summary["parts"].items()} == dict.fromkeys(
        PARTS, "ok"
    )
    assert summary["parts"]["reference"]["figures"]["target"]["min_ratio"] == 3.0
