"""Model configuration and the released presets.

Field names follow the official ``GriffinConfig`` where the two overlap, so a config can be read
side by side with Google's code and the Hugging Face port.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Literal

BlockType = Literal["recurrent", "attention"]
BLOCK_TYPES: tuple[str, ...] = ("recurrent", "attention")

GEMMA_VOCAB_SIZE = 256_000


def _griffin_pattern(num_layers: int) -> tuple[str, ...]:
    """Blocks cycle recurrent, recurrent, attention (the released models' pattern)."""
    cycle = itertools.cycle(("recurrent", "recurrent", "attention"))
    return tuple(itertools.islice(cycle, num_layers))


_PRESETS: dict[str, dict[str, Any]] = {
    "2b": dict(width=2560, num_layers=26, num_heads=10),
    "9b": dict(width=4096, num_layers=38, num_heads=16),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a RecurrentGemma (Griffin) network.

    Attributes:
      vocab_size: Number of tokens in the vocabulary (embedding rows).
      width: Model dimension d.
      mlp_expanded_width: Hidden width of the gated MLP.
      num_heads: Attention query heads; also the number of diagonal blocks in the RG-LRU gates.
      block_types: One entry per residual block, "recurrent" or "attention".
      embeddings_scale_by_sqrt_dim: Multiply embeddings by sqrt(width) (rounded to bfloat16).
      attention_window_size: Local attention window W: a query at position q attends q-W..q.
      logits_soft_cap: tanh soft cap on the logits; 0 disables it.
      lru_width: Width of the recurrent branch; None means ``width``.
      conv1d_temporal_width: Taps of the causal depthwise convolution before the RG-LRU.
    """

    vocab_size: int
    width: int
    mlp_expanded_width: int
    num_heads: int
    block_types: tuple[str, ...]
    embeddings_scale_by_sqrt_dim: bool = True
    attention_window_size: int = 2048
    logits_soft_cap: float = 30.0
    lru_width: int | None = None
    conv1d_temporal_width: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_types", tuple(self.block_types))
        for name in ("vocab_size", "width", "mlp_expanded_width", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_window_size < 1:
            raise ValueError(
                f"ModelConfig.attention_window_size must be >= 1, got {self.attention_window_size}"
            )
        if self.conv1d_temporal_width < 1:
            raise ValueError(
                f"ModelConfig.conv1d_temporal_width must be >= 1, got {self.conv1d_temporal_width}"
            )
        if not self.block_types:
            raise ValueError("ModelConfig.block_types must name at least one block")
        for i, kind in enumerate(self.block_types):
            if kind not in BLOCK_TYPES:
                raise ValueError(
                    f"ModelConfig.block_types[{i}] is {kind!r}; expected one of {BLOCK_TYPES}"
                )
        if self.width % self.num_heads:
            raise ValueError(
                f"ModelConfig.width ({self.width}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.recurrent_width % self.num_heads:
            raise ValueError(
                f"ModelConfig.lru_width ({self.recurrent_width}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"ModelConfig head_dim (width / num_heads = {self.head_dim}) must be divisible "
                "by 4 for rotary embeddings on its first half"
            )

    # Derived values ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.block_types)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def recurrent_width(self) -> int:
        return self.lru_width or self.width

    @property
    def embedding_scale(self) -> float:
        """sqrt(width) rounded to bfloat16, as the released checkpoints were trained with."""
        if not self.embeddings_scale_by_sqrt_dim:
            return 1.0
        return _round_to_bfloat16(math.sqrt(self.width))

    # Construction --------------------------------------------------------------------------------
    @classmethod
    def presets(cls) -> tuple[str, ...]:
        return tuple(sorted({f"{name}{suffix}" for name in _PRESETS for suffix in ("", "-it")}))

    @classmethod
    def from_preset(cls, name: str, *, vocab_size: int = GEMMA_VOCAB_SIZE) -> ModelConfig:
        """Config of a released checkpoint: "2b", "2b-it", "9b" or "9b-it"."""
        base = name.removesuffix("-it")
        if name not in cls.presets():
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(cls.presets())}")
        spec = _PRESETS[base]
        width = spec["width"]
        return cls(
            vocab_size=vocab_size,
            width=width,
            mlp_expanded_width=3 * width,
            num_heads=spec["num_heads"],
            block_types=_griffin_pattern(spec["num_layers"]),
            embeddings_scale_by_sqrt_dim=True,
            attention_window_size=2048,
            logits_soft_cap=30.0,
            lru_width=width,
        )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["block_types"] = list(self.block_types)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**data)


def griffin_pattern(num_layers: int) -> tuple[str, ...]:
    """The released models' block pattern (recurrent, recurrent, attention, ...) for n layers."""
    return _griffin_pattern(num_layers)


def _round_to_bfloat16(value: float) -> float:
    import numpy as np
    from ml_dtypes import bfloat16

    return float(np.asarray(value, dtype=np.float32).astype(bfloat16).astype(np.float32))
