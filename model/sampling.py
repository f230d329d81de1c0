"""Per-row token sampling: greedy, temperature, top-k, top-p, keyed by each request's own seed.

A row's draw depends only on its logits, its sampling settings, its seed and the index of the token
being drawn, never on the slot or batch it sits in.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class SamplingParams(NamedTuple):
    """Per-row settings, each [b]. temperature 0 means greedy; top_k 0 and top_p 1 disable."""

    temperature: Array
    top_k: Array
    top_p: Array
    seed: Array


def row_key(seed: Array, token_index: Array) -> Array:
    return jax.random.fold_in(jax.random.key(seed), token_index)


def sample(logits: Array, params: SamplingParams, token_index: Array) -> Array:
    """logits float32 [b, v], token_index int32 [b] -> token ids int32 [b]."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits: Array) -> Array:
        needs_filter = jnp.any((params.top_k > 0) | (params.top_p < 1.0))
        filtered = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda lg, _: lg, logits, params)
        temperature = jnp.maximum(params.temperature, 1e-6)[:, None]
        keys = jax.vmap(row_key)(params.seed, token_index)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:], jnp.float32))(keys)
        drawn = jnp.argmax(filtered / temperature + gumbel, axis=-1).astype(jnp.int32)
        return jnp.where(params.temperature > 0, drawn, greedy)

    # An all-greedy batch skips the sort and the random draws entirely.
    return jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda _: greedy, logits)


def _filter_top_k_top_p(logits: Array, params: SamplingParams) -> Array:
    """Masks logits outside each row's top-k and top-p (nucleus) sets with -inf."""
    vocab = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(params.top_k > 0, params.top_k, vocab)[:, None]
    keep = rank < k
    temperature = jnp.maximum(params.temperature, 1e-6)[:, None]
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits / temperature, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (mass_before < params.top_p[:, None]) | (rank == 0)
    masked_sorted = jnp.where(keep, sorted_logits, -jnp.inf)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(masked_sorted, inverse, axis=-1)
