"""Plain greedy decoding with the cache: a small reference loop over :class:`RecurrentGemma`.

It serves ``rgbatch generate`` (a quick look at a checkpoint) and is the simple baseline the
batch engine is checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from model.config import ModelConfig
from model.griffin import RecurrentGemma, check_token_ids
from model.testing import left_padded_batch


def greedy_generate(
    config: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    dtype: Any = np.float32,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (each already holding BOS), without the stop id."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    tokens, positions = left_padded_batch([list(p) for p in prompts], pad_id)
    check_token_ids(tokens, config.vocab_size)
    apply = jax.jit(RecurrentGemma(config, dtype=dtype).apply)
    logits, cache = apply({"params": params}, tokens, positions)
    next_ids = np.argmax(np.asarray(logits)[:, -1], axis=-1)
    next_pos = positions[:, -1:] + 1
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for step in range(max_new_tokens):
        for row, token in enumerate(next_ids):
            if done[row]:
                continue
            if int(token) in stop_ids:
                done[row] = True
            else:
                outputs[row].append(int(token))
        if done.all() or step == max_new_tokens - 1:
            break
        logits, cache = apply(
            {"params": params}, next_ids[:, None].astype(np.int32), next_pos, cache
        )
        next_ids = np.argmax(np.asarray(logits)[:, -1], axis=-1)
        next_pos = next_pos + 1
    return outputs
