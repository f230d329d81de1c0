"""The prefix reuse benchmark runs at its small size: reuse prefills fewer tokens, same tokens."""

from __future__ import annotations

import json

from benchmarks import prefix_reuse


def test_prefix_reuse_benchmark_small(tmp_path) -> None:
    out = tmp_path / "prefix.json"
    results = prefix_reuse.main(["--small", "--json", str(out)])
    runs = results["runs"]
    assert runs["reuse"]["prefilled_tokens"] < runs["no_reuse"]["prefilled_tokens"]
    assert runs["no_reuse"]["reused_prompt_tokens"] == 0 < runs["reuse"]["reused_prompt_tokens"]
    w = results["workload"]
    assert results["greedy_equal_rows"] == w["docs"] * w["questions"]
    assert json.loads(out.read_text()) == results
