"""The controls benchmark at its small size: n=4 prefills each prompt once, a stop on the device
wastes nothing and one found on the host at most a call's steps, plain rows are unchanged."""

from __future__ import annotations

import json

from benchmarks import controls


def test_controls_benchmark_small(tmp_path) -> None:
    out = tmp_path / "controls.json"
    results = controls.main(["--small", "--json", str(out)])
    n = results["n"]
    assert n["prefills_each_prompt_once"] and n["prefilled_n4"] == n["prompt_tokens"]
    assert n["prefilled_4x_n1"] == 4 * n["prompt_tokens"] and n["samples"] == 4 * n["prompts"]
    stop = results["stop"]
    assert (
        stop["device"]["stopped"] == stop["rows"] and stop["device"]["wasted_per_stopped_row"] == 0
    )
    assert stop["host"]["stopped"] == stop["rows"]
    assert stop["host"]["wasted_per_stopped_row"] <= stop["decode_steps"] - 1
    assert results["mixed"]["plain_rows_unchanged"]
    assert results["cost"]["compiled_shapes"] == 3
    assert json.loads(out.read_text()) == results
