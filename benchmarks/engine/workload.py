"""The engine benchmark's requests, shared by every part, and the reference side's padding.

``numpy.random.RandomState(seed)`` draws the prompt lengths (``randint(min_prompt, max_prompt +
1, size=requests)``), then the max_new_tokens budgets the same way, then each prompt's ids in
[2, vocab), in that order from one stream. Nothing stops early: every request generates exactly
its max_new_tokens, so the useful tokens of the workload are ``sum(max_new)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import harness
from model import ModelConfig

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


def make_workload(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    """(prompts, max_new_tokens): lengths first, then new-token budgets, then ids, one stream."""
    rs = np.random.RandomState(args.seed)
    prompt_lens = rs.randint(args.min_prompt, args.max_prompt + 1, size=args.requests)
    max_new = rs.randint(args.min_new, args.max_new + 1, size=args.requests)
    prompts = [rs.randint(2, vocab, size=int(n)).tolist() for n in prompt_lens]
    return prompts, [int(m) for m in max_new]


def workload_fields(
    args: argparse.Namespace,
    config: ModelConfig,
    params: Any,
    prompts: list[list[int]],
    max_new: list[int],
) -> dict[str, Any]:
    """The results' ``workload``: the requests, the batching and the model."""
    return dict(
        requests=args.requests,
        min_prompt=args.min_prompt,
        max_prompt=args.max_prompt,
        min_new=args.min_new,
        max_new=args.max_new,
        prompt_tokens=sum(len(p) for p in prompts),
        useful_tokens=sum(max_new),
        slots=args.slots,
        ref_batch=args.ref_batch,
        **harness.model_fields(args, config),
        params=int(sum(x.size for x in jax.tree.leaves(params))),
        dtype="float32",
        seed=args.seed,
    )


def batches(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [b, longest]: prompts right-aligned, PAD_ID and mask 0 before them."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), PAD_ID, np.int32)
    mask = np.zeros((len(prompts), longest), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = prompt
        mask[row, longest - len(prompt) :] = 1
    return ids, mask
