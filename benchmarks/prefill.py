"""Prefill throughput of our RecurrentGemma against the official ``recurrentgemma`` package.

What is measured: one jitted forward pass over an unpadded batch (segment_pos = arange), called as
a prefill, i.e. with ``cache=None`` and ``return_cache=True`` so the logits *and* the cache that a
decode would continue from are computed. Throughput is batch * seq tokens divided by the seconds
one forward takes. Four implementations share the same random weights and input:

  ours-linear          model.RecurrentGemma(scan_impl="linear")
  ours-associative     model.RecurrentGemma(scan_impl="associative")
  official-linear      recurrentgemma.jax.Griffin, ScanType.LINEAR_NATIVE
  official-associative recurrentgemma.jax.Griffin, ScanType.ASSOCIATIVE_NATIVE

Each one is lowered and compiled ahead of time (reported as the compile time) and run once to warm
up; then all are timed with ``block_until_ready`` in ``--repeats`` round-robin rounds (one call of
each per round, so background load on a shared machine hits them alike), and the median and min
seconds per forward are reported, with tokens/s from each. The load average before and after is
printed: on a busy machine, compare only numbers from the same run. As a guard that every implementation computes the same thing, the max abs difference of
each one's logits from a reference (official linear scan when selected) is printed too.

Default workload: width 512, 6 layers (recurrent, recurrent, attention, ...), 4 heads, MLP 1536,
vocab 8192, window 256, lru_width 512, float32, batch 8 x 512 tokens, on the default backend.

Run:
  make bench                                   # the default workload
  .venv/bin/python -m benchmarks.prefill       # same
  .venv/bin/python -m benchmarks.prefill --small --impls ours-linear,official-linear
  .venv/bin/python -m benchmarks.prefill --json results.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/prefill.py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from model import ModelConfig, RecurrentGemma
from testkit.tiny_model import random_params
from tests.oracle import official_griffin_config

IMPLS: tuple[str, ...] = (
    "ours-linear",
    "ours-associative",
    "official-linear",
    "official-associative",
)

DEFAULTS: dict[str, int] = dict(batch=8, seq=512, **harness.MODEL_DEFAULTS, repeats=5)
SMALL: dict[str, int] = dict(batch=2, seq=16, **harness.MODEL_SMALL, repeats=1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    harness.add_workload_args(parser, DEFAULTS, SMALL)
    harness.add_subset_arg(parser, "--impls", IMPLS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens")
    harness.add_output_args(parser, "tiny preset for a quick smoke run (seconds)")
    args = parser.parse_args(argv)
    harness.resolve_workload_args(args, DEFAULTS, SMALL)
    args.impls = harness.parse_subset(parser, "--impls", args.impls, IMPLS)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def official_model(config: ModelConfig, scan: str) -> Any:
    """recurrentgemma.jax.Griffin with ``config``'s hyper-parameters and the given native scan."""
    import recurrentgemma.jax as official

    griffin_config = official_griffin_config(config, scan)
    return official.Griffin(griffin_config, gradient_checkpointing=False)


def prefill_fn(impl: str, config: ModelConfig) -> Callable[..., tuple[jax.Array, Any]]:
    """(params, tokens, segment_pos) -> (logits, cache): a prefill with cache=None."""
    owner, scan = impl.split("-", 1)
    if owner == "ours":
        model = RecurrentGemma(config, dtype=jnp.float32, scan_impl=scan)

        def ours(params: Any, tokens: jax.Array, segment_pos: jax.Array) -> tuple[jax.Array, Any]:
            return model.apply({"params": params}, tokens, segment_pos, None, return_cache=True)

        return ours
    model = official_model(config, scan)

    def theirs(params: Any, tokens: jax.Array, segment_pos: jax.Array) -> tuple[jax.Array, Any]:
        return model.apply(
            {"params": params}, tokens, segment_pos, None, return_logits=True, return_cache=True
        )

    return theirs


def compile_impl(
    impl: str, config: ModelConfig, params: Any, tokens: jax.Array, segment_pos: jax.Array
) -> tuple[Callable[..., Any], dict[str, Any], np.ndarray]:
    """Lowers, compiles and warms up one implementation; returns (compiled, stats, host logits)."""
    fn = jax.jit(prefill_fn(impl, config))
    start = time.perf_counter()
    compiled = fn.lower(params, tokens, segment_pos).compile()
    compile_s = time.perf_counter() - start

    (logits, _), warmup_s = harness.time_call(compiled, params, tokens, segment_pos)
    return compiled, dict(compile_s=compile_s, warmup_s=warmup_s, times_s=[]), np.asarray(logits)


def time_round_robin(
    compiled: dict[str, Callable[..., Any]],
    stats: dict[str, dict[str, Any]],
    args: tuple[Any, ...],
    repeats: int,
    n_tokens: int,
) -> None:
    """Times every implementation once per round, ``repeats`` rounds.

    Interleaving spreads background load on a shared machine evenly across the implementations
    instead of penalising whichever happens to run during it.
    """
    for _ in range(repeats):
        for impl, fn in compiled.items():
            try:
                stats[impl]["times_s"].append(harness.time_call(fn, *args)[1])
            except Exception as exc:  # keep timing the others
                stats[impl]["error"] = harness.error_text(exc)
        compiled = {i: f for i, f in compiled.items() if "error" not in stats[i]}
    for row in stats.values():
        if "error" in row:
            continue
        row["median_s"], row["min_s"] = harness.median_min(row["times_s"])
        row["tokens_per_s"] = n_tokens / row["median_s"]
        row["tokens_per_s_best"] = n_tokens / row["min_s"]


def format_report(results: dict[str, Any]) -> str:
    env, wl = results["environment"], results["workload"]
    lines = [
        harness.environment_line(env),
        f"workload: batch {wl['batch']} x seq {wl['seq']} = {wl['tokens']} tokens, unpadded, "
        f"{wl['dtype']}; {harness.model_summary(wl)}",
        f"timed: {wl['call']}; {wl['repeats']} round-robin repeats after one warm-up call each",
        harness.load_line(env),
        "",
    ]
    lines += harness.with_rule(
        f"{'impl':<22}{'compile s':>10}{'median s':>11}{'min s':>10}"
        f"{'tok/s (median)':>16}{'tok/s (best)':>14}{'max|diff|':>12}"
    )
    for impl, row in results["impls"].items():
        if "error" in row:
            lines.append(f"{impl:<22}FAILED: {row['error']}")
            continue
        diff = row.get("max_abs_diff_vs_reference")
        lines.append(
            f"{impl:<22}{row['compile_s']:>10.2f}{row['median_s']:>11.4f}{row['min_s']:>10.4f}"
            f"{row['tokens_per_s']:>16,.0f}{row['tokens_per_s_best']:>14,.0f}"
            f"{'' if diff is None else f'{diff:.2e}':>12}"
        )
    lines.append("")
    if results["reference"]:
        lines.append(f"max|diff|: max abs logit difference from {results['reference']}")
    ours_vs = results["max_abs_diff_ours_vs_official"]
    if ours_vs is not None:
        lines.append(f"max abs logit diff, ours vs official (all pairs): {ours_vs:.3e}")
    fastest = results["fastest_ours_scan"]
    if fastest:
        lines.append(f"faster scan for ours on {env['backend']}: {fastest}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    log = harness.Log("prefill")
    config = harness.griffin_config(args)
    params = jax.device_put(random_params(config, seed=args.seed))
    rng = np.random.default_rng(args.seed)
    tokens = jnp.asarray(rng.integers(1, config.vocab_size, (args.batch, args.seq)), jnp.int32)
    segment_pos = jnp.asarray(
        np.broadcast_to(np.arange(args.seq), (args.batch, args.seq)), jnp.int32
    )

    results: dict[str, Any] = dict(
        environment=harness.environment(),
        workload=dict(
            batch=args.batch,
            seq=args.seq,
            tokens=args.batch * args.seq,
            **harness.model_fields(args, config),
            dtype="float32",
            repeats=args.repeats,
            seed=args.seed,
            call="jit prefill, cache=None, return_cache=True (logits + cache)",
        ),
        impls={},
    )
    logits: dict[str, np.ndarray] = {}
    compiled: dict[str, Callable[..., Any]] = {}
    for impl in args.impls:
        log(f"{impl}: compiling and warming up ...")
        try:
            compiled[impl], results["impls"][impl], logits[impl] = compile_impl(
                impl, config, params, tokens, segment_pos
            )
        except Exception as exc:  # report a failing implementation, keep measuring the rest
            results["impls"][impl] = dict(error=harness.error_text(exc))
    log(f"timing {args.repeats} round(s) over {list(compiled)} ...")
    time_round_robin(
        compiled, results["impls"], (params, tokens, segment_pos), args.repeats, int(tokens.size)
    )
    harness.record_load_after(results["environment"])

    reference = next(
        (i for i in ("official-linear", "official-associative", *IMPLS) if i in logits), None
    )
    results["reference"] = reference
    for impl, value in logits.items():
        if "error" in results["impls"][impl]:
            continue
        diff = float(np.max(np.abs(value - logits[reference])))
        results["impls"][impl]["max_abs_diff_vs_reference"] = diff
    pairs = [
        float(np.max(np.abs(logits[a] - logits[b])))
        for a in logits
        if a.startswith("ours-")
        for b in logits
        if b.startswith("official-")
    ]
    results["max_abs_diff_ours_vs_official"] = max(pairs) if pairs else None
    ours = {
        i.removeprefix("ours-"): row["tokens_per_s"]
        for i, row in results["impls"].items()
        if i.startswith("ours-") and "error" not in row
    }
    results["fastest_ours_scan"] = max(ours, key=ours.__getitem__) if len(ours) > 1 else None

    return harness.finish(results, format_report(results), args.json, "prefill")


if __name__ == "__main__":
    main()
