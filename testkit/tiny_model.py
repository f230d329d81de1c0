"""The tiny model: offline stand-ins for real checkpoints, shared by the tests and ``make run-local``.

Everything here goes through the same code paths as a released checkpoint: the params are written
in the Kaggle Orbax layout with ``tokenizer.model`` beside them, and loaded back with
:func:`model.checkpoint.load_checkpoint`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.checkpoint import TOKENIZER_FILE, Params, save_params
from model.config import ModelConfig
from model.griffin import RecurrentGemma
from testkit.tiny_tokenizer import train_tiny_tokenizer

TINY_VOCAB = 512
TINY_VARIANT = "tiny-it"


def tiny_config(**overrides: Any) -> ModelConfig:
    """Five blocks mixing both kinds, a window shorter than typical test sequences, 4 heads."""
    values: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB,
        width=64,
        mlp_expanded_width=96,
        num_heads=4,
        block_types=("recurrent", "attention", "recurrent", "recurrent", "attention"),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=8,
        logits_soft_cap=30.0,
        lru_width=64,
    )
    values.update(overrides)
    return ModelConfig(**values)


def random_params(
    config: ModelConfig, seed: int = 0, *, perturb: float = 0.1, dtype: Any = np.float32
) -> Params:
    """Random params in the official tree, as host numpy arrays.

    ``perturb`` adds noise to every array, norm scales and biases included (they initialise to
    zero), so that a test comparing two implementations exercises every weight.
    """
    model = RecurrentGemma(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = jax.jit(lambda key: model.init(key, tokens, tokens, None, False)["params"])(
        jax.random.key(seed)
    )
    rng = np.random.default_rng(seed)

    def noisy(x: jax.Array) -> np.ndarray:
        arr = np.asarray(x, np.float32)
        if perturb:
            arr = arr + perturb * rng.standard_normal(arr.shape).astype(np.float32)
        return arr.astype(np.dtype(dtype))

    return jax.tree.map(noisy, params)


def write_kaggle_checkpoint(
    root: str | os.PathLike[str],
    params: Params,
    config: ModelConfig,
    *,
    variant: str = TINY_VARIANT,
    tokenizer_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Writes ``root/<variant>/`` (Orbax) and ``root/tokenizer.model``; returns the variant dir.

    A non-preset variant also gets ``rgbatch_config.json`` so its window and soft cap survive.
    """
    root = Path(root)
    variant_dir = root / variant
    save_params(params, variant_dir, overwrite=True)
    if variant not in ModelConfig.presets():
        (variant_dir / "rgbatch_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    tokenizer = root / TOKENIZER_FILE
    if tokenizer_path is not None:
        tokenizer.write_bytes(Path(tokenizer_path).read_bytes())
    else:
        train_tiny_tokenizer(tokenizer, vocab_size=config.vocab_size)
    return variant_dir


def build_tiny_checkpoint(root: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """The tiny model used by tests and ``make run-local``, written in the Kaggle layout."""
    config = tiny_config()
    return write_kaggle_checkpoint(root, random_params(config, seed), config)


def left_padded_batch(sequences: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment_pos) [b, t] with each sequence right-aligned and pads at position -1."""
    t = max(len(s) for s in sequences)
    tokens = np.full((len(sequences), t), pad_id, np.int32)
    positions = np.full((len(sequences), t), -1, np.int32)
    for row, seq in enumerate(sequences):
        if seq:
            tokens[row, t - len(seq) :] = seq
            positions[row, t - len(seq) :] = np.arange(len(seq))
    return tokens, positions
