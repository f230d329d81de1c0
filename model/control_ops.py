"""Per-row generation controls on the device (their meaning and state: :mod:`model.controls`).

Applied in one place per draw, by :mod:`model.runner`: :func:`adjust_logits` before
:func:`model.sampling.sample`, then :func:`record` and :func:`ended` on the drawn token, and
:func:`logprob_outputs` from the raw logits. Each costly part sits in a ``lax.cond`` on "some
row uses it", so a batch without penalties, ``min_tokens`` or logprobs runs none of it; a row
with its controls off gets exactly its unadjusted logits (``jnp.where`` per row), so its greedy
tokens do not depend on its batch neighbours' controls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.controls import ENDED_LOOP, ENDED_NONE, ENDED_STOP_SEQUENCE, Controls
from model.sampling import unpack_bits

Array = jax.Array


def _penalised(logits: Array, c: Controls, recent: Array) -> Array:
    """Repetition penalty (prompt and output), then frequency and presence (output only)."""
    b, vocab = logits.shape
    rows = jnp.arange(b)[:, None]
    valid = recent >= 0
    ids = jnp.where(valid, recent, vocab)  # out of range: dropped
    seen = jnp.zeros((b, vocab), bool).at[rows, ids].set(True, mode="drop")
    rep = c.repetition[:, None]
    hit = seen | unpack_bits(c.prompt_bits, vocab)
    out = jnp.where(hit, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    freq = jnp.where(valid, c.frequency[:, None], 0.0)
    out = out.at[rows, ids].add(-freq, mode="drop")
    out = out - jnp.where(seen, c.presence[:, None], 0.0)
    on = (c.presence != 0) | (c.frequency != 0) | (c.repetition != 1)
    return jnp.where(on[:, None], out, logits)


def adjust_logits(
    logits: Array, c: Controls, recent: Array, generated: Array, stop_ids: Array
) -> Array:
    """float32 [b, v] logits with each row's penalties and ``min_tokens`` applied.

    ``recent`` int32 [b, h]: the generated ids kept (-1 where none); ``generated`` int32 [b]:
    tokens out so far; ``stop_ids`` int32 [b, k] (-1 padded).
    """
    logits = logits.astype(jnp.float32)
    on = (c.presence != 0) | (c.frequency != 0) | (c.repetition != 1)
    logits = jax.lax.cond(jnp.any(on), lambda lg: _penalised(lg, c, recent), lambda lg: lg, logits)

    def block_stops(lg: Array) -> Array:
        early = (generated < c.min_tokens)[:, None] & (stop_ids >= 0)
        ids = jnp.where(early, stop_ids, lg.shape[-1])
        return lg.at[jnp.arange(lg.shape[0])[:, None], ids].set(-jnp.inf, mode="drop")

    return jax.lax.cond(jnp.any(generated < c.min_tokens), block_stops, lambda lg: lg, logits)


def record(recent: Array, generated: Array, token: Array, emitted: Array) -> Array:
    """``recent`` with each emitted token written at ring index ``generated % h``."""
    h = recent.shape[1]
    idx = jnp.where(emitted, generated % h, h)
    return recent.at[jnp.arange(recent.shape[0]), idx].set(token, mode="drop")


def _last(recent: Array, count: Array, length: int) -> Array:
    """int32 [b, length]: the last ``length`` generated ids, oldest first (-2 before the first)."""
    h = recent.shape[1]
    idx = count[:, None] - length + jnp.arange(length)[None, :]
    values = jnp.take_along_axis(recent, idx % h, axis=1)
    return jnp.where(idx >= 0, values, -2)


def ended(recent: Array, count: Array, c: Controls, window: int) -> Array:
    """int8 [b]: whether the output (``count`` tokens, the last in ``recent``) now ends with a
    stop sequence (past min_tokens) or a loop (see :mod:`model.controls`)."""
    seqs = c.stop_seqs
    tail = _last(recent, count, seqs.shape[-1])[:, None, :]
    match = jnp.all((seqs < 0) | (seqs == tail), axis=-1) & jnp.any(seqs >= 0, axis=-1)
    stop = jnp.any(match, axis=-1) & (count >= c.min_tokens)
    w = min(window, recent.shape[1])
    last = _last(recent, count, w)
    n, span = c.loop_ngram, c.loop_ngram * c.loop_repeats
    j = jnp.arange(w)[None, :]
    back = jnp.take_along_axis(last, jnp.maximum(j - n[:, None], 0), axis=1)
    checked = j >= w - (span - n)[:, None]
    periodic = jnp.all(~checked | (last == back), axis=-1)
    loop = (n > 0) & (count >= span) & periodic
    code = jnp.where(loop, ENDED_LOOP, ENDED_NONE)
    return jnp.where(stop, ENDED_STOP_SEQUENCE, code).astype(jnp.int8)


def logprob_outputs(
    logits: Array, token: Array, c: Controls, rows: Array, top: int
) -> tuple[Array, Array, Array]:
    """The drawn token's log-probability [b] and the ``top`` most likely ids and
    log-probabilities [b, top], from the log-softmax of the raw ``logits``; computed only if
    one of ``rows`` asked (zeros otherwise)."""
    b = logits.shape[0]

    def compute(logits: Array) -> tuple[Array, Array, Array]:
        lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        chosen = jnp.take_along_axis(lsm, token[:, None], axis=1)[:, 0]
        if top == 0:
            return chosen, jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), jnp.float32)
        values, ids = jax.lax.top_k(lsm, top)
        return chosen, ids.astype(jnp.int32), values

    def skip(logits: Array) -> tuple[Array, Array, Array]:
        return (
            jnp.zeros((b,), jnp.float32),
            jnp.zeros((b, top), jnp.int32),
            jnp.zeros((b, top), jnp.float32),
        )

    return jax.lax.cond(jnp.any(rows & (c.logprobs >= 0)), compute, skip, logits)
