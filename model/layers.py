"""Leaf layers of the Griffin network: norms, block-diagonal linears, the causal conv, the RG-LRU.

Shape legend used in this package:
  b batch, t time (tokens in this call), d model width, r recurrent (RG-LRU) width,
  n query heads, h head dim, w attention window, c conv taps, v vocabulary, m MLP width.

Token positions (``segment_pos``, int32 [b, t]) follow the official meaning: 0 starts a segment
(resets the recurrence and the convolution, and attention looks only within the segment),
positions count up from there, and -1 marks a left pad. Pads must come before the real tokens of a
row; they leave every state untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
DType = jnp.dtype | type

SCAN_IMPLS = ("linear", "associative")
# Chosen by benchmarks/prefill.py (see README): on CPU the two are within a few percent, the
# associative scan ahead in every clean run (2,844 vs 2,816 tok/s median); accelerators get the
# log-depth associative scan too. "linear" stays available for comparison.
DEFAULT_SCAN_BY_BACKEND = {"cpu": "associative", "gpu": "associative", "tpu": "associative"}


def default_scan_impl() -> str:
    return DEFAULT_SCAN_BY_BACKEND.get(jax.default_backend(), "associative")


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + scale), computed in float32."""

    width: int
    eps: float = 1e-6
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.zeros_init(), (self.width,), jnp.float32)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(var + self.eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


class BlockDiagonalLinear(nn.Module):
    """A linear layer whose weight is block diagonal: n independent [r/n, r/n] blocks.

    With ``outputs`` > 1 it is that many such layers on the same input, stored side by side as
    w [n, r/n, outputs * r/n] (the serving layout, see :func:`model.griffin.fuse_params`), and it
    returns a tuple of ``outputs`` arrays, in one product.
    """

    width: int
    num_blocks: int
    dtype: DType = jnp.float32
    outputs: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array | tuple[Array, ...]:
        size = self.width // self.num_blocks
        w = self.param(
            "w",
            nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=2),
            (self.num_blocks, size, self.outputs * size),
            jnp.float32,
        )
        b = self.param(
            "b", nn.initializers.zeros_init(), (self.num_blocks, self.outputs * size), jnp.float32
        )
        xb = x.reshape(*x.shape[:-1], self.num_blocks, size)
        y = jnp.einsum("...ni,nij->...nj", xb, w.astype(x.dtype)) + b.astype(x.dtype)
        if self.outputs == 1:
            return y.reshape(*x.shape[:-1], self.width)
        return tuple(
            part.reshape(*x.shape[:-1], self.width) for part in jnp.split(y, self.outputs, -1)
        )


class GatedUp(nn.Module):
    """The gated MLP's two up projections, stored fused as w [2, d, m] and b [2, 1, 1, m].

    Two plain matmuls on w[0] and w[1]: XLA runs them faster than the equivalent einsum over
    the stacked weight (which it transposes on every call). The serving layout (``fused``)
    stores them side by side as w [d, 2m], b [2m]: one matmul.
    """

    width: int
    expanded_width: int
    dtype: DType = jnp.float32
    fused: bool = False

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        if self.fused:
            w = self.param("w", init, (self.width, 2 * self.expanded_width))
            b = self.param("b", nn.initializers.zeros_init(), (2 * self.expanded_width,))
            gate, up = jnp.split(x @ w.astype(self.dtype) + b.astype(self.dtype), 2, axis=-1)
            return gate, up
        shape = (2, self.width, self.expanded_width)
        w = self.param("w", init, shape)
        b = self.param("b", nn.initializers.zeros_init(), (2, 1, 1, self.expanded_width))
        w, b = w.astype(self.dtype), b.astype(self.dtype)
        return x @ w[0] + b[0, 0], x @ w[1] + b[1, 0]


def move_pads_first(state: Array, x: Array, num_pads: Array) -> Array:
    """Concatenates a carried state before a chunk so that it sits right before the real tokens.

    state [b, s, ...] holds the last s inputs of the running segment (oldest first); x [b, t, ...]
    is a left-padded chunk with num_pads [b] pads. Returns [b, p | state | real tokens] of length
    s + t, which makes "k steps back" a plain index shift for every row.
    """
    s, t = state.shape[1], x.shape[1]
    k = jnp.arange(s + t)[None, :]
    p = num_pads[:, None]
    idx = jnp.where(k < p, s + k, jnp.where(k < p + s, k - p, k))
    joined = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(joined, idx, axis=1)


class Conv1D(nn.Module):
    """Causal depthwise convolution over time with c taps, reset at segment starts."""

    width: int
    temporal_width: int
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, segment_pos: Array, state: Array) -> tuple[Array, Array]:
        """x [b, t, r], state [b, c-1, r] -> (y [b, t, r], new state [b, c-1, r])."""
        c, t = self.temporal_width, x.shape[1]
        w = self.param(
            "w", nn.initializers.variance_scaling(0.01, "fan_in", "normal"), (c, self.width)
        )
        b = self.param("b", nn.initializers.zeros_init(), (self.width,))
        num_pads = jnp.sum(segment_pos < 0, axis=1)
        joined = move_pads_first(state, x, num_pads)
        out = jnp.zeros_like(x) + b.astype(self.dtype)
        for shift in range(c):
            window = joined[:, c - 1 - shift : c - 1 - shift + t]
            in_segment = (segment_pos >= shift)[..., None]
            out = out + jnp.where(in_segment, window, 0) * w[c - 1 - shift].astype(self.dtype)
        new_state = joined[:, joined.shape[1] - (c - 1) :]
        return out, new_state.astype(state.dtype)


def linear_scan(a: Array, x: Array, h0: Array) -> tuple[Array, Array]:
    """h_t = a_t * h_{t-1} + x_t, one step at a time. a, x [b, t, r]; h0 [b, r]."""

    def step(h: Array, ax: tuple[Array, Array]) -> tuple[Array, Array]:
        h = ax[0] * h + ax[1]
        return h, h

    a_tm, x_tm = jnp.swapaxes(a, 0, 1), jnp.swapaxes(x, 0, 1)
    h_last, ys = jax.lax.scan(step, h0, (a_tm, x_tm), unroll=min(16, max(1, a.shape[1])))
    return jnp.swapaxes(ys, 0, 1), h_last


def associative_scan(a: Array, x: Array, h0: Array) -> tuple[Array, Array]:
    """The same recurrence as :func:`linear_scan` in log depth (parallel prefix)."""

    def combine(left: tuple[Array, Array], right: tuple[Array, Array]) -> tuple[Array, Array]:
        return left[0] * right[0], right[0] * left[1] + right[1]

    a_cum, x_cum = jax.lax.associative_scan(combine, (a, x), axis=1)
    ys = x_cum + a_cum * h0[:, None, :]
    return ys, ys[:, -1]


SCANS: dict[str, Callable[[Array, Array, Array], tuple[Array, Array]]] = {
    "linear": linear_scan,
    "associative": associative_scan,
}


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit; gates and state in float32.

    ``fused`` reads the serving layout: both gates in one block-diagonal product ("gates").
    """

    width: int
    num_heads: int
    scan_impl: str = "linear"
    fused: bool = False

    @nn.compact
    def __call__(self, x: Array, segment_pos: Array, h0: Array) -> tuple[Array, Array]:
        """x [b, t, r], h0 [b, r] float32 -> (y [b, t, r], last state [b, r] float32)."""
        a_param = self.param("a_param", _a_param_init, (self.width,))
        x32 = x.astype(jnp.float32)
        if self.fused:
            gates = BlockDiagonalLinear(
                self.width, self.num_heads, jnp.float32, outputs=2, name="gates"
            )(x32)
            gate_x, gate_a = (jax.nn.sigmoid(g) for g in gates)
        else:
            gate_x = jax.nn.sigmoid(
                BlockDiagonalLinear(self.width, self.num_heads, jnp.float32, name="input_gate")(x32)
            )
            gate_a = jax.nn.sigmoid(
                BlockDiagonalLinear(self.width, self.num_heads, jnp.float32, name="a_gate")(x32)
            )
        log_a = -8.0 * gate_a * jax.nn.softplus(a_param.astype(jnp.float32))
        a = jnp.exp(log_a)
        reset = (segment_pos == 0)[..., None]
        pad = (segment_pos < 0)[..., None]
        multiplier = jnp.where(reset, 1.0, jnp.sqrt(1.0 - jnp.exp(2.0 * log_a)))
        normalized = jnp.where(pad, 0.0, x32 * gate_x * multiplier)
        a = jnp.where(reset, 0.0, jnp.where(pad, 1.0, a))
        y, h_last = SCANS[self.scan_impl](a, normalized, h0.astype(jnp.float32))
        return y.astype(x.dtype), h_last


def _a_param_init(key: Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> Array:
    """softplus^-1 of -log(radius) with radius^2 uniform in [0.9^2, 0.999^2]."""
    unif = jax.random.uniform(key, shape)
    a_real = 0.5 * jnp.log(unif * (0.999**2 - 0.9**2) + 0.9**2 + 1e-8)
    return jnp.log(jnp.exp(-a_real) - 1.0).astype(dtype)


def apply_rope(x: Array, positions: Array, max_wavelength: float = 10_000.0) -> Array:
    """Rotary embedding on the first half of the last axis. x [b, t, ..., h], positions [b, t]."""
    rope_part, rest = jnp.split(x, 2, axis=-1)
    half = rope_part.shape[-1] // 2
    inv_freq = 1.0 / (max_wavelength ** (2.0 * jnp.arange(half) / rope_part.shape[-1]))
    pos = positions.astype(jnp.float32).reshape(positions.shape + (1,) * (x.ndim - 2))
    angles = pos * inv_freq
    sin, cos = jnp.sin(angles).astype(x.dtype), jnp.cos(angles).astype(x.dtype)
    first, second = jnp.split(rope_part, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin, rest], axis=-1)
