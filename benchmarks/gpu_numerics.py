"""bfloat16 logits against float32 on a short batch: how far the bfloat16 math drifts.

Model: the 2B preset's shapes (``--preset``; a toy under --cpu-small) with random weights
N(0, 0.02) made in float32 on the device; the bfloat16 run uses the same weights cast to
bfloat16, as the Engine casts them. ``model.griffin.RecurrentGemma(config, dtype)``: the RG-LRU
state and the logits are float32 in both, the cache is in the compute dtype (as in the Engine).
The float32 run traces under ``jax.default_matmul_precision("highest")``: JAX's default float32
matmul on a recent NVIDIA GPU is TF32 (10-bit mantissa), no reference for bfloat16. The bfloat16
run uses the default precision, as the Engine does.

Tokens go through a jitted one-token step with the cache (one executable per dtype: compiles, not
the arithmetic, are what this costs on a GPU), prompt tokens one by one, then ``--steps`` greedy
steps. Three runs in lockstep on ``--prompts`` random prompts:

  float32       greedy: the reference tokens and logits;
  bf16 forced   fed exactly float32's inputs (prompt, then float32's greedy tokens): its logits
                are compared with float32's at every position (max / mean |diff|), and its argmax
                with float32's greedy token at each generated position (teacher-forced agreement);
  bf16 free     greedy on its own tokens: the fraction of tokens equal to float32's, rows
                identical, and where each row first differs.

Random weights give flat logits (std ~1 over 256k ids, top-1 / top-2 margins of a few tenths), so
a small logit error can flip a near tie; the float32 logits' std and top-1 / top-2 margin are
reported beside the agreement to read it by.

  python -m benchmarks.gpu_numerics                  # on a GPU: 2B shapes, 4 prompts x 32 + 32
  python -m benchmarks.gpu_numerics --cpu-small      # anywhere: toy model, for CI (or --small)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/gpu_numerics.py): import from the repo
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import gpu_engine, harness
from model import ModelConfig
from model.griffin import RecurrentGemma, init_cache

TAG = "gpu-numerics"
FULL: dict[str, int] = dict(prompts=4, prompt_len=32, steps=32)
SMALL: dict[str, int] = dict(prompts=2, prompt_len=8, steps=8)


def step_fn(config: ModelConfig, dtype: Any) -> Any:
    """jit(params, token [b], position [b], cache) -> (logits float32 [b, v], cache)."""
    model = RecurrentGemma(config, dtype=dtype)

    def step(params: Any, token: jax.Array, position: jax.Array, cache: Any) -> Any:
        logits, cache = model.apply({"params": params}, token[:, None], position[:, None], cache)
        return logits[:, 0], cache

    return jax.jit(step, donate_argnums=(3,))


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Per row: the largest logit minus the second largest."""
    top2 = np.partition(logits, -2, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def compare_runs(
    config: ModelConfig, params32: Any, prompts: np.ndarray, steps: int, log: harness.Log
) -> dict[str, Any]:
    b, p = prompts.shape
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    step32, step16 = step_fn(config, jnp.float32), step_fn(config, jnp.bfloat16)
    cache32 = init_cache(config, b, jnp.float32)
    forced = init_cache(config, b, jnp.bfloat16)
    free = init_cache(config, b, jnp.bfloat16)
    gen32 = np.zeros((b, steps), np.int32)
    gen_forced = np.zeros((b, steps), np.int32)
    gen_free = np.zeros((b, steps), np.int32)
    max_diff, mean_diff = [], []  # per position, over the batch and the vocabulary
    margins, stds = [], []  # float32's, at the generated positions
    for t in range(p + steps - 1):
        if t == 1:
            log("both executables compiled; stepping ...")
        k = t - p  # index of the generated token fed at t (when t >= p)
        position = jnp.full((b,), t, jnp.int32)
        inp32 = prompts[:, t] if t < p else gen32[:, k]
        inp_free = prompts[:, t] if t < p else gen_free[:, k]
        with jax.default_matmul_precision("highest"):  # true float32, not TF32, on a GPU
            logits32, cache32 = step32(params32, jnp.asarray(inp32), position, cache32)
        logits_forced, forced = step16(params16, jnp.asarray(inp32), position, forced)
        logits_free, free = step16(params16, jnp.asarray(inp_free), position, free)
        l32, lf, lr = (np.asarray(x, np.float32) for x in (logits32, logits_forced, logits_free))
        diff = np.abs(lf - l32)
        max_diff.append(float(diff.max()))
        mean_diff.append(float(diff.mean()))
        if t >= p - 1:  # these logits choose generated token t - p + 1
            g = t - p + 1
            gen32[:, g] = l32.argmax(-1)
            gen_forced[:, g] = lf.argmax(-1)
            gen_free[:, g] = lr.argmax(-1)
            margins.append(top2_margin(l32))
            stds.append(l32.std(-1))
    gen_max, gen_mean = max_diff[p - 1 :], mean_diff[p - 1 :]
    margin = np.stack(margins, 1)  # [b, steps]
    ambiguous = margin < np.asarray(gen_max)[None, :]
    same_free = gen_free == gen32
    first = [int(np.argmin(row)) if not row.all() else steps for row in same_free]
    agreement_forced = float((gen_forced == gen32).mean())
    return dict(
        max_abs_diff=max(max_diff),
        mean_abs_diff=float(np.mean(mean_diff)),
        greedy_agreement_teacher_forced=agreement_forced,
        greedy_agreement_free_running=float(same_free.mean()),
        teacher_forced=dict(
            positions=len(max_diff),
            prompt_positions=dict(
                max_abs_diff=max(max_diff[: p - 1], default=None),
                mean_abs_diff=float(np.mean(mean_diff[: p - 1])) if p > 1 else None,
            ),
            generated_positions=dict(
                max_abs_diff=max(gen_max),
                mean_abs_diff=float(np.mean(gen_mean)),
                argmax_agreement=agreement_forced,
                max_abs_diff_by_step=gen_max,
                mean_abs_diff_by_step=gen_mean,
            ),
            reference_logit_std=float(np.mean(stds)),
            reference_top1_top2_margin_mean=float(margin.mean()),
            reference_top1_top2_margin_min=float(margin.min()),
            ambiguous_fraction=float(ambiguous.mean()),
            ambiguous_means="float32's top-1/top-2 margin below that step's max |diff|",
        ),
        free_running=dict(
            steps=steps,
            token_agreement=float(same_free.mean()),
            rows_identical=int(same_free.all(1).sum()),
            rows=b,
            first_divergence=first,
            mean_first_divergence=float(np.mean(first)),
        ),
        tokens=dict(float32=gen32.tolist(), bf16_free=gen_free.tolist()),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument("--preset", default="2b", choices=ModelConfig.presets())
    for name, value in FULL.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"default {value} (--cpu-small: {SMALL[name]})",
        )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts")
    harness.add_output_args(parser, "toy model and sizes, to run on CPU", "--cpu-small", "--small")
    args = parser.parse_args(argv)
    for name, value in (SMALL if args.cpu_small else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.prompt_len < 1 or args.steps < 1 or args.prompts < 1:
        parser.error("--prompts, --prompt-len and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    log = harness.Log(TAG, clock=True)
    config = gpu_engine.bench_config(args.preset, args.cpu_small)
    log(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    params = gpu_engine.random_device_params(config, jnp.float32, args.seed)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(2, config.vocab_size, (args.prompts, args.prompt_len), dtype=np.int32)
    log(f"{args.prompts} prompts x {args.prompt_len} tokens, then {args.steps} greedy steps")
    figures = compare_runs(config, params, prompts, args.steps, log)
    results = dict(
        part="numerics",
        preset=args.preset,
        small=args.cpu_small,
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        config=config.to_dict(),
        prompts=args.prompts,
        prompt_len=args.prompt_len,
        steps=args.steps,
        seed=args.seed,
        weights="N(0, 0.02) float32 on the device; bf16 = the same cast",
        float32_matmul_precision="highest",
        **figures,
        wall_s=time.perf_counter() - start,
        complete=True,
    )
    log(
        f"max |diff| {results['max_abs_diff']:.4f}, mean |diff| {results['mean_abs_diff']:.5f}; "
        f"greedy agreement teacher-forced {results['greedy_agreement_teacher_forced']:.3f}, "
        f"free-running {results['greedy_agreement_free_running']:.3f} "
        f"(float32 logit std {results['teacher_forced']['reference_logit_std']:.3f}, "
        f"top-1/top-2 margin {results['teacher_forced']['reference_top1_top2_margin_mean']:.3f})"
    )
    return harness.finish(results, None, args.json, TAG)


if __name__ == "__main__":
    main()
