"""The engine's limits and shapes, apart from the engine so that they import without JAX.

:class:`EngineConfig` holds the one default of every engine setting: the job config's
``generation`` section takes its defaults from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine limits and shapes.

    Attributes:
      max_slots: Sequences decoded together (the decode batch).
      prefill_batch: Prompts prefilled together per call (the one row count compiled; also how
        many slots must be free before a decode call hands back to admit new prompts).
      prefill_chunk: Tokens per prefill call; longer prompts take several calls.
      decode_steps: Most tokens generated per jitted decode call (per host round trip).
      length_lookahead: How many queued prompts (from the oldest) are searched for ones of
        similar length to prefill together. 1 keeps strict arrival order.
      max_prompt_tokens: Longer prompts come back as errors; None means no limit.
      max_stop_ids: Most stop ids one request may give.
      dtype: Compute dtype; params are cast to it once, on the device.
      tensor_parallel: Devices one replica's weights and slot state are split over (see
        :class:`Engine`); 1 runs on one device.
      history_tokens: Generated ids kept per slot on the device (a ring): what the presence,
        frequency and repetition penalties count, the stop sequences and the loop guard read.
      max_stop_sequences: Most stop token sequences per request (matched on the device).
      max_stop_length: Most ids per stop sequence.
      max_logprobs: Most top alternatives per token a request may ask for (0: none; the
        drawn token's log-probability is always available).
      max_loop_window: Most tokens the loop guard looks back (loop_ngram * loop_repeats).
    """

    max_slots: int = 32
    prefill_batch: int = 8
    prefill_chunk: int = 128
    decode_steps: int = 16
    length_lookahead: int = 64
    max_prompt_tokens: int | None = None
    max_stop_ids: int = 4
    dtype: Any = np.float32
    tensor_parallel: int = 1
    history_tokens: int = 1024
    max_stop_sequences: int = 8
    max_stop_length: int = 16
    max_logprobs: int = 20
    max_loop_window: int = 64

    def __post_init__(self) -> None:
        names = (
            "max_slots",
            "prefill_batch",
            "prefill_chunk",
            "decode_steps",
            "length_lookahead",
            "max_stop_ids",
            "tensor_parallel",
            "history_tokens",
            "max_stop_sequences",
            "max_stop_length",
            "max_loop_window",
        )
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_logprobs < 0:
            raise ValueError(f"EngineConfig.max_logprobs must be >= 0, got {self.max_logprobs}")
