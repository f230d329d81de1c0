"""Checkpoint I/O: the Kaggle Orbax layout, validation against a config, and config inference.

Kaggle layout (as released): one Orbax checkpoint directory per variant, the tokenizer beside them::

    recurrentgemma/
      2b/            Orbax PyTree checkpoint of the params (keys "embedder", "blocks.0", ...)
      2b-it/
      tokenizer.model

Reads work with the current orbax-checkpoint (whose ``metadata()`` returns a StepMetadata), from a
local path or any fsspec URI; remote checkpoints are copied once into the local cache first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import jax
import numpy as np

from model.config import GEMMA_VOCAB_SIZE, ModelConfig
from model.griffin import param_shapes
from model.storage import is_local, localize

log = logging.getLogger(__name__)

Params = dict[str, Any]
TOKENIZER_FILE = "tokenizer.model"


class CheckpointMismatchError(ValueError):
    """A checkpoint whose parameter tree or shapes do not fit the config."""


class Checkpoint(NamedTuple):
    """A loaded checkpoint: its config, params (host numpy arrays), tokenizer path if found."""

    config: ModelConfig
    params: Params
    tokenizer_path: Path | None
    variant: str


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


def load_params(
    uri: str | os.PathLike[str],
    config: ModelConfig | None = None,
    *,
    dtype: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> Params:
    """Reads an Orbax params checkpoint (one variant directory) into host numpy arrays.

    Args:
      uri: The variant directory, local or any fsspec URI.
      config: When given, the tree and every shape must fit it (CheckpointMismatchError names the
        first key that does not).
      dtype: Cast every array to this dtype (e.g. "bfloat16"); None keeps the stored dtypes.
      storage_options: fsspec options for a remote URI.
    """
    ocp = _orbax()
    path = localize(uri, storage_options=storage_options).absolute()
    if not (path / "_METADATA").exists() and not (path / "checkpoint").exists():
        raise FileNotFoundError(f"{uri} is not an Orbax checkpoint directory (no _METADATA)")
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
    if tree is None:
        tree = getattr(metadata, "item_metadata", metadata)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    params = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    params = _plain_dicts(params)
    if config is not None:
        check_params(params, config)
    if dtype is not None:
        params = cast_params(params, dtype)
    return params


def save_params(
    params: Params,
    uri: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Writes params as an Orbax checkpoint directory that :func:`load_params` (and Kaggle's
    layout) reads, to a local path or any fsspec URI."""
    ocp = _orbax()
    host_params = jax.tree.map(np.asarray, params)
    uri = os.fspath(uri)
    if is_local(uri):
        path = Path(uri.removeprefix("file://")).absolute()
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"checkpoint already exists: {path}")
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ocp.PyTreeCheckpointer().save(path, host_params)
        return
    fs, remote = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if fs.exists(remote) and not overwrite:
        raise FileExistsError(f"checkpoint already exists: {uri}")
    with tempfile.TemporaryDirectory(prefix="rgbatch-save-") as tmp:
        local = Path(tmp) / "ckpt"
        ocp.PyTreeCheckpointer().save(local, host_params)
        fs.put(str(local) + "/", remote.rstrip("/") + "/", recursive=True)


def check_params(params: Params, config: ModelConfig) -> None:
    """Raises CheckpointMismatchError at the first key whose presence or shape differs."""
    expected = _flatten(param_shapes(config))
    actual = _flatten(params)
    for key in sorted(set(expected) | set(actual)):
        if key not in actual:
            raise CheckpointMismatchError(
                f"checkpoint lacks parameter {key!r} (expected shape {expected[key].shape})"
            )
        if key not in expected:
            raise CheckpointMismatchError(
                f"checkpoint has unexpected parameter {key!r} (shape {actual[key].shape}) "
                "for this config"
            )
        if tuple(actual[key].shape) != tuple(expected[key].shape):
            raise CheckpointMismatchError(
                f"parameter {key!r} has shape {tuple(actual[key].shape)} in the checkpoint but "
                f"{tuple(expected[key].shape)} in the config"
            )


def cast_params(params: Params, dtype: Any) -> Params:
    return jax.tree.map(lambda x: np.asarray(x).astype(np.dtype(dtype)), params)


def infer_config(params: Params, **overrides: Any) -> ModelConfig:
    """Derives a ModelConfig from a parameter tree.

    The window, soft cap and embedding scaling are not visible in the weights; they default to the
    released models' values (2048, 30.0, True) unless given in ``overrides``.
    """
    num_layers = sum(1 for key in params if key.startswith("blocks."))
    block_types = []
    num_heads = lru_width = conv_width = None
    for i in range(num_layers):
        block = params[f"blocks.{i}"]
        if "recurrent_block" in block:
            block_types.append("recurrent")
            rec = block["recurrent_block"]
            num_heads = np.shape(rec["rg_lru"]["input_gate"]["w"])[0]
            lru_width = np.shape(rec["linear_x"]["kernel"])[1]
            conv_width = np.shape(rec["conv_1d"]["w"])[0]
        else:
            block_types.append("attention")
    vocab_size, width = np.shape(params["embedder"]["input_embedding"])
    if num_heads is None:  # attention only: heads from the query projection and head_dim
        attn = params[f"blocks.{block_types.index('attention')}"]["attention_block"]
        num_heads = width // np.shape(attn["proj_k"]["kernel"])[1]
    mlp = np.shape(params["blocks.0"]["mlp_block"]["ffw_up"]["w"])[2]
    values: dict[str, Any] = dict(
        vocab_size=int(vocab_size),
        width=int(width),
        mlp_expanded_width=int(mlp),
        num_heads=int(num_heads),
        block_types=tuple(block_types),
        lru_width=int(lru_width) if lru_width is not None else None,
        conv1d_temporal_width=int(conv_width) if conv_width is not None else 4,
    )
    values.update(overrides)
    return ModelConfig(**values)


def load_checkpoint(
    uri: str | os.PathLike[str],
    *,
    config: ModelConfig | None = None,
    dtype: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> Checkpoint:
    """Loads a checkpoint in either released layout, with its config and tokenizer.

    ``uri`` may be a Kaggle variant directory (``.../2b-it``; the tokenizer is read from its parent)
    or a Hugging Face directory (config.json + safetensors). Without ``config`` it comes from the
    preset named by the variant directory, else from the weights (:func:`infer_config`). A config
    file ``rgbatch_config.json`` beside the params overrides both (the test fixtures write one).
    """
    local = localize(uri, storage_options=storage_options)
    variant = Path(os.fspath(uri).rstrip("/")).name
    if (local / "config.json").exists():
        from model.hf import load_hf_checkpoint

        hf_config, params = load_hf_checkpoint(local, dtype=dtype)
        config = config or hf_config
        check_params(params, config)
        tokenizer = local / TOKENIZER_FILE
        return Checkpoint(config, params, tokenizer if tokenizer.exists() else None, variant)
    params = load_params(local, dtype=dtype)
    if config is None:
        config = _config_for_variant(local, variant, params)
    check_params(params, config)
    tokenizer = find_tokenizer(uri, storage_options)
    return Checkpoint(config, params, tokenizer, variant)


def fingerprint(params: Params) -> str:
    """A short content hash of a parameter tree (shapes, dtypes and a sample of every array)."""
    digest = hashlib.sha256()
    for key, value in sorted(_flatten(params).items()):
        arr = np.asarray(value)
        digest.update(f"{key}:{arr.shape}:{arr.dtype}".encode())
        digest.update(np.ascontiguousarray(arr.reshape(-1)[:4096]).tobytes())
    return digest.hexdigest()[:16]


def _config_for_variant(local: Path, variant: str, params: Params) -> ModelConfig:
    override = local / "rgbatch_config.json"
    if override.exists():
        return ModelConfig.from_dict(json.loads(override.read_text()))
    if variant in ModelConfig.presets():
        vocab = np.shape(params["embedder"]["input_embedding"])[0]
        return ModelConfig.from_preset(variant, vocab_size=int(vocab or GEMMA_VOCAB_SIZE))
    log.warning(
        "variant %r is not a preset and has no rgbatch_config.json: inferring the config from the "
        "weights (window 2048, soft cap 30)",
        variant,
    )
    return infer_config(params)


def find_tokenizer(
    uri: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> Path | None:
    """Local path of the tokenizer.model that belongs to a checkpoint: inside its directory
    (Hugging Face layout) or beside it (Kaggle layout). None when there is none."""
    uri = os.fspath(uri).rstrip("/")
    for candidate in (f"{uri}/{TOKENIZER_FILE}", f"{uri.rsplit('/', 1)[0]}/{TOKENIZER_FILE}"):
        try:
            return localize(candidate, storage_options=storage_options)
        except FileNotFoundError:
            continue
    log.warning("no %s in or beside %s", TOKENIZER_FILE, uri)
    return None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _plain_dicts(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _plain_dicts(v) for k, v in tree.items()}
    return tree
