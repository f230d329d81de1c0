"""RecurrentGemma in JAX/Flax: config, network, checkpoints, tokenizer."""

from model.config import ModelConfig
from model.engine import Engine, EngineConfig, GenerationRequest, GenerationResult
from model.griffin import (
    Cache,
    RecurrentGemma,
    TokenRangeError,
    cache_bytes_per_sequence,
    check_token_ids,
    count_params,
    init_cache,
    param_shapes,
)

__all__ = [
    "Cache",
    "Engine",
    "EngineConfig",
    "GenerationRequest",
    "GenerationResult",
    "ModelConfig",
    "RecurrentGemma",
    "TokenRangeError",
    "cache_bytes_per_sequence",
    "check_token_ids",
    "count_params",
    "init_cache",
    "param_shapes",
]
