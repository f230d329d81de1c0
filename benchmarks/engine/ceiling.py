"""The ceiling: the fastest the workload could run on this machine, from its matmuls alone.

The matmul FLOPs of the workload (every prompt token through the network, every generated token
through the network and the logits product) at the float32 rates XLA reaches on this machine
with the model's own weights, ``slots``-row products for decode and 256-row products for prefill
(16 under --small); everything else counted free. No implementation on this machine can beat it.
"""

from __future__ import annotations

import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from model.griffin import fuse_params


def _matmul_gflops(weights: list[np.ndarray], rows: int, repeats: int) -> float:
    """float32 GFLOP/s of x @ w over every weight in turn (as a decode step or a prefill call
    runs them, all distinct, so they stream from memory), x with ``rows`` rows; median run."""
    device_weights = [jnp.asarray(w) for w in weights]

    def products(ws: list[jax.Array], x: jax.Array) -> jax.Array:
        total = jnp.float32(0)
        for w in ws:
            if w.ndim == 2:
                total += jnp.sum(x[:, : w.shape[0]] @ w)
            else:  # block diagonal [n, i, o]
                xb = x[:, : w.shape[0] * w.shape[1]].reshape(rows, w.shape[0], w.shape[1])
                total += jnp.sum(jnp.einsum("bni,nio->bno", xb, w))
        return total

    fn = jax.jit(products)
    width = max(w.shape[0] * w.shape[1] if w.ndim == 3 else w.shape[0] for w in weights)
    x = jnp.ones((rows, width), jnp.float32)
    times = harness.repeat_timings(fn, device_weights, x, repeats=repeats)
    flops = 2 * rows * sum(w.size for w in weights)
    return flops / statistics.median(times) / 1e9


def run_ceiling(
    params: Any, prompt_tokens: int, useful_tokens: int, slots: int, prefill_rows: int, small: bool
) -> dict[str, Any]:
    """The fastest this workload could run here: its matmul FLOPs at the float32 rates XLA
    reaches on this machine with the model's own (serving-layout) weights; decode products have
    ``slots`` rows, prefill products ``prefill_rows``. Everything else (attention scores,
    norms, the scan, sampling, padding, host work) is taken as free, so no engine can beat it."""
    serving = fuse_params(params)
    table = np.asarray(serving["embedder"]["input_embedding"])
    body = [
        np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(serving)
        if np.ndim(leaf) >= 2 and "embedder" not in jax.tree_util.keystr(path)
    ]
    repeats = 3 if small else 15
    decode_rate = _matmul_gflops([*body, table.T.copy()], slots, repeats)
    prefill_rate = _matmul_gflops(body, prefill_rows, repeats)
    body_flops = 2 * sum(w.size for w in body)
    table_flops = 2 * table.size
    # Every prompt token runs the body; every generated token the body and the logits product.
    decode_s = useful_tokens * (body_flops + table_flops) / (decode_rate * 1e9)
    prefill_s = prompt_tokens * body_flops / (prefill_rate * 1e9)
    return dict(
        decode_rows=slots,
        prefill_rows=prefill_rows,
        decode_gflops=decode_rate,
        prefill_gflops=prefill_rate,
        flops_per_prompt_token=body_flops,
        flops_per_generated_token=body_flops + table_flops,
        min_decode_s=decode_s,
        min_prefill_s=prefill_s,
        ceiling_tokens_per_s=useful_tokens / (decode_s + prefill_s),
    )
