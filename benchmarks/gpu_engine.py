"""Engine throughput at full size on one accelerator, against the roofline.

Workload: a preset (2B by default, ``--preset 9b``) with random bfloat16 weights, 64 / 128 / 256
slots, 512-token prompts, 256 new tokens each (no early stop), as many requests as slots (one
full wave, so every slot decodes for the whole run). Reports generated tokens/s for the decode
phase and for the whole run, and the fraction of the roofline:

  roofline step time = max(bytes moved per decode step / measured HBM bandwidth,
                           FLOPs per decode step / measured bf16 matmul rate)

where bytes = all weights (the tied embedding included, read by the output projection) + each
slot's cache (read) and FLOPs = 2 x params x slots + attention over the window. Bandwidth and
matmul rate are measured here, on the same device, before the engine runs. Target (reported, not
enforced): >= 40% of the roofline at 128 slots.

Time on an H200 (2B, the defaults): per slot count a prefill [32, 512], an insert and a decode
executable (the prefill loads from JAX's persistent compilation cache after the first where
JAX_COMPILATION_CACHE_DIR is set, as benchmarks/gpu_all.sh does); compiles dominate (tens of
seconds each), the timed runs take seconds: prefill is 2 x slots x 512 x 5.4 GFLOP, decode 256
steps of ~2-5 ms. Each slot count is timed twice (``--repeats``; the best counts). A slot count
that fails (out of memory, say) is an error row and the others still run; the JSON is rewritten
after every slot count, so a run killed by a timeout keeps what it measured.

Needs only jax, flax and numpy (and this repo's `model` package).

  python -m benchmarks.gpu_engine                        # on a GPU: 2B, the full workload
  python -m benchmarks.gpu_engine --preset 9b --slots 64
  python -m benchmarks.gpu_engine --cpu-small            # anywhere: a toy size, for CI (or --small)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/gpu_engine.py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from model import ModelConfig, cache_bytes_per_sequence, count_params, param_shapes
from model.engine import Engine, GenerationRequest

# Workload and engine settings: full size and --cpu-small (any option given overrides either).
FULL: dict[str, Any] = dict(
    slots="64,128,256",
    prompt_len=512,
    new_tokens=256,
    prefill_batch=32,
    prefill_chunk=512,
    decode_steps=16,
    repeats=2,
)
SMALL: dict[str, Any] = dict(
    slots="4,8",
    prompt_len=32,
    new_tokens=64,
    prefill_batch=4,
    prefill_chunk=32,
    decode_steps=4,
    repeats=2,
)
TARGET_SLOTS, TARGET_ROOFLINE_FRACTION = 128, 0.40


def small_config() -> ModelConfig:
    """The toy model every GPU benchmark runs under --cpu-small (whatever the preset)."""
    return ModelConfig.from_preset("2b").replace(
        vocab_size=512,
        width=128,
        mlp_expanded_width=384,
        num_heads=2,
        lru_width=128,
        block_types=("recurrent", "recurrent", "attention"),
        attention_window_size=64,
    )


def bench_config(preset: str, small: bool) -> ModelConfig:
    return small_config() if small else ModelConfig.from_preset(preset)


def random_device_params(config: ModelConfig, dtype: Any, seed: int = 0) -> Any:
    """Random weights made on the device (no multi-GB host arrays): N(0, 0.02) everywhere."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes)

    @jax.jit
    def make(key: jax.Array) -> list[jax.Array]:
        keys = jax.random.split(key, len(leaves))
        return [
            (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)
            for k, s in zip(keys, leaves, strict=True)
        ]

    return jax.tree.unflatten(treedef, make(jax.random.key(seed)))


def make_prompts(config: ModelConfig, n: int, prompt_len: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``prompt_len`` ids drawn uniformly from [2, vocab)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(2, config.vocab_size, prompt_len).tolist() for _ in range(n)]


def measure_bandwidth(n_bytes: int, repeats: int = 5) -> float:
    """Bytes/s of a device copy (read + write counted)."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    return 2 * x.nbytes / min(harness.repeat_timings(f, x, repeats=repeats))


def measure_matmul(n: int, dtype: Any, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul in dtype."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / min(harness.repeat_timings(f, a, a, repeats=repeats))


def decode_step_cost(config: ModelConfig, slots: int, dtype: Any) -> tuple[float, float]:
    """(bytes, FLOPs) of one decode step over ``slots`` sequences."""
    itemsize = jnp.dtype(dtype).itemsize
    n_params = count_params(param_shapes(config))
    bytes_moved = n_params * itemsize + slots * cache_bytes_per_sequence(config, dtype)
    n_attn = config.block_types.count("attention")
    attn_flops = 4 * config.attention_window_size * config.width * n_attn  # QK^T and PV
    flops = slots * (2 * n_params + attn_flops)
    return float(bytes_moved), float(flops)


def engine_options(args: argparse.Namespace, slots: int) -> dict[str, Any]:
    """The Engine settings of a run with ``slots`` slots (shared with gpu_reference's "ours")."""
    return dict(
        max_slots=slots,
        prefill_batch=min(slots, args.prefill_batch),
        prefill_chunk=args.prefill_chunk,
        decode_steps=args.decode_steps,
        dtype=jnp.dtype(args.dtype),
    )


def run_slots(
    config: ModelConfig,
    params: Any,
    slots: int,
    prompt_len: int,
    new_tokens: int,
    args: argparse.Namespace,
    repeats: int = 2,
) -> dict[str, Any]:
    requests = [
        GenerationRequest(prompt, max_new_tokens=new_tokens, stop_ids=())
        for prompt in make_prompts(config, slots, prompt_len, seed=slots)
    ]
    engine = Engine(config, params, **engine_options(args, slots))
    _, compile_s = harness.time_call(engine.warmup)
    # Prefill alone (all prompts), then the whole run; decode time is the difference. The best
    # of `repeats` runs of each: a difference of two noisy times is noisier than either.
    prompts = [r.prompt_ids for r in requests]
    prefill_s = min(harness.time_call(engine.next_token_logits, prompts)[1] for _ in range(repeats))
    total_s = float("inf")
    for _ in range(repeats):
        results, seconds = harness.time_call(engine.generate, requests)
        total_s = min(total_s, seconds)
    generated = sum(r.output_tokens for r in results)
    assert generated == slots * new_tokens, (generated, slots * new_tokens)
    decode_s = max(total_s - prefill_s, 1e-9)
    return {
        "slots": slots,
        "compile_s": compile_s,
        "prefill_s": prefill_s,
        "total_s": total_s,
        "generated_tokens": generated,
        "tokens_per_s_total": generated / total_s,
        "tokens_per_s_decode": generated / decode_s,
        "decode_step_s": decode_s / new_tokens,
    }


def target(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The roofline target at TARGET_SLOTS: reported, never asserted."""
    row = next((r for r in rows if r["slots"] == TARGET_SLOTS and "error" not in r), None)
    fraction = None if row is None else row["roofline_fraction"]
    return dict(
        slots=TARGET_SLOTS,
        min_roofline_fraction=TARGET_ROOFLINE_FRACTION,
        roofline_fraction=fraction,
        met=None if fraction is None else fraction >= TARGET_ROOFLINE_FRACTION,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument("--preset", default="2b", choices=ModelConfig.presets())
    for name, value in FULL.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(value),
            default=None,
            help=f"default {value} (--cpu-small: {SMALL[name]})",
        )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    harness.add_output_args(parser, "toy model and sizes, to run on CPU", "--cpu-small", "--small")
    args = parser.parse_args(argv)
    for name, value in (SMALL if args.cpu_small else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.slots = [int(s) for s in str(args.slots).split(",")]
    except ValueError:
        parser.error(f"--slots: expected comma-separated integers, got {args.slots!r}")
    if min(args.slots) < 1:
        parser.error("--slots: every slot count must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    config = bench_config(args.preset, args.cpu_small)
    bw_bytes, mm_n = (64 << 20, 512) if args.cpu_small else (4 << 30, 8192)
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    tag = f"gpu-engine {args.preset}"
    print(f"[{tag}] device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")

    bandwidth = measure_bandwidth(bw_bytes)
    matmul = measure_matmul(mm_n, dtype)
    print(
        f"[{tag}] measured bandwidth {bandwidth / 1e9:.1f} GB/s, "
        f"{args.dtype} matmul {matmul / 1e12:.2f} TFLOP/s",
        flush=True,
    )

    params = random_device_params(config, dtype, args.seed)
    rows: list[dict[str, Any]] = []
    result = {
        "part": "engine",
        "preset": args.preset,
        "small": args.cpu_small,
        "device": device.device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "config": config.to_dict(),
        "params": count_params(param_shapes(config)),
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "engine": {k: getattr(args, k) for k in ("prefill_batch", "prefill_chunk", "decode_steps")},
        "repeats": args.repeats,
        "bandwidth_bytes_per_s": bandwidth,
        "matmul_flops_per_s": matmul,
        "cache_bytes_per_slot": cache_bytes_per_sequence(config, dtype),
        "rows": rows,
        "complete": False,
    }
    for slots in args.slots:
        print(f"[{tag}] slots {slots}: compile, prefill and generate ...", flush=True)
        try:
            row = run_slots(
                config, params, slots, args.prompt_len, args.new_tokens, args, args.repeats
            )
        except Exception as exc:  # reported in the row; the other slot counts still run
            rows.append({"slots": slots, "error": harness.error_text(exc)})
            harness.finish(result, None, args.json, tag)
            continue
        step_bytes, step_flops = decode_step_cost(config, slots, dtype)
        roof_s = max(step_bytes / bandwidth, step_flops / matmul)
        row.update(
            step_bytes=step_bytes,
            step_flops=step_flops,
            roofline_step_s=roof_s,
            roofline_fraction=roof_s / row["decode_step_s"],
        )
        rows.append(row)
        print(
            f"[{tag}] slots {slots:4d}: {row['tokens_per_s_decode']:10.1f} tok/s decode, "
            f"{row['tokens_per_s_total']:10.1f} tok/s total, step {row['decode_step_s'] * 1e3:.2f} ms "
            f"(roofline {roof_s * 1e3:.2f} ms, {100 * row['roofline_fraction']:.1f}%), "
            f"compile {row['compile_s']:.1f} s",
            flush=True,
        )
        result["target"] = target(rows)
        result["wall_s"] = time.perf_counter() - start
        harness.finish(result, None, args.json, tag)  # what is measured so far survives a kill
    result.update(target=target(rows), wall_s=time.perf_counter() - start, complete=True)
    if all("error" in row for row in rows):
        result["error"] = "every slot count failed"
    return harness.finish(result, None, args.json, tag)


if __name__ == "__main__":
    main()
