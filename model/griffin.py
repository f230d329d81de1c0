"""The RecurrentGemma (Griffin) network.

``RecurrentGemma(config).apply({"params": params}, tokens, segment_pos, cache, return_cache)``
returns ``(logits float32 [b, t, v], cache)``. The parameter tree is exactly the official one, so a
Kaggle checkpoint loads without renaming. A returned cache continues the sequences in a later call,
one token at a time or in chunks of any length, past the attention window too.

The cache of one sequence has a fixed size, whatever its length: per recurrent block the RG-LRU
state (float32) and the last ``conv1d_temporal_width - 1`` conv inputs, per attention block a ring
buffer of the last ``attention_window_size`` keys and values with their positions.
:func:`cache_bytes_per_sequence` gives it: 17.3 MB for 2B and 26.3 MB for 9B in bfloat16.

Token ids outside the vocabulary raise :class:`TokenRangeError` (a host check, naming the first
one); under ``jit``, where no host check can run, they turn that sequence's logits into NaN rather
than reading another embedding row.

Differences from the official implementation, on purpose: a cached call with a chunk longer than
one token continues the cache (the official code restarts it), with the window honoured across
chunk boundaries; and a prompt shorter than the conv width, left-padded into a batch, does not
pick up pad inputs in its conv state (the official cache keeps them), so a padded row decodes
exactly as it would alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from model.config import ModelConfig
from model.layers import SCAN_IMPLS, DType, RMSNorm, default_scan_impl
from model.modules import (
    BlockCache,
    ResidualBlock,
    init_attention_cache,
    init_recurrent_cache,
)

Array = jax.Array
Cache = dict[str, BlockCache]


class TokenRangeError(ValueError):
    """A token id outside [0, vocab_size)."""


def check_token_ids(tokens: np.ndarray | Array, vocab_size: int) -> None:
    """Raises TokenRangeError naming the first id outside the vocabulary (host-side check)."""
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    bad = np.argwhere((arr < 0) | (arr >= vocab_size))
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        raise TokenRangeError(
            f"token id {int(arr[where])} at index {where} is outside the vocabulary "
            f"[0, {vocab_size})"
        )


class Embedder(nn.Module):
    """Token embedding, tied with the output projection."""

    vocab_size: int
    width: int
    scale: float
    dtype: DType

    def setup(self) -> None:
        self.input_embedding = self.param(
            "input_embedding",
            nn.initializers.normal(stddev=0.01),
            (self.vocab_size, self.width),
            jnp.float32,
        )

    def encode(self, tokens: Array) -> Array:
        # Out-of-range ids under jit (where no host check can run) give NaN, never another row.
        x = jnp.take(self.input_embedding, tokens, axis=0, mode="fill", fill_value=jnp.nan)
        return x.astype(self.dtype) * jnp.asarray(self.scale, self.dtype)

    def decode(self, x: Array) -> Array:
        table = self.input_embedding.astype(self.dtype)
        if jax.default_backend() == "cpu":
            # XLA:CPU transposes the whole [v, d] table for x @ table.T on every call; the
            # product with the table on the left reads it in place (2-3x faster at decode sizes).
            return jax.lax.dot_general(table, x, (((1,), (2,)), ((), ()))).transpose(1, 2, 0)
        return jnp.einsum("btd,vd->btv", x, table)


class RecurrentGemma(nn.Module):
    """RecurrentGemma / Griffin: residual blocks of RG-LRU recurrence or local attention.

    Attributes:
      config: The model hyper-parameters.
      dtype: Compute dtype (float32 or bfloat16). Parameters are cast to it on use, so they may be
        stored in another dtype. RG-LRU gates and state and the logits are float32 always.
      scan_impl: "linear" or "associative" RG-LRU scan; None picks the faster for the backend.
      fused: Read the serving parameter layout made by :func:`fuse_params` (projections that share
        an input stored side by side, one matmul each) instead of the checkpoint layout.
    """

    config: ModelConfig
    dtype: DType = jnp.float32
    scan_impl: str | None = None
    fused: bool = False

    def setup(self) -> None:
        cfg = self.config
        scan_impl = self.scan_impl or default_scan_impl()
        if scan_impl not in SCAN_IMPLS:
            raise ValueError(f"scan_impl must be one of {SCAN_IMPLS}, got {scan_impl!r}")
        self.embedder = Embedder(cfg.vocab_size, cfg.width, cfg.embedding_scale, self.dtype)
        self.blocks = [
            ResidualBlock(
                block_type=kind,
                width=cfg.width,
                mlp_expanded_width=cfg.mlp_expanded_width,
                num_heads=cfg.num_heads,
                lru_width=cfg.recurrent_width,
                attention_window_size=cfg.attention_window_size,
                conv1d_temporal_width=cfg.conv1d_temporal_width,
                scan_impl=scan_impl,
                dtype=self.dtype,
                fused=self.fused,
                name=f"blocks.{i}",
            )
            for i, kind in enumerate(cfg.block_types)
        ]
        self.final_norm = RMSNorm(cfg.width, dtype=self.dtype)

    def __call__(
        self,
        tokens: Array,
        segment_pos: Array,
        cache: Cache | None = None,
        return_cache: bool = True,
        last_logits_only: bool = False,
    ) -> tuple[Array, Cache | None]:
        """tokens, segment_pos int [b, t] -> (logits float32 [b, t, v], cache or None).

        With ``last_logits_only`` the logits are [b, 1, v], for the last position only: what a
        prefill needs, without the [b, t, v] projection.
        """
        if not isinstance(tokens, jax.core.Tracer):
            check_token_ids(tokens, self.config.vocab_size)
        if tokens.shape != segment_pos.shape or tokens.ndim != 2:
            raise ValueError(
                f"tokens {tokens.shape} and segment_pos {segment_pos.shape} must both be [b, t]"
            )
        segment_pos = jnp.asarray(segment_pos, jnp.int32)
        x = self.embedder.encode(jnp.asarray(tokens))
        new_cache: Cache = {}
        for i, block in enumerate(self.blocks):
            name = f"blocks.{i}"
            x, new_cache[name] = block(x, segment_pos, None if cache is None else cache[name])
        if last_logits_only:
            x = x[:, -1:]
        logits = self.embedder.decode(self.final_norm(x)).astype(jnp.float32)
        cap = self.config.logits_soft_cap
        if cap:
            logits = jnp.tanh(logits / cap) * cap
        return logits, (new_cache if return_cache else None)


def fuse_params(params: dict) -> dict:
    """The checkpoint parameter tree in the serving layout that ``RecurrentGemma(fused=True)``
    reads: projections of one input concatenated along their outputs (recurrent y|x, both RG-LRU
    gates, attention q|k|v, the MLP's gate|up), so a decode step runs one matmul where the
    checkpoint layout needs two or three. Same values, same results; costs one copy of those
    weights, made once.
    """

    def cat(*arrays: Array, axis: int = -1) -> Array:
        return jnp.concatenate(arrays, axis=axis)

    fused = dict(params)
    for name, block in params.items():
        if not name.startswith("blocks."):
            continue
        block = dict(block)
        if "recurrent_block" in block:
            rec = dict(block["recurrent_block"])
            y, x = rec.pop("linear_y"), rec.pop("linear_x")
            rec["linear_yx"] = {
                "kernel": cat(y["kernel"], x["kernel"]),
                "bias": cat(y["bias"], x["bias"]),
            }
            lru = dict(rec["rg_lru"])
            gx, ga = lru.pop("input_gate"), lru.pop("a_gate")
            lru["gates"] = {"w": cat(gx["w"], ga["w"]), "b": cat(gx["b"], ga["b"])}
            rec["rg_lru"] = lru
            block["recurrent_block"] = rec
        else:
            att = dict(block["attention_block"])
            q, k, v = att.pop("proj_q"), att.pop("proj_k"), att.pop("proj_v")
            att["proj_qkv"] = {"kernel": cat(q["kernel"], k["kernel"], v["kernel"])}
            block["attention_block"] = att
        mlp = dict(block["mlp_block"])
        up = mlp["ffw_up"]
        mlp["ffw_up"] = {
            "w": cat(up["w"][0], up["w"][1]),
            "b": cat(up["b"][0, 0, 0], up["b"][1, 0, 0]),
        }
        block["mlp_block"] = mlp
        fused[name] = block
    return fused


def init_cache(config: ModelConfig, batch_size: int, dtype: DType = jnp.float32) -> Cache:
    """An empty cache: what a call with ``cache=None`` starts from."""
    cache: Cache = {}
    for i, kind in enumerate(config.block_types):
        if kind == "recurrent":
            cache[f"blocks.{i}"] = init_recurrent_cache(
                batch_size, config.recurrent_width, config.conv1d_temporal_width, dtype
            )
        else:
            cache[f"blocks.{i}"] = init_attention_cache(
                batch_size, config.attention_window_size, config.head_dim, dtype
            )
    return cache


def cache_bytes_per_sequence(config: ModelConfig, dtype: DType = jnp.bfloat16) -> int:
    """Bytes of cache one sequence holds, whatever its length."""
    shapes = jax.eval_shape(lambda: init_cache(config, 1, dtype))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def param_shapes(config: ModelConfig) -> dict:
    """The parameter tree of ``config`` as ShapeDtypeStructs, allocating nothing."""
    model = RecurrentGemma(config)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, t, None, False), tokens)
    return variables["params"]


def count_params(params: dict) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
