"""Residual blocks of the Griffin network and their fixed-size caches.

See :mod:`model.layers` for the shape legend and the meaning of ``segment_pos``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from model.layers import RGLRU, Conv1D, DType, GatedUp, RMSNorm, apply_rope

Array = jax.Array
_MASKED = -2.3819763e38


class RecurrentCache(NamedTuple):
    """State of a recurrent block: RG-LRU state [b, r] float32, last c-1 conv inputs [b, c-1, r]."""

    rg_lru_state: Array
    conv1d_state: Array


class AttentionCache(NamedTuple):
    """Ring buffer of the last w keys and values (slot = position % w) and their positions.

    keys, values [b, w, h]; positions [b, w] int32, -1 where a slot is empty.
    """

    keys: Array
    values: Array
    positions: Array


BlockCache = RecurrentCache | AttentionCache


def init_recurrent_cache(
    batch: int, lru_width: int, conv_width: int, dtype: DType
) -> RecurrentCache:
    return RecurrentCache(
        rg_lru_state=jnp.zeros((batch, lru_width), jnp.float32),
        conv1d_state=jnp.zeros((batch, conv_width - 1, lru_width), dtype),
    )


def init_attention_cache(batch: int, window: int, head_dim: int, dtype: DType) -> AttentionCache:
    return AttentionCache(
        keys=jnp.zeros((batch, window, head_dim), dtype),
        values=jnp.zeros((batch, window, head_dim), dtype),
        positions=jnp.full((batch, window), -1, jnp.int32),
    )


def _dense(features: int, name: str, dtype: DType, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


class RecurrentBlock(nn.Module):
    """gelu(W_y x) * RG-LRU(Conv1D(W_x x)), projected back to d."""

    width: int
    lru_width: int
    num_heads: int
    conv1d_temporal_width: int
    scan_impl: str
    dtype: DType
    fused: bool = False

    @nn.compact
    def __call__(
        self, x: Array, segment_pos: Array, cache: RecurrentCache
    ) -> tuple[Array, RecurrentCache]:
        if self.fused:
            y, x = jnp.split(_dense(2 * self.lru_width, "linear_yx", self.dtype)(x), 2, axis=-1)
            y = nn.gelu(y)
        else:
            y = nn.gelu(_dense(self.lru_width, "linear_y", self.dtype)(x))
            x = _dense(self.lru_width, "linear_x", self.dtype)(x)
        conv = Conv1D(self.lru_width, self.conv1d_temporal_width, self.dtype, name="conv_1d")
        x, conv_state = conv(x, segment_pos, cache.conv1d_state)
        rg_lru = RGLRU(self.lru_width, self.num_heads, self.scan_impl, self.fused, name="rg_lru")
        x, lru_state = rg_lru(x, segment_pos, cache.rg_lru_state)
        out = _dense(self.width, "linear_out", self.dtype)(x * y)
        return out, RecurrentCache(rg_lru_state=lru_state, conv1d_state=conv_state)


class LocalAttentionBlock(nn.Module):
    """Multi-query local attention: n query heads, one key/value head, window w (w+1 keys)."""

    width: int
    num_heads: int
    window_size: int
    dtype: DType
    fused: bool = False

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @nn.compact
    def __call__(
        self, x: Array, segment_pos: Array, cache: AttentionCache | None
    ) -> tuple[Array, AttentionCache]:
        b, t, _ = x.shape
        if self.fused:
            qkv = _dense(self.width + 2 * self.head_dim, "proj_qkv", self.dtype, False)(x)
            queries, keys, values = jnp.split(qkv, [self.width, self.width + self.head_dim], -1)
        else:
            queries = _dense(self.width, "proj_q", self.dtype, use_bias=False)(x)
            keys = _dense(self.head_dim, "proj_k", self.dtype, use_bias=False)(x)
            values = _dense(self.head_dim, "proj_v", self.dtype, use_bias=False)(x)
        queries = apply_rope(queries.reshape(b, t, self.num_heads, self.head_dim), segment_pos)
        keys = apply_rope(keys, segment_pos)

        segment_ids = jnp.cumsum(segment_pos == 0, axis=1)  # 0 before the first reset in the chunk
        scale = self.head_dim**-0.5
        logits = self._logits(queries, keys, self._chunk_mask(segment_pos, segment_ids), scale)
        if cache is None:
            probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
            encoded = jnp.einsum("btns,bsh->btnh", probs, values)
            cache = init_attention_cache(b, self.window_size, self.head_dim, self.dtype)
        else:
            # Scores against the ring buffer and the chunk side by side: the cached keys and
            # values are read in place, never copied into a concatenation.
            cache_mask = self._cache_mask(segment_pos, segment_ids, cache)
            cached = self._logits(queries, cache.keys.astype(keys.dtype), cache_mask, scale)
            w = cached.shape[-1]
            probs = jax.nn.softmax(jnp.concatenate([cached, logits], -1), axis=-1)
            probs = probs.astype(values.dtype)
            encoded = jnp.einsum(
                "btns,bsh->btnh", probs[..., :w], cache.values.astype(values.dtype)
            ) + jnp.einsum("btns,bsh->btnh", probs[..., w:], values)
        out = _dense(self.width, "proj_final", self.dtype)(encoded.reshape(b, t, self.width))
        return out, self._update_cache(cache, keys, values, segment_pos, segment_ids)

    @staticmethod
    def _logits(queries: Array, keys: Array, mask: Array, scale: float) -> Array:
        """Masked attention scores, float32 [b, t, n, s].

        (t, n) stay together as the rows of one batched product per sequence, the layout XLA
        runs without transposing the scores or the cache.
        """
        logits = jnp.einsum("btnh,bsh->btns", queries, keys).astype(jnp.float32) * scale
        return jnp.where(mask[:, :, None], logits, _MASKED)

    def _chunk_mask(self, pos: Array, segment_ids: Array) -> Array:
        q, k = pos[:, :, None], pos[:, None, :]
        same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
        return same_segment & (k >= 0) & (q >= k) & (q - k <= self.window_size)

    def _cache_mask(self, pos: Array, segment_ids: Array, cache: AttentionCache) -> Array:
        q, k = pos[:, :, None], cache.positions[:, None, :]
        before_any_reset = (segment_ids == 0)[:, :, None]
        return before_any_reset & (k >= 0) & (q > k) & (q - k <= self.window_size)

    def _update_cache(
        self,
        cache: AttentionCache,
        keys: Array,
        values: Array,
        pos: Array,
        segment_ids: Array,
    ) -> AttentionCache:
        w = self.window_size
        restarted = jnp.any(pos == 0, axis=1, keepdims=True)
        old_positions = jnp.where(restarted, -1, cache.positions)
        # Only the last w real tokens of the chunk's final segment are kept; they get distinct slots.
        last = pos[:, -1:]
        keep = (pos >= 0) & (segment_ids == segment_ids[:, -1:]) & (pos > last - w)
        slots = jnp.where(keep, pos % w, w)  # slot w is out of range: dropped

        def scatter(buffer: Array, update: Array, idx: Array) -> Array:
            return buffer.at[idx].set(update.astype(buffer.dtype), mode="drop")

        return AttentionCache(
            keys=jax.vmap(scatter)(cache.keys, keys, slots),
            values=jax.vmap(scatter)(cache.values, values, slots),
            positions=jax.vmap(scatter)(old_positions, pos, slots),
        )


class MLPBlock(nn.Module):
    """Gated MLP: down(gelu(up_0 x) * up_1 x)."""

    width: int
    expanded_width: int
    dtype: DType
    fused: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        up_proj = GatedUp(self.width, self.expanded_width, self.dtype, self.fused, name="ffw_up")
        gate, up = up_proj(x)
        return _dense(self.width, "ffw_down", self.dtype)(nn.gelu(gate) * up)


class ResidualBlock(nn.Module):
    """Pre-norm temporal mixing (recurrent or attention) and pre-norm MLP, both residual."""

    block_type: str
    width: int
    mlp_expanded_width: int
    num_heads: int
    lru_width: int
    attention_window_size: int
    conv1d_temporal_width: int
    scan_impl: str
    dtype: DType
    fused: bool = False

    @nn.compact
    def __call__(
        self, x: Array, segment_pos: Array, cache: BlockCache | None
    ) -> tuple[Array, BlockCache]:
        normed = RMSNorm(self.width, dtype=self.dtype, name="temporal_pre_norm")(x)
        if self.block_type == "recurrent":
            if cache is None:
                cache = init_recurrent_cache(
                    x.shape[0], self.lru_width, self.conv1d_temporal_width, self.dtype
                )
            mixer = RecurrentBlock(
                self.width,
                self.lru_width,
                self.num_heads,
                self.conv1d_temporal_width,
                self.scan_impl,
                self.dtype,
                self.fused,
                name="recurrent_block",
            )
        else:
            mixer = LocalAttentionBlock(
                self.width,
                self.num_heads,
                self.attention_window_size,
                self.dtype,
                self.fused,
                name="attention_block",
            )
        mixed, new_cache = mixer(normed, segment_pos, cache)
        residual = mixed + x
        normed = RMSNorm(self.width, dtype=self.dtype, name="channel_pre_norm")(residual)
        mlp = MLPBlock(
            self.width, self.mlp_expanded_width, self.dtype, self.fused, name="mlp_block"
        )
        return mlp(normed) + residual, new_cache
