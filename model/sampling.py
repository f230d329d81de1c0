"""Per-row token sampling: greedy, temperature, top-k, top-p, keyed by each request's own seed.

A row's draw depends only on its logits, its sampling settings, its seed and the index of the token
being drawn, never on the slot or batch it sits in.

Semantics (those of HF's and vLLM's warpers): order the vocabulary by logit, highest first, ties
by lower token id. top-k keeps the first ``top_k`` (0, or ``top_k >= vocab``, keeps all); top-p
keeps, within that set, each token whose probability mass before it (softmax of ``logits /
temperature`` renormalised over the top-k set) is under ``top_p``, so the most likely token is
always kept (``top_p >= 1`` keeps all). The draw is the Gumbel-max trick over the kept set: the
argmax of ``logits / temperature + g`` with ``g`` a Gumbel noise per (row key, token id); ties go
to the lower id. Temperature 0 is greedy (the argmax of the logits, settings ignored).

No sort of the vocabulary: the kept set is always a prefix of that order, found in one of two
ways, per row:

- *Candidates*: the ``CANDIDATES`` highest logits from :func:`jax.lax.top_k` (which breaks ties
  by lower index, as the order above does). A row whose top-k is at most ``CANDIDATES``, or whose
  top-p nucleus ends inside the candidates (their mass reaches ``top_p``), is settled there, with
  the Gumbel noise computed for the candidate ids only.
- *Exact fallback* (only when some row needs it, e.g. top-p over a flat distribution or
  ``CANDIDATES < top_k < vocab``): the prefix boundary by bisection over the logits' ordered bit
  patterns, 32 passes each of a masked sum over the vocabulary (counts for top-k, probability
  mass for top-p), then, only where the boundary value is tied, a bisection over token ids
  (``ceil(log2(vocab + 1))`` passes) for where in the tie the prefix ends. The noise is then drawn
  for the whole vocabulary, as a temperature-only row's is.

Both ways use the same noise for a token: the full draw takes ``jax.random.gumbel(key,
(vocab,))`` (as before this module avoided sorts, so temperature-only draws are unchanged) and
:func:`gumbel_noise` computes that same value for the candidate ids alone (a test holds the two
equal), so a row's token does not depend on which way its batch went. Masses are
float32 sums in a different order from a sorted cumulative sum: a token whose mass before it is
within float rounding (~1e-6) of ``top_p`` may fall on either side.

Measured on the shared 2-core CPU machine (load 10-16), float32 logits [128, 256000] from a
standard normal, jitted (``python -m benchmarks.engine_host --parts sampling``), ms per call, this
module against the sorting one of commit 7da69c4 in the same run: greedy 131 / 267; temperature
0.7 2,486 / 1,942; with top_p 0.9 5,028 (2.0x temperature; flat logits, so the exact fallback) /
38,767 (20x); with top_k 50 325 (0.13x: the candidates settle it and only 50 noise values are
drawn) / 43,516 (22x). ``lax.approx_max_k`` is not used: on CPU and GPU it runs the exact
top-k (no faster here: 105 ms against 96 ms at k=64), and on TPU its recall below 1 would change
which tokens are kept.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

Array = jax.Array

CANDIDATES = 128  # logits taken by lax.top_k per row: top-k up to this, and most top-p nuclei
_TINY = np.float32(np.finfo(np.float32).tiny)
_KEY_BITS = 32  # bisection passes over the ordered int32 keys of float32 logits


class SamplingParams(NamedTuple):
    """Per-row settings, each [b]. temperature 0 means greedy; top_k 0 and top_p 1 disable."""

    temperature: Array
    top_k: Array
    top_p: Array
    seed: Array


def unpack_bits(words: Array, vocab: int) -> Array:
    """Packed token sets, int32 or uint32 [b, ceil(vocab / 32)] (bit ``i % 32`` of word
    ``i // 32`` for token ``i``: :func:`model.controls.pack_tokens`, a grammar's mask) -> bool
    [b, vocab]."""
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = (words.astype(jnp.uint32)[:, :, None] >> shifts) & np.uint32(1)
    return bits.reshape(words.shape[0], -1)[:, :vocab].astype(bool)


def apply_mask(logits: Array, mask: Array) -> Array:
    """logits [b, v], packed allowed tokens int32 [b, ceil(v / 32)] (:func:`unpack_bits`) ->
    the logits with -inf where a token is not allowed. An all-ones row leaves its logits
    exactly as they were."""
    return jnp.where(unpack_bits(mask, logits.shape[-1]), logits, -jnp.inf)


def row_key(seed: Array, token_index: Array) -> Array:
    """The key of one row's draw: its seed folded with the index of the token being drawn."""
    return jax.random.fold_in(jax.random.key(seed), token_index)


def gumbel_noise(key_data: Array, ids: Array) -> Array:
    """uint32 key data [b, 2], token ids int32 [b, n] -> float32 Gumbel noise [b, n], one value
    per (key, token id): the Threefry hash of counter ``id`` (as ``jax.random.bits`` lays out a
    1-D draw) through the transform of ``jax.random.gumbel``."""
    k1 = jnp.broadcast_to(key_data[:, :1], ids.shape)
    k2 = jnp.broadcast_to(key_data[:, 1:], ids.shape)
    counter = ids.astype(jnp.uint32)
    hi, lo = threefry2x32_p.bind(k1, k2, jnp.zeros_like(counter), counter)
    mantissa = ((hi ^ lo) >> np.uint32(9)) | np.uint32(0x3F800000)
    floats = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
    uniform = jnp.maximum(_TINY, floats * (np.float32(1.0) - _TINY) + _TINY)
    return -jnp.log(-jnp.log(uniform))


def sample(logits: Array, params: SamplingParams, token_index: Array) -> Array:
    """logits float32 [b, v], token_index int32 [b] -> token ids int32 [b]."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits: Array) -> Array:
        keys = jax.vmap(lambda s, i: jax.random.key_data(row_key(s, i)))(params.seed, token_index)
        z = logits / jnp.maximum(params.temperature, 1e-6)[:, None]
        limits = _Limits.of(params, logits.shape[-1])
        sampled = params.temperature > 0
        drawn = jax.lax.cond(
            jnp.any(sampled & limits.filtering),
            _draw_filtered,
            lambda lg, z, keys, lim, s: _draw_full(z, keys, jnp.ones(z.shape, bool)),
            logits,
            z,
            keys,
            limits,
            sampled,
        )
        return jnp.where(params.temperature > 0, drawn, greedy)

    # An all-greedy batch skips the filters and the random draws entirely.
    return jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda _: greedy, logits)


class _Limits(NamedTuple):
    """Each row's effective top-k (vocab when off) and top-p, and whether each filter is on."""

    k: Array  # int32 [b], in 1..v
    p: Array  # float32 [b]
    top_k_on: Array  # bool [b]
    top_p_on: Array  # bool [b]

    @classmethod
    def of(cls, params: SamplingParams, vocab: int) -> _Limits:
        top_k_on = (params.top_k > 0) & (params.top_k < vocab)
        k = jnp.where(top_k_on, params.top_k, vocab).astype(jnp.int32)
        return cls(k, params.top_p.astype(jnp.float32), top_k_on, params.top_p < 1.0)

    @property
    def filtering(self) -> Array:
        return self.top_k_on | self.top_p_on


def _draw_full(z: Array, keys: Array, keep: Array) -> Array:
    """The Gumbel-max draw over the whole vocabulary, restricted to ``keep`` [b, v]: the noise of
    ``jax.random.gumbel`` (what :func:`gumbel_noise` gives for every id, at its cost)."""
    vocab = z.shape[-1]
    noise = jax.vmap(lambda k: jax.random.gumbel(jax.random.wrap_key_data(k), (vocab,)))(keys)
    scores = jnp.where(keep, z + noise, -jnp.inf)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


class _Candidates(NamedTuple):
    """Per row: the top-``CANDIDATES`` token ids [b, c] in order, which of them are kept, and
    whether that settles the row's kept set (nothing past the candidates is kept)."""

    ids: Array
    keep: Array
    settled: Array


def _candidates(logits: Array, z: Array, limits: _Limits) -> _Candidates:
    count = min(CANDIDATES, logits.shape[-1])
    _, ids = jax.lax.top_k(logits, count)  # ties: the lower id first, as in the order
    zc = jnp.take_along_axis(z, ids, axis=-1)
    in_k = jnp.arange(count)[None, :] < limits.k[:, None]
    small_k = limits.k <= count
    # Probabilities over the top-k set: within the candidates when it is there, else over the
    # whole vocabulary (one logsumexp pass, only if some top-p row needs it).
    lse_c = jax.nn.logsumexp(jnp.where(in_k, zc, -jnp.inf), axis=-1)
    wide_top_p = limits.top_p_on & ~small_k
    lse_full = jax.lax.cond(
        jnp.any(wide_top_p),
        lambda z: jax.nn.logsumexp(z, axis=-1),
        lambda z: jnp.zeros(z.shape[:1], z.dtype),
        z,
    )
    probs = jnp.where(in_k, jnp.exp(zc - jnp.where(small_k, lse_c, lse_full)[:, None]), 0.0)
    mass = jnp.cumsum(probs, axis=-1)
    keep = in_k & ((mass - probs < limits.p[:, None]) | ~limits.top_p_on[:, None])
    settled = small_k | (wide_top_p & ~limits.top_k_on & (mass[:, -1] >= limits.p))
    return _Candidates(ids, keep, settled)


def _draw_filtered(logits: Array, z: Array, keys: Array, limits: _Limits, sampled: Array) -> Array:
    """Draws each row from its candidates where they settle its kept set, and the other
    ``sampled`` rows (if any) over the whole vocabulary, through the exact mask."""
    vocab = logits.shape[-1]
    cand = _candidates(logits, z, limits)
    zc = jnp.take_along_axis(z, cand.ids, axis=-1)
    scores = jnp.where(cand.keep, zc + gumbel_noise(keys, cand.ids), -jnp.inf)
    best = jnp.max(scores, axis=-1, keepdims=True)
    from_candidates = jnp.min(jnp.where(scores == best, cand.ids, vocab), axis=-1)
    unsettled = sampled & ~cand.settled
    from_full = jax.lax.cond(
        jnp.any(unsettled),
        lambda: _draw_full(z, keys, _exact_keep(logits, z, limits, unsettled)),
        lambda: from_candidates.astype(jnp.int32),
    )
    return jnp.where(cand.settled, from_candidates, from_full).astype(jnp.int32)


def kept_tokens(logits: Array, params: SamplingParams, *, exact: bool = False) -> Array:
    """bool [b, v]: the tokens each row may draw (its top-k and top-p set, whatever its
    temperature), as :func:`sample` finds them: from the candidates where they settle the row,
    else through the exact full-vocabulary mask (``exact`` takes that for every row)."""
    logits = logits.astype(jnp.float32)
    z = logits / jnp.maximum(params.temperature, 1e-6)[:, None]
    limits = _Limits.of(params, logits.shape[-1])
    rows = jnp.ones(logits.shape[:1], bool)
    full = _exact_keep(logits, z, limits, rows)
    if exact:
        return full
    cand = _candidates(logits, z, limits)
    scattered = jnp.zeros(logits.shape, bool)
    scattered = jax.vmap(lambda m, i, k: m.at[i].set(k))(scattered, cand.ids, cand.keep)
    return jnp.where(cand.settled[:, None], scattered, full)


def _exact_keep(logits: Array, z: Array, limits: _Limits, rows: Array) -> Array:
    """bool [b, v]: each row's kept set over the whole vocabulary (computed for ``rows``; each
    filter's passes run only if one of them uses it)."""
    keys = _ordered_keys(logits)
    everything = jnp.ones(logits.shape, bool)
    ones = jnp.ones(logits.shape, jnp.float32)
    top_k = jax.lax.cond(
        jnp.any(rows & limits.top_k_on),
        lambda: _prefix(keys, ones, limits.k.astype(jnp.float32)) | ~limits.top_k_on[:, None],
        lambda: everything,
    )

    def nucleus() -> Array:
        probs = jax.nn.softmax(jnp.where(top_k, z, -jnp.inf), axis=-1)
        return top_k & (_prefix(keys, probs, limits.p) | ~limits.top_p_on[:, None])

    return jax.lax.cond(jnp.any(rows & limits.top_p_on), nucleus, lambda: top_k)


def _ordered_keys(x: Array) -> Array:
    """int32 keys of float32 values in the same order (-0.0 just below +0.0)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)


def _prefix(keys: Array, weights: Array, limit: Array) -> Array:
    """bool [b, v]: the elements whose weight before them, in the order key descending then
    index ascending, is under ``limit`` [b] (> 0): top-k with unit weights, top-p with
    probabilities.

    The boundary key is the smallest key t with W(key > t) < limit (a key some element has, so
    32 bisection steps over int32 find it exactly); ties at t are cut by a bisection over the
    index, run only if some row's boundary is tied.
    """
    limit = limit[:, None]

    def above(t: Array) -> Array:
        return jnp.sum(jnp.where(keys > t[:, None], weights, 0.0), axis=-1)

    lo = jnp.full(keys.shape[:1], np.iinfo(np.int32).min, jnp.int32)  # W(> lo) >= limit
    hi = jnp.full(keys.shape[:1], np.iinfo(np.int32).max, jnp.int32)  # W(> hi) = 0 < limit
    _, t = _bisect(lambda t: above(t) < limit[:, 0], lo, hi, _KEY_BITS)
    base = above(t)[:, None]
    tied = keys == t[:, None]
    index = jax.lax.broadcasted_iota(jnp.int32, keys.shape, 1)
    vocab = keys.shape[-1]

    def cut_ties() -> Array:
        # Largest m with base + W(tied, index < m) < limit: a tied element i is kept iff i <= m.
        def under(m: Array) -> Array:
            before = jnp.sum(jnp.where(tied & (index < m[:, None]), weights, 0.0), axis=-1)
            return base[:, 0] + before < limit[:, 0]

        # under(0) holds (base < limit); index vocab + 1 stands for "past every element".
        zero = jnp.zeros_like(t)
        steps = math.ceil(math.log2(vocab + 1))
        m, _ = _bisect(lambda m: ~under(m), zero, zero + vocab + 1, steps)
        return index <= m[:, None]

    many = jnp.sum(tied, axis=-1) > 1
    first_ties = jax.lax.cond(jnp.any(many), cut_ties, lambda: jnp.ones(keys.shape, bool))
    return (keys > t[:, None]) | (tied & first_ties)


def _bisect(pred, lo: Array, hi: Array, steps: int) -> tuple[Array, Array]:
    """Narrows int32 [b] brackets with ``pred(lo)`` false and ``pred(hi)`` true (``pred``
    monotone) for ``steps`` halvings; returns (lo, hi), adjacent once the bracket allowed it."""

    def halve(_: int, bracket: tuple[Array, Array]) -> tuple[Array, Array]:
        lo, hi = bracket
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        ok = pred(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, steps, halve, (lo, hi))
