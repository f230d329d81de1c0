"""Tensor parallelism inside one replica: which axis of each weight and cache array is split.

A one-axis mesh (axis ``"tp"``) of N local devices; every rule is a ``PartitionSpec`` over it and
the jitted engine functions let XLA partition the rest. The split is Megatron style, so one
all-reduce per residual branch is the only communication of a layer:

- column-parallel (output split): recurrent ``linear_x``/``linear_y`` and attention ``proj_q`` (by
  heads), the MLP's gate and up projections (by the expanded width);
- row-parallel (input split, partial sums all-reduced): ``linear_out``, ``proj_final``,
  ``ffw_down``;
- per channel / per head along the lru width: ``conv_1d``, ``rg_lru/a_param`` and the
  block-diagonal RG-LRU gates (one block per head, so whole heads go to each device);
- replicated: the single shared K/V head (``proj_k``, ``proj_v``: every device computes the same
  keys and values, cheaper than moving them), the norms and the row-parallel biases.

The embedding is split along the vocabulary. It is the largest matrix (0.66e9 of 2.68e9 params
in 2B, 1.05e9 of 8.58e9 in 9B) and the output projection reads all of it at every decode step:
replicated, it would cost every device a full copy in memory and in bandwidth. Split by vocab, a
lookup is a masked local gather plus one all-reduce of [b, t, d], and the logits come out split
by vocab; greedy sampling needs only a [b, N] exchange for the argmax (top-k / top-p gather the
row). Split by width instead, every logit would need an all-reduce of [b, v].

Cache: the RG-LRU state and the conv state are split along the lru width like the weights that
produce them. The attention ring buffer has one K/V head of head_dim 256, shared by every query
head, so it is replicated: splitting it by head_dim would split the q.k contraction. It is most
of the cache (24 of 25 MiB per 9B sequence), so extra devices buy weight room, not slots.

Layout. Under tensor parallelism the engine serves the checkpoint layout
(``RecurrentGemma(fused=False)``) with one change, :func:`unstack_gated_up`. The fused
single-device layout (:func:`model.griffin.fuse_params`) concatenates y|x, gate|up and q|k|v
along the axis that would be split, so a contiguous split hands y to one device and x to another
(and cannot keep K/V replicated): XLA then moves activations between devices inside every block
(60 collective-permutes, 8 all-gathers and 4 all-to-alls per decode step on the 5-block test
model at N=4, against none with this layout), so its rules are refused below. The checkpoint
layout stacks the MLP's gate and up kernels as w [2, d, m] and the model multiplies by w[0] and
w[1]; XLA:CPU copies those slices out of the parameter every call (a copy of every MLP up
weight, held across layers: +78 MB per 2B layer at N=2). Holding the two halves as separate
arrays and stacking them inside jit (:func:`stack_gated_up`) lets XLA fold stack-then-slice
away: no copy, one local matmul each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig

TP = "tp"  # the mesh axis name

_REPLICATED = P()
# (parent module, parameter) -> spec, for the checkpoint layout.
_RULES: dict[tuple[str, str], P] = {
    ("embedder", "input_embedding"): P(TP, None),  # [v, d]
    ("linear_x", "kernel"): P(None, TP),  # [d, r]
    ("linear_x", "bias"): P(TP),
    ("linear_y", "kernel"): P(None, TP),
    ("linear_y", "bias"): P(TP),
    ("linear_out", "kernel"): P(TP, None),  # [r, d]
    ("linear_out", "bias"): _REPLICATED,
    ("conv_1d", "w"): P(None, TP),  # [c, r]
    ("conv_1d", "b"): P(TP),
    ("rg_lru", "a_param"): P(TP),  # [r]
    ("input_gate", "w"): P(TP, None, None),  # [n, r/n, r/n]: whole heads
    ("input_gate", "b"): P(TP, None),  # [n, r/n]
    ("a_gate", "w"): P(TP, None, None),
    ("a_gate", "b"): P(TP, None),
    ("proj_q", "kernel"): P(None, TP),  # [d, n*h]: whole heads
    ("proj_k", "kernel"): _REPLICATED,  # [d, h]: the one shared K/V head
    ("proj_v", "kernel"): _REPLICATED,
    ("proj_final", "kernel"): P(TP, None),  # [n*h, d]
    ("proj_final", "bias"): _REPLICATED,
    ("ffw_up", "w"): P(None, None, TP),  # [2, d, m]
    ("ffw_up", "w_gate"): P(None, TP),  # [d, m] (unstack_gated_up)
    ("ffw_up", "w_up"): P(None, TP),
    ("ffw_up", "b"): P(None, None, None, TP),  # [2, 1, 1, m]
    ("ffw_down", "kernel"): P(TP, None),  # [m, d]
    ("ffw_down", "bias"): _REPLICATED,
}
_FUSED = {"linear_yx", "gates", "proj_qkv"}
_CACHE_RULES: dict[str, P] = {
    "rg_lru_state": P(None, TP),  # [b, r]
    "conv1d_state": P(None, None, TP),  # [b, c-1, r]
    "keys": _REPLICATED,  # [b, w, h]
    "values": _REPLICATED,
    "positions": _REPLICATED,  # [b, w]
}


def check_tensor_parallel(config: ModelConfig, n: int) -> None:
    """Raises ValueError unless ``n`` devices can split ``config`` (whole heads per device)."""
    if n < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {n}")
    sizes = {
        "num_heads": config.num_heads,
        "lru_width": config.recurrent_width,
        "mlp_expanded_width": config.mlp_expanded_width,
        "vocab_size": config.vocab_size,
    }
    for name, size in sizes.items():
        if size % n:
            valid = [k for k in range(1, 65) if all(s % k == 0 for s in sizes.values())]
            raise ValueError(
                f"tensor_parallel={n} does not divide {name} ({size}): attention heads, RG-LRU "
                f"gate blocks (one per head), the lru and MLP widths and the vocabulary are "
                f"split evenly across devices; valid tensor_parallel values for this model: "
                f"{', '.join(map(str, valid))}"
            )


def make_mesh(n: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis ``"tp"`` mesh over the first ``n`` of ``devices`` (default: the local ones)."""
    available = list(jax.local_devices() if devices is None else devices)
    if n < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {n}")
    if len(available) < n:
        seen = len(jax.devices())
        hint = (
            "; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX is imported"
            if jax.default_backend() == "cpu"
            else "; give the Ray actor that many accelerators (e.g. num_gpus=N)"
        )
        given = "" if devices is None else f" ({len(available)} given)"
        raise ValueError(
            f"tensor_parallel={n} needs {n} devices, but JAX sees {seen} "
            f"{jax.default_backend()} device(s){given}{hint}"
        )
    return Mesh(np.asarray(available[:n]), (TP,))


def _map_gated_up(params: dict, change: Any) -> dict:
    out = dict(params)
    for name, block in params.items():
        if name.startswith("blocks."):
            mlp = dict(block["mlp_block"])
            mlp["ffw_up"] = change(mlp["ffw_up"])
            out[name] = {**block, "mlp_block": mlp}
    return out


def unstack_gated_up(params: dict) -> dict:
    """The checkpoint tree with each MLP's ``ffw_up/w`` [2, d, m] held as ``w_gate`` and
    ``w_up`` [d, m] (views, for host arrays): the layout the sharded engine stores."""

    def split(up: dict) -> dict:
        return {"w_gate": up["w"][0], "w_up": up["w"][1], "b": up["b"]}

    return _map_gated_up(params, split)


def stack_gated_up(params: dict) -> dict:
    """Inverse of :func:`unstack_gated_up`, for use inside jit (where it costs nothing)."""

    def join(up: dict) -> dict:
        return {"w": jnp.stack([up["w_gate"], up["w_up"]]), "b": up["b"]}

    return _map_gated_up(params, join)


def _names(path: tuple[Any, ...]) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def _param_spec(path: tuple[Any, ...], leaf: Any) -> P:
    names = _names(path)
    if names[-1] == "scale":  # every RMSNorm
        return _REPLICATED
    fused = _FUSED.intersection(names) or (names[-2:] == ["ffw_up", "w"] and np.ndim(leaf) == 2)
    if fused:
        raise ValueError(
            f"{'/'.join(names)} is in the fused serving layout, which cannot be split by heads "
            "(its concatenated projections straddle devices): shard the checkpoint layout"
        )
    spec = _RULES.get((names[-2], names[-1])) if len(names) > 1 else None
    if spec is None:
        raise ValueError(f"no sharding rule for parameter {'/'.join(names)}")
    if len(spec) > np.ndim(leaf):
        raise ValueError(f"{'/'.join(names)} has shape {np.shape(leaf)}, rule {spec}")
    return spec


def param_specs(params: Any) -> Any:
    """PartitionSpecs for a checkpoint-layout parameter tree, gate and up stacked or not
    (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(_param_spec, params)


def cache_specs(cache: Any) -> Any:
    """PartitionSpecs for a cache (:func:`model.griffin.init_cache`), batch dimension unsplit."""

    def spec(path: tuple[Any, ...], leaf: Any) -> P:
        name = _names(path)[-1]
        if name not in _CACHE_RULES:
            raise ValueError(f"no sharding rule for cache entry {'/'.join(_names(path))}")
        return _CACHE_RULES[name]

    return jax.tree_util.tree_map_with_path(spec, cache)


def named_shardings(mesh: Mesh, specs: Any) -> Any:
    """The NamedSharding of every spec in ``specs`` on ``mesh``."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P)
    )


def bytes_per_device(tree: Any, specs: Any, n: int, itemsize: int | None = None) -> int:
    """Bytes one device holds of ``tree`` split by ``specs`` over ``n`` devices (each leaf's
    own itemsize unless ``itemsize`` is given)."""

    def leaf_bytes(leaf: Any, spec: P) -> int:
        size = math.prod(np.shape(leaf)) * (itemsize or np.dtype(leaf.dtype).itemsize)
        return size // n if any(axis == TP for axis in spec) else size

    sizes = jax.tree.map(leaf_bytes, tree, specs)
    return int(sum(jax.tree.leaves(sizes)))
