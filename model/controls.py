"""Per-row generation controls past sampling, host side: their arrays and how a request fills them.

No JAX here (the scheduler builds these arrays); the device functions that read them are in
:mod:`model.control_ops`. A row's controls (each off by default, and a row with all of them off
computes exactly what it would without them):

- ``min_tokens``: the stop ids (EOS included) cannot be drawn, and stop sequences do not match,
  before this many tokens are out (vLLM's semantics).
- ``presence_penalty`` / ``frequency_penalty`` (OpenAI's): ``logit - frequency * count -
  presence * (count > 0)``, count = how often the token was generated so far (prompt not
  counted), over the last ``EngineConfig.history_tokens`` generated tokens.
- ``repetition_penalty`` (HF / vLLM's): a token in the prompt or generated so far has its logit
  divided by the penalty when positive, multiplied when negative (1 is off). Applied first, then
  the OpenAI penalties, as vLLM does.
- ``stop_sequences``: token sequences; a row whose output ends with one stops (the sequence's
  tokens are emitted: the caller cuts the text).
- Loop guard (``loop_ngram`` n, ``loop_repeats`` r): a row whose last ``n * r`` tokens are one
  n-token sequence repeated r times (a period dividing n) ends with finish reason ``loop``.
- ``logprobs``: -1 off, else the drawn token's log-probability and the ``logprobs`` most likely
  tokens' (log-softmax of the model's raw logits: before temperature, penalties and filters).

Device state these add, in all for 128 slots (``EngineConfig`` defaults, Gemma's 256k
vocabulary): per slot the last ``history_tokens`` (1024) generated ids, int32, 0.5 MB; the
prompt's tokens as a packed bitmask [vocab / 32] uint32, 4.1 MB; the stop sequences [8, 16] int32,
64 KB. No [slots, vocab]
array is kept: the penalties are scattered from the history into the logits each step (inside a
branch that only runs when a row uses them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

ENDED_NONE, ENDED_STOP_SEQUENCE, ENDED_LOOP = 0, 1, 2  # StepOutput.ended codes


class Controls(NamedTuple):
    """Per-row control arrays (leading dimension: rows or slots)."""

    min_tokens: Any  # int32 [b]
    presence: Any  # float32 [b]
    frequency: Any  # float32 [b]
    repetition: Any  # float32 [b], 1 off
    logprobs: Any  # int32 [b]: -1 off, else how many top alternatives (0: the drawn token only)
    loop_ngram: Any  # int32 [b], 0 off
    loop_repeats: Any  # int32 [b]
    stop_seqs: Any  # int32 [b, max_stop_sequences, max_stop_length], right-aligned, -1 padded
    prompt_bits: Any  # uint32 [b, ceil(vocab / 32)]: the prompt's tokens (repetition penalty)


def bitmask_words(vocab: int) -> int:
    return -(-vocab // 32)


def empty_controls(rows: int, stop_shape: tuple[int, int], vocab: int) -> Controls:
    """Every control off, as numpy arrays."""
    return Controls(
        min_tokens=np.zeros((rows,), np.int32),
        presence=np.zeros((rows,), np.float32),
        frequency=np.zeros((rows,), np.float32),
        repetition=np.ones((rows,), np.float32),
        logprobs=np.full((rows,), -1, np.int32),
        loop_ngram=np.zeros((rows,), np.int32),
        loop_repeats=np.zeros((rows,), np.int32),
        stop_seqs=np.full((rows, *stop_shape), -1, np.int32),
        prompt_bits=np.zeros((rows, bitmask_words(vocab)), np.uint32),
    )


def pack_tokens(ids: Sequence[int], vocab: int) -> np.ndarray:
    """uint32 [ceil(vocab / 32)]: bit ``i % 32`` of word ``i // 32`` set for each id i."""
    words = np.zeros((bitmask_words(vocab),), np.uint32)
    ids = np.unique(np.asarray(ids, np.int64))
    np.bitwise_or.at(words, ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))
    return words


def is_off(request: Any) -> bool:
    """Whether every control of ``request`` (a GenerationRequest) is at its default (off), so
    its row of :func:`empty_controls` already holds them."""
    return (
        request.min_tokens == 0
        and request.presence_penalty == 0
        and request.frequency_penalty == 0
        and request.repetition_penalty == 1
        and request.logprobs is None
        and request.loop_ngram == 0
        and request.loop_repeats == 0
        and not request.stop_sequences
    )


def fill_rows(controls: Controls, requests: Sequence[Any]) -> None:
    """Writes each request's controls into rows ``0 .. len(requests) - 1`` of ``controls``, a
    column at a time (prompt bits apart). The rows
    must hold the defaults of :func:`empty_controls`: when every request's controls are off
    they are left as they are."""
    if all(is_off(request) for request in requests):
        return
    m = len(requests)
    controls.min_tokens[:m] = [r.min_tokens for r in requests]
    controls.presence[:m] = [r.presence_penalty for r in requests]
    controls.frequency[:m] = [r.frequency_penalty for r in requests]
    controls.repetition[:m] = [r.repetition_penalty for r in requests]
    controls.logprobs[:m] = [-1 if r.logprobs is None else r.logprobs for r in requests]
    controls.loop_ngram[:m] = [r.loop_ngram for r in requests]
    controls.loop_repeats[:m] = [r.loop_repeats for r in requests]
    length = controls.stop_seqs.shape[-1]
    for row, request in enumerate(requests):
        for q, seq in enumerate(request.stop_sequences):
            controls.stop_seqs[row, q, length - len(seq) :] = list(seq)


def problem(request: Any, vocab: int, limits: Any) -> str | None:
    """Why the request's controls cannot run on an engine with ``limits`` (an EngineConfig)."""
    if request.min_tokens < 0 or request.min_tokens > request.max_new_tokens:
        return f"min_tokens must be in [0, max_new_tokens], got {request.min_tokens}"
    finite = (
        _finite(request.presence_penalty)
        and _finite(request.frequency_penalty)
        and _finite(request.repetition_penalty)
    )
    if not finite or request.repetition_penalty <= 0:
        return "penalties must be finite and repetition_penalty > 0"
    if request.logprobs is not None and not 0 <= request.logprobs <= limits.max_logprobs:
        return f"logprobs must be in [0, {limits.max_logprobs}], got {request.logprobs}"
    if len(request.stop_sequences) > limits.max_stop_sequences:
        return f"at most {limits.max_stop_sequences} stop sequences"
    for seq in request.stop_sequences:
        if not 0 < len(seq) <= limits.max_stop_length or not all(0 <= t < vocab for t in seq):
            return f"a stop sequence needs 1..{limits.max_stop_length} ids in the vocabulary"
    n, r = request.loop_ngram, request.loop_repeats
    if n < 0 or (n and (r < 2 or n * r > min(limits.max_loop_window, limits.history_tokens))):
        return (
            f"loop guard: loop_ngram >= 0, loop_repeats >= 2 and loop_ngram * loop_repeats <= "
            f"{min(limits.max_loop_window, limits.history_tokens)}"
        )
    if not 1 <= request.n <= limits.max_slots:
        return f"n must be in [1, max_slots={limits.max_slots}], got {request.n}"
    return None


def _finite(value: Any) -> bool:
    """Whether a penalty is finite (a Python float without numpy, the rest through numpy)."""
    return math.isfinite(value) if type(value) is float else bool(np.isfinite(value))


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request (sample 0: the request's own seed)."""
    if index == 0:
        return int(seed) & 0x7FFFFFFF
    mixed = (int(seed) * 0x9E3779B1 + index * 0x85EBCA77) & 0xFFFFFFFF
    mixed ^= mixed >> 15
    return (mixed * 0x2C1B3C6D & 0xFFFFFFFF) & 0x7FFFFFFF
