"""Engine throughput at full size on one accelerator, against the roofline.

Workload: the 2B preset with random bfloat16 weights, 64 / 128 / 256 slots, 512-token prompts,
256 new tokens each (no early stop), as many requests as slots (one full wave, so every slot
decodes for the whole run). Reports generated tokens/s for the decode phase and for the whole run,
and the fraction of the roofline:

  roofline step time = max(bytes moved per decode step / measured HBM bandwidth,
                           FLOPs per decode step / measured bf16 matmul rate)

where bytes = all weights (the tied embedding included, read by the output projection) + each
slot's cache (read) and FLOPs = 2 x params x slots + attention over the window. Bandwidth and
matmul rate are measured here, on the same device, before the engine runs.

Needs only jax, flax and numpy (and this repo's `model` package).

  python -m benchmarks.gpu_engine                  # on a GPU: the full workload (< 8 minutes)
  python -m benchmarks.gpu_engine --cpu-small      # anywhere: a reduced size, for CI (or --small)
"""

from __future__ import annotations

import argparse
import sys
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


def random_device_params(config: ModelConfig, dtype: Any, seed: int = 0) -> Any:
    """Random weights made on the device (no multi-GB host arrays)."""
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


def run_slots(
    config: ModelConfig,
    params: Any,
    slots: int,
    prompt_len: int,
    new_tokens: int,
    args: argparse.Namespace,
    repeats: int = 2,
) -> dict[str, Any]:
    rng = np.random.default_rng(slots)
    requests = [
        GenerationRequest(
            rng.integers(2, config.vocab_size, prompt_len).tolist(),
            max_new_tokens=new_tokens,
            stop_ids=(),
        )
        for _ in range(slots)
    ]
    engine = Engine(
        config,
        params,
        max_slots=slots,
        prefill_batch=min(slots, args.prefill_batch),
        prefill_chunk=args.prefill_chunk,
        decode_steps=args.decode_steps,
        dtype=jnp.dtype(args.dtype),
    )
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__)
    parser.add_argument("--slots", default="64,128,256")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prefill-batch", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    harness.add_output_args(parser, "reduced size that runs on CPU", "--cpu-small", "--small")
    args = parser.parse_args(argv)

    if args.cpu_small:
        config = ModelConfig.from_preset("2b").replace(
            vocab_size=512,
            width=128,
            mlp_expanded_width=384,
            num_heads=2,
            lru_width=128,
            block_types=("recurrent", "recurrent", "attention"),
            attention_window_size=64,
        )
        args.slots, args.prompt_len, args.new_tokens = "4,8", 32, 64
        args.prefill_batch, args.prefill_chunk, args.decode_steps = 4, 32, 4
        bw_bytes, mm_n = 64 << 20, 512
    else:
        config = ModelConfig.from_preset("2b")
        bw_bytes, mm_n = 4 << 30, 8192
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")

    bandwidth = measure_bandwidth(bw_bytes)
    matmul = measure_matmul(mm_n, dtype)
    print(
        f"measured bandwidth {bandwidth / 1e9:.1f} GB/s, {args.dtype} matmul {matmul / 1e12:.2f} TFLOP/s"
    )

    params = random_device_params(config, dtype)
    rows = []
    for slots in (int(s) for s in args.slots.split(",")):
        row = run_slots(config, params, slots, args.prompt_len, args.new_tokens, args)
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
            f"slots {slots:4d}: {row['tokens_per_s_decode']:10.1f} tok/s decode, "
            f"{row['tokens_per_s_total']:10.1f} tok/s total, step {row['decode_step_s'] * 1e3:.2f} ms "
            f"(roofline {roof_s * 1e3:.2f} ms, {100 * row['roofline_fraction']:.1f}%), "
            f"compile {row['compile_s']:.1f} s"
        )
    result = {
        "device": device.device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "config": config.to_dict(),
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "bandwidth_bytes_per_s": bandwidth,
        "matmul_flops_per_s": matmul,
        "cache_bytes_per_slot": cache_bytes_per_sequence(config, dtype),
        "rows": rows,
    }
    return harness.finish(result, None, args.json, "gpu-engine")


if __name__ == "__main__":
    main()
