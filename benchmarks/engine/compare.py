"""Agreement and ratios between the parts of the engine benchmark.

Greedy tokens are compared as a correctness guard: ours vs official on every request (the
official model ignores left pads exactly as ours does), ours vs HF on the rows that needed no
padding (HF's conv1d reads the pads of a left-padded row, so padded rows legitimately differ).
The ratios are of useful tokens/s: ours (best and defaults) against each reference, cold and
warm, and against the ceiling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.engine.workload import batches


def compare(ours: list[list[int]], theirs: list[list[int]], rows: Sequence[int]) -> dict[str, Any]:
    """How many of ``rows`` have identical greedy tokens, and where the first mismatch starts."""
    same = [i for i in rows if ours[i] == theirs[i]]
    first = {}
    for i in rows:
        if ours[i] != theirs[i]:
            diff = [k for k, (a, b) in enumerate(zip(ours[i], theirs[i], strict=False)) if a != b]
            first[i] = diff[0] if diff else min(len(ours[i]), len(theirs[i]))
    return dict(compared=len(rows), identical=len(same), first_mismatch_at=first)


def unpadded_rows(prompts: list[list[int]], batch: int) -> list[int]:
    """The requests that are the longest of their reference batch (no left padding)."""
    return [
        i
        for rows in batches(len(prompts), batch)
        for i in rows
        if len(prompts[i]) == max(len(prompts[j]) for j in rows)
    ]


def token_checks(
    tokens: dict[str, list[list[int]]], prompts: list[list[int]], batch: int
) -> dict[str, Any]:
    """Ours against each reference that ran (nothing without ours)."""
    checks: dict[str, Any] = {}
    if "ours" not in tokens:
        return checks
    everyone = range(len(prompts))
    if "official" in tokens:
        checks["ours vs official (all requests)"] = compare(
            tokens["ours"], tokens["official"], everyone
        )
    if "hf" in tokens:
        unpadded = unpadded_rows(prompts, batch)
        checks["ours vs HF (unpadded rows)"] = compare(tokens["ours"], tokens["hf"], unpadded)
        checks["ours vs HF (all rows, padding differs)"] = compare(
            tokens["ours"], tokens["hf"], everyone
        )
    return checks


def _ok(results: dict[str, Any], key: str) -> bool:
    return key in results and "error" not in results[key]


def ratios(results: dict[str, Any], best: dict[str, Any] | None) -> dict[str, float]:
    """Useful tokens/s ratios of ours (the best setting and the defaults) to the others."""
    out: dict[str, float] = {}
    if best is None:
        return out
    ours_defaults = results["ours"][0]
    out["ours best cold / warm"] = best["cold_tokens_per_s"] / best["warm_tokens_per_s"]
    for key in ("official", "hf"):
        if _ok(results, key):
            ref = results[key]
            out[f"ours best warm / {key} warm"] = (
                best["warm_tokens_per_s"] / ref["warm_tokens_per_s"]
            )
            out[f"ours defaults warm / {key} warm"] = (
                ours_defaults["warm_tokens_per_s"] / ref["warm_tokens_per_s"]
            )
            out[f"ours best cold / {key} cold"] = (
                best["cold_tokens_per_s"] / ref["cold_tokens_per_s"]
            )
    if "ceiling" in results:
        roof = results["ceiling"]["ceiling_tokens_per_s"]
        out["ours best warm / ceiling"] = best["warm_tokens_per_s"] / roof
        if _ok(results, "official"):
            out["ceiling / official warm"] = roof / results["official"]["warm_tokens_per_s"]
    return out
