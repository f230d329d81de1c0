"""RecurrentGemma in JAX/Flax: config, network, checkpoints, tokenizer.

The names below load on first use, so that ``import model.tokenizer`` (what the prompt and
toxicity stages need) does not pull JAX into every Ray worker.

A checkpoint in either released layout (:mod:`model.checkpoint`: Kaggle Orbax; :mod:`model.hf`:
Hugging Face safetensors), local or at any fsspec URI, and one forward pass::

    import jax.numpy as jnp
    import numpy as np
    from model import RecurrentGemma
    from model.checkpoint import load_checkpoint
    from model.tokenizer import Tokenizer

    ckpt = load_checkpoint("s3://my-bucket/recurrentgemma/2b-it", storage_options={...})
    tok = Tokenizer.load(ckpt.tokenizer_path)
    ids = np.array([tok.encode_prompt("Why is the sky blue?", chat=True)])
    logits, cache = RecurrentGemma(ckpt.config, dtype=jnp.bfloat16).apply(
        {"params": ckpt.params}, ids, np.arange(ids.shape[1])[None]
    )

Generation over many prompts is :class:`model.engine.Engine`; the per-device memory plan is
:mod:`model.memory`, the tensor-parallel split :mod:`model.sharding`.
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
