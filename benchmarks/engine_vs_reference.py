"""Generation throughput of our continuous-batching Engine against the official sampler and HF.

Workload (defaults): one random-weight model shared by all three implementations, width 512,
6 layers (recurrent, recurrent, attention) x 2, 4 heads, MLP 1536, vocab 8192, window 256,
lru_width 512, float32, on the default JAX backend (CPU here). 256 requests whose prompt lengths
and then max_new_tokens are drawn uniformly from 16..128 with ``numpy.random.RandomState(0)``
(``rs.randint(16, 129, size=n)`` twice), then the prompt token ids from the same RandomState in
[2, vocab). Nothing stops early: every request generates exactly its max_new_tokens, greedily.
Throughput is *useful* generated tokens per second: the sum of max_new_tokens over the requests
(17,830 tokens for seed 0), whatever extra work an implementation does.

The parts (``--parts``), each measured by a module of benchmarks/engine/ whose docstring says
exactly what it runs and times:

  ours      our Engine with 32 slots, the engine defaults and each ``--engine-configs`` setting
            (prefill_batch:prefill_chunk:decode_steps, default 8:32:32,4:64:32), cold and warm,
            with a per-call breakdown of the warm run                         (engine/ours.py)
  official  recurrentgemma.jax.Sampler (1.0.1), batches of 32, cold and warm (engine/references.py)
  hf        transformers RecurrentGemmaForCausalLM.generate, batches of 32, cold and warm (same)
  ceiling   the workload's matmul FLOPs at the float32 rates XLA reaches here: no implementation
            on this machine can beat it                                    (engine/ceiling.py)
  memory    peak RSS of a short and a long generation, each in a fresh subprocess
                                                                            (engine/memory.py)

Greedy tokens are compared as a correctness guard, and the ratios of useful tokens/s reported
(engine/compare.py); the printed report is engine/report.py's.

Run:
  .venv/bin/python -m benchmarks.engine_vs_reference                 # the default workload
  .venv/bin/python -m benchmarks.engine_vs_reference --small         # smoke run (tiny model)
  .venv/bin/python -m benchmarks.engine_vs_reference --json results.json
  .venv/bin/python -m benchmarks.engine_vs_reference --parts ours,memory --engine-configs 8:128:16
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/...py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness
from benchmarks.engine import ceiling, compare, memory, ours, references
from benchmarks.engine.report import format_report
from benchmarks.engine.workload import make_workload, workload_fields
from testkit.tiny_model import random_params

PARTS: tuple[str, ...] = ("ours", "official", "hf", "ceiling", "memory")

DEFAULTS: dict[str, int] = dict(
    requests=256,
    min_prompt=16,
    max_prompt=128,
    min_new=16,
    max_new=128,
    slots=32,
    ref_batch=32,
    **harness.MODEL_DEFAULTS,
    mem_requests=32,
    mem_slots=32,
    mem_prompt=64,
    mem_short=128,
    mem_long=4096,
)
SMALL: dict[str, int] = dict(
    requests=12,
    min_prompt=4,
    max_prompt=12,
    min_new=4,
    max_new=12,
    slots=4,
    ref_batch=4,
    **harness.MODEL_SMALL,
    mem_requests=4,
    mem_slots=4,
    mem_prompt=8,
    mem_short=16,
    mem_long=64,
)
# prefill_batch:prefill_chunk:decode_steps settings tried besides the engine's own defaults.
DEFAULT_ENGINE_CONFIGS = "8:32:32,4:64:32"
SMALL_ENGINE_CONFIGS = "1:16:4"  # one prefill shape: fewer compiles in the smoke run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    harness.add_workload_args(parser, DEFAULTS, SMALL)
    parser.add_argument(
        "--engine-configs",
        default=None,
        help="comma-separated prefill_batch:prefill_chunk:decode_steps settings tried besides the "
        f"engine defaults (default {DEFAULT_ENGINE_CONFIGS}; --small: {SMALL_ENGINE_CONFIGS})",
    )
    harness.add_subset_arg(parser, "--parts", PARTS)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads for HF (default: usable CPUs; --small: 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and workload")
    harness.add_output_args(parser, "tiny preset for a smoke run")
    args = parser.parse_args(argv)
    harness.resolve_workload_args(args, DEFAULTS, SMALL)
    if args.engine_configs is None:
        args.engine_configs = SMALL_ENGINE_CONFIGS if args.small else DEFAULT_ENGINE_CONFIGS
    try:
        args.engine_configs = [
            tuple(int(v) for v in item.split(":"))
            for item in args.engine_configs.split(",")
            if item.strip()
        ]
    except ValueError:
        parser.error("--engine-configs: expected items like 8:128:16")
    if any(len(c) != 3 or min(c) < 1 for c in args.engine_configs):
        parser.error("--engine-configs: expected positive prefill_batch:prefill_chunk:decode_steps")
    parts = harness.parse_subset(parser, "--parts", args.parts, PARTS)
    args.parts = [p for p in PARTS if p in parts]
    if args.min_prompt < 1 or args.max_prompt < args.min_prompt:
        parser.error("need 1 <= --min-prompt <= --max-prompt")
    if args.min_new < 1 or args.max_new < args.min_new:
        parser.error("need 1 <= --min-new <= --max-new")
    if args.torch_threads is None:
        # The tiny model gains nothing from threads, and 2 OpenMP threads on a busy 2-core
        # machine can make it 100x slower (spinning barriers).
        args.torch_threads = 1 if args.small else harness.usable_cpus()
    return args


def environment() -> dict[str, Any]:
    env = harness.environment()
    try:
        import torch

        env["torch_version"] = torch.__version__
    except ImportError:
        env["torch_version"] = None
    return env


def run_reference(
    label: str, run: Callable[..., tuple[dict[str, Any], list[list[int]]]], *args: Any
) -> tuple[dict[str, Any], list[list[int]] | None]:
    """(row, greedy tokens), or an error row and None: a failing reference is reported and the
    other parts still measured."""
    try:
        return run(*args)
    except Exception as exc:
        return dict(label=label, error=harness.error_text(exc)), None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    log = harness.Log("engine-bench", clock=True)
    config = harness.griffin_config(args)
    params = random_params(config, seed=args.seed)
    prompts, max_new = make_workload(args, config.vocab_size)
    results: dict[str, Any] = dict(
        environment=environment(),
        workload=workload_fields(args, config, params, prompts, max_new),
    )
    log(f"{args.requests} requests, {sum(max_new):,} useful tokens; parts {args.parts}")
    workload = (config, params, prompts, max_new)
    tokens: dict[str, list[list[int]]] = {}
    best: dict[str, Any] | None = None
    engine = None
    if "ours" in args.parts:
        results["ours"], best, best_tokens, engine = ours.run_settings(
            *workload, args.slots, args.engine_configs, log
        )
        if best_tokens is not None:
            tokens["ours"] = best_tokens
    for key, label, run, extra in (
        ("official", "official Sampler", references.run_official, ()),
        ("hf", "HF generate", references.run_hf, (args.torch_threads,)),
    ):
        if key in args.parts:
            log(f"{label}: cold then warm ...")
            results[key], key_tokens = run_reference(label, run, *workload, args.ref_batch, *extra)
            if key_tokens is not None:
                tokens[key] = key_tokens

    if "ceiling" in args.parts:
        log("ceiling: float32 matmul rates ...")
        rows = 256 if not args.small else 16
        results["ceiling"] = ceiling.run_ceiling(
            params, sum(len(p) for p in prompts), sum(max_new), args.slots, rows, args.small
        )
    if best is not None:
        results["best_ours"] = best["label"]
    results["ratios"] = compare.ratios(results, best)
    results["token_checks"] = compare.token_checks(tokens, prompts, args.ref_batch)

    if "memory" in args.parts:
        results["memory"] = memory.run_part(config, params, args, best, engine, log)
    harness.record_load_after(results["environment"])
    results["wall_s"] = log.elapsed()
    return harness.finish(results, format_report(results), args.json, "engine-bench")


if __name__ == "__main__":
    main()
