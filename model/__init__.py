"""RecurrentGemma in JAX/Flax: config, network, checkpoints, tokenizer.

The names below load on first use, so that ``import model.tokenizer`` (what the prompt and
toxicity stages need) does not pull JAX into every Ray worker.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "model.config",
    "Engine": "model.engine",
    "EngineConfig": "model.engine",
    "GenerationRequest": "model.engine",
    "GenerationResult": "model.engine",
    "Cache": "model.griffin",
    "RecurrentGemma": "model.griffin",
    "TokenRangeError": "model.griffin",
    "cache_bytes_per_sequence": "model.griffin",
    "check_token_ids": "model.griffin",
    "count_params": "model.griffin",
    "init_cache": "model.griffin",
    "param_shapes": "model.griffin",
    "MemoryPlan": "model.memory",
    "MemoryPlanError": "model.memory",
    "device_memory_limit": "model.memory",
    "max_slots_that_fit": "model.memory",
    "plan_memory": "model.memory",
    "check_tensor_parallel": "model.sharding",
    "make_mesh": "model.sharding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
