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
  .venv/bin/python benchmarks/prefill.py       # same
  .venv/bin/python benchmarks/prefill.py --small --impls ours-linear,official-linear
  .venv/bin/python benchmarks/prefill.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import ModelConfig, RecurrentGemma
from model.config import griffin_pattern
from model.testing import official_griffin_config, random_params

IMPLS: tuple[str, ...] = (
    "ours-linear",
    "ours-associative",
    "official-linear",
    "official-associative",
)

DEFAULTS: dict[str, int] = dict(
    batch=8,
    seq=512,
    width=512,
    layers=6,
    heads=4,
    mlp=1536,
    vocab=8192,
    window=256,
    repeats=5,
)
SMALL: dict[str, int] = dict(
    batch=2,
    seq=16,
    width=64,
    layers=3,
    heads=2,
    mlp=96,
    vocab=256,
    window=8,
    repeats=1,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, value in DEFAULTS.items():
        parser.add_argument(
            f"--{name}", type=int, default=None, help=f"default {value} (--small: {SMALL[name]})"
        )
    parser.add_argument("--lru-width", type=int, default=None, help="default: --width")
    parser.add_argument(
        "--impls",
        default=",".join(IMPLS),
        help=f"comma-separated subset of {','.join(IMPLS)} (default: all)",
    )
    parser.add_argument(
        "--small", action="store_true", help="tiny preset for a quick smoke run (seconds)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write results as JSON")
    args = parser.parse_args(argv)
    preset = SMALL if args.small else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lru_width is None:
        args.lru_width = args.width
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown or not impls:
        parser.error(f"--impls: unknown {unknown}; choose from {', '.join(IMPLS)}")
    args.impls = list(dict.fromkeys(impls))
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def build_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab,
        width=args.width,
        mlp_expanded_width=args.mlp,
        num_heads=args.heads,
        block_types=griffin_pattern(args.layers),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=args.window,
        logits_soft_cap=30.0,
        lru_width=args.lru_width,
    )


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

    start = time.perf_counter()
    logits, _ = jax.block_until_ready(compiled(params, tokens, segment_pos))
    warmup_s = time.perf_counter() - start
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
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                stats[impl]["times_s"].append(time.perf_counter() - start)
            except Exception as exc:  # keep timing the others
                traceback.print_exc()
                stats[impl]["error"] = f"{type(exc).__name__}: {exc}"
        compiled = {i: f for i, f in compiled.items() if "error" not in stats[i]}
    for row in stats.values():
        if "error" in row:
            continue
        times = row["times_s"]
        row["median_s"], row["min_s"] = statistics.median(times), min(times)
        row["tokens_per_s"] = n_tokens / row["median_s"]
        row["tokens_per_s_best"] = n_tokens / row["min_s"]


def environment() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return dict(
        jax_version=jax.__version__,
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        cpu_count=os.cpu_count(),
        cpus_usable=usable,
        python=platform.python_version(),
        machine=platform.machine(),
        load_avg_before=list(os.getloadavg()),
    )


def _load(env: dict[str, Any], when: str) -> str:
    values = env.get(f"load_avg_{when}")
    return "n/a" if values is None else "/".join(f"{v:.2f}" for v in values)


def format_report(results: dict[str, Any]) -> str:
    env, wl = results["environment"], results["workload"]
    lines = [
        f"jax {env['jax_version']}  backend {env['backend']}  devices {', '.join(env['devices'])}  "
        f"CPUs {env['cpu_count']} ({env['cpus_usable']} usable)  python {env['python']}",
        f"workload: batch {wl['batch']} x seq {wl['seq']} = {wl['tokens']} tokens, unpadded, "
        f"{wl['dtype']}; width {wl['width']}, layers {wl['layers']} "
        f"({'/'.join(b[0].upper() for b in wl['block_types'])}), heads {wl['heads']}, "
        f"mlp {wl['mlp']}, vocab {wl['vocab']}, window {wl['window']}, lru {wl['lru_width']}",
        f"timed: {wl['call']}; {wl['repeats']} round-robin repeats after one warm-up call each",
        f"load average (1/5/15 min) before {_load(env, 'before')}, after {_load(env, 'after')}",
        "",
    ]
    header = (
        f"{'impl':<22}{'compile s':>10}{'median s':>11}{'min s':>10}"
        f"{'tok/s (median)':>16}{'tok/s (best)':>14}{'max|diff|':>12}"
    )
    lines += [header, "-" * len(header)]
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
    config = build_config(args)
    params = jax.device_put(random_params(config, seed=args.seed))
    rng = np.random.default_rng(args.seed)
    tokens = jnp.asarray(rng.integers(1, config.vocab_size, (args.batch, args.seq)), jnp.int32)
    segment_pos = jnp.asarray(
        np.broadcast_to(np.arange(args.seq), (args.batch, args.seq)), jnp.int32
    )

    results: dict[str, Any] = dict(
        environment=environment(),
        workload=dict(
            batch=args.batch,
            seq=args.seq,
            tokens=args.batch * args.seq,
            width=args.width,
            layers=args.layers,
            block_types=list(config.block_types),
            heads=args.heads,
            mlp=args.mlp,
            vocab=args.vocab,
            window=args.window,
            lru_width=args.lru_width,
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
        print(f"[prefill] {impl}: compiling and warming up ...", flush=True)
        try:
            compiled[impl], results["impls"][impl], logits[impl] = compile_impl(
                impl, config, params, tokens, segment_pos
            )
        except Exception as exc:  # report a failing implementation, keep measuring the rest
            traceback.print_exc()
            results["impls"][impl] = dict(error=f"{type(exc).__name__}: {exc}")
    print(f"[prefill] timing {args.repeats} round(s) over {list(compiled)} ...", flush=True)
    time_round_robin(
        compiled, results["impls"], (params, tokens, segment_pos), args.repeats, int(tokens.size)
    )
    results["environment"]["load_avg_after"] = list(os.getloadavg())

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

    print(format_report(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        print(f"[prefill] wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
