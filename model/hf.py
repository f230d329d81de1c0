"""Hugging Face RecurrentGemma checkpoints <-> the official Flax parameter tree.

A Hugging Face checkpoint is a directory with ``config.json`` and safetensors weights, either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``. The parameter tree is
the one the official ``recurrentgemma.jax.Griffin`` uses (without the outer ``"params"`` key)::

    embedder/input_embedding                     [vocab, width]
    final_norm/scale                             [width]
    blocks.{i}/temporal_pre_norm/scale           (``"blocks.0"`` is one key, dot included)
    blocks.{i}/channel_pre_norm/scale
    blocks.{i}/mlp_block/ffw_up/{w [2, width, mlp], b [2, 1, 1, mlp]}
    blocks.{i}/mlp_block/ffw_down/{kernel, bias}
    blocks.{i}/recurrent_block/{linear_x, linear_y, linear_out}/{kernel, bias}
    blocks.{i}/recurrent_block/conv_1d/{w [temporal_width, lru_width], b}
    blocks.{i}/recurrent_block/rg_lru/{a_param, input_gate/{w, b}, a_gate/{w, b}}
    blocks.{i}/attention_block/{proj_q, proj_k, proj_v}/kernel
    blocks.{i}/attention_block/proj_final/{kernel, bias}

Layout differences: torch linear weights are [out, in] (transposed here); the MLP's stacked
``ffw_up`` is HF's ``gate_proj`` (index 0) and ``up_proj`` (index 1); the depthwise conv weight is
[lru_width, 1, temporal_width] in torch, same tap order; ``lm_head`` is tied to the embeddings.

Window: HF lets a query see ``attention_window_size`` keys (itself included), the official code
sees ``attention_window_size + 1``; so ours is HF's minus one: a released HF config (2048) loads
with a window of 2047, which is what HF computes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from model.config import ModelConfig
from model.storage import localize

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_HF_MODEL_TYPE = "recurrent_gemma"
_HF_DEFAULT_PATTERN = ("recurrent", "recurrent", "attention")
_ROPE_THETA = 10_000.0
_LM_HEAD = "lm_head.weight"
_EMBED = "model.embed_tokens.weight"


# Public API ---------------------------------------------------------------------------------------
def load_hf_checkpoint(
    uri: str, *, storage_options: dict[str, Any] | None = None, dtype: Any = None
) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads a HF RecurrentGemma checkpoint directory (local path or fsspec URI).

    Returns our config and the official Flax parameter tree as nested dicts of numpy arrays, cast
    to ``dtype`` when given, else in the stored dtype.
    """
    root = localize(uri, storage_options=storage_options)
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no Hugging Face config at {config_path}")
    cfg = hf_config_to_model_config(json.loads(config_path.read_text()))
    tensors = (item for shard in _weight_files(root) for item in _read_safetensors(shard))
    return cfg, _convert(tensors, cfg, dtype)


def hf_state_dict_to_params(
    state_dict: Mapping[str, Any], cfg: ModelConfig, *, dtype: Any = None
) -> dict[str, Any]:
    """Maps HF tensor names/layouts (numpy arrays or anything np.asarray takes) to our tree."""
    return _convert(((name, np.asarray(t)) for name, t in state_dict.items()), cfg, dtype)


def params_to_hf_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse mapping: HF names and layouts, contiguous numpy arrays, no tied ``lm_head``."""
    if set(params) == {"params"}:
        params = params["params"]
    out: dict[str, np.ndarray] = {}
    for spec in _specs(_block_kinds(params)):
        value = np.asarray(_get(params, spec.path))
        if spec.slot is not None:
            value = value[spec.slot]
        out[spec.hf_name] = np.ascontiguousarray(_to_hf(value, spec.layout))
    return out


def hf_config_to_model_config(hf: Mapping[str, Any]) -> ModelConfig:
    """Our config from a HF ``config.json`` dict (new and old transformers spellings)."""
    missing = [k for k in _REQUIRED_HF_KEYS if hf.get(k) is None]
    if missing:
        raise ValueError(f"Hugging Face config lacks {missing}")
    _check_hf_config(hf)
    intermediate = int(hf["intermediate_size"])
    if intermediate % 2:
        raise ValueError(f"intermediate_size {intermediate} is odd; HF splits it gate/up in two")
    pattern = hf.get("block_types") or hf.get("_block_types") or _HF_DEFAULT_PATTERN
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        width=int(hf["hidden_size"]),
        mlp_expanded_width=intermediate // 2,
        num_heads=int(hf["num_attention_heads"]),
        block_types=tuple(itertools.islice(itertools.cycle(pattern), hf["num_hidden_layers"])),
        embeddings_scale_by_sqrt_dim=bool(hf.get("embeddings_scale_by_sqrt_dim", True)),
        attention_window_size=int(hf.get("attention_window_size", 2048)) - 1,
        logits_soft_cap=float(hf.get("logits_soft_cap") or 0.0),
        lru_width=hf.get("lru_width"),
        conv1d_temporal_width=int(hf.get("conv1d_width", 4)),
    )


def model_config_to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A HF ``config.json`` dict for ``cfg`` (readable by old and new transformers)."""
    if not cfg.embeddings_scale_by_sqrt_dim:
        raise ValueError("HF RecurrentGemma always scales embeddings by sqrt(width)")
    if not cfg.logits_soft_cap:
        raise ValueError(
            "HF RecurrentGemma always soft-caps logits; logits_soft_cap=0 is not supported"
        )
    return {
        "architectures": ["RecurrentGemmaForCausalLM"],
        "model_type": _HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": 2 * cfg.mlp_expanded_width,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": 1,
        "head_dim": cfg.head_dim,
        "lru_width": cfg.recurrent_width,
        "block_types": list(cfg.block_types),
        "attention_window_size": cfg.attention_window_size + 1,
        "conv1d_width": cfg.conv1d_temporal_width,
        "logits_soft_cap": cfg.logits_soft_cap,
        "embeddings_scale_by_sqrt_dim": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "partial_rotary_factor": 0.5,
        "rope_theta": _ROPE_THETA,
        "attention_bias": False,
        "tie_word_embeddings": True,
    }


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """The official tree's shapes (tuples) for ``cfg``."""
    from model.griffin import param_shapes as abstract_params

    return jax.tree.map(lambda leaf: tuple(leaf.shape), abstract_params(cfg))


# Config checks ------------------------------------------------------------------------------------
_REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
)


def _check_hf_config(hf: Mapping[str, Any]) -> None:
    """Rejects HF configs whose network the official Griffin cannot express."""
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    kv_heads = hf.get("num_key_value_heads")
    checks = {
        "model_type": (hf.get("model_type", _HF_MODEL_TYPE), _HF_MODEL_TYPE),
        "num_key_value_heads": (heads if kv_heads is None else kv_heads, 1),
        "head_dim": (hf.get("head_dim", hf["hidden_size"] // heads), hf["hidden_size"] // heads),
        "partial_rotary_factor": (
            rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)),
            0.5,
        ),
        "rope_theta": (
            float(rope.get("rope_theta", hf.get("rope_theta", _ROPE_THETA))),
            _ROPE_THETA,
        ),
        "rope_type": (rope.get("rope_type", "default"), "default"),
        "hidden_activation": (
            hf.get("hidden_activation", "gelu_pytorch_tanh"),
            "gelu_pytorch_tanh",
        ),
        "rms_norm_eps": (hf.get("rms_norm_eps", 1e-6), 1e-6),
        "attention_bias": (bool(hf.get("attention_bias", False)), False),
        "tie_word_embeddings": (bool(hf.get("tie_word_embeddings", True)), True),
    }
    for key, (got, want) in checks.items():
        if got != want:
            raise ValueError(f"unsupported Hugging Face config: {key}={got!r} (need {want!r})")


# Tensor name and layout table ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    """One HF tensor: its name, where it lives in our tree, and how its layout differs."""

    hf_name: str
    path: tuple[str, ...]
    layout: str = "same"  # "same" | "linear" (transposed) | "conv" | "bias_row" (ffw_up b)
    slot: int | None = None  # index into a stacked leaf of ours (ffw_up)


def _specs(block_kinds: Iterable[str]) -> list[_Spec]:
    specs = [
        _Spec(_EMBED, ("embedder", "input_embedding")),
        _Spec("model.final_norm.weight", ("final_norm", "scale")),
    ]
    for i, kind in enumerate(block_kinds):
        specs += _block_specs(f"model.layers.{i}", f"blocks.{i}", kind)
    return specs


def _block_specs(hf: str, ours: str, kind: str) -> list[_Spec]:
    mlp = (ours, "mlp_block")
    specs = [
        _Spec(f"{hf}.temporal_pre_norm.weight", (ours, "temporal_pre_norm", "scale")),
        _Spec(f"{hf}.channel_pre_norm.weight", (ours, "channel_pre_norm", "scale")),
        _Spec(f"{hf}.mlp_block.gate_proj.weight", (*mlp, "ffw_up", "w"), "linear", 0),
        _Spec(f"{hf}.mlp_block.up_proj.weight", (*mlp, "ffw_up", "w"), "linear", 1),
        _Spec(f"{hf}.mlp_block.gate_proj.bias", (*mlp, "ffw_up", "b"), "bias_row", 0),
        _Spec(f"{hf}.mlp_block.up_proj.bias", (*mlp, "ffw_up", "b"), "bias_row", 1),
        *_dense_specs(f"{hf}.mlp_block.down_proj", (*mlp, "ffw_down")),
    ]
    if kind == "recurrent":
        return specs + _recurrent_specs(f"{hf}.temporal_block", (ours, "recurrent_block"))
    return specs + _attention_specs(f"{hf}.temporal_block", (ours, "attention_block"))


def _dense_specs(hf: str, ours: tuple[str, ...], bias: bool = True) -> list[_Spec]:
    specs = [_Spec(f"{hf}.weight", (*ours, "kernel"), "linear")]
    return [*specs, _Spec(f"{hf}.bias", (*ours, "bias"))] if bias else specs


def _recurrent_specs(hf: str, ours: tuple[str, ...]) -> list[_Spec]:
    lru = (*ours, "rg_lru")
    return [
        *_dense_specs(f"{hf}.linear_x", (*ours, "linear_x")),
        *_dense_specs(f"{hf}.linear_y", (*ours, "linear_y")),
        *_dense_specs(f"{hf}.linear_out", (*ours, "linear_out")),
        _Spec(f"{hf}.conv_1d.weight", (*ours, "conv_1d", "w"), "conv"),
        _Spec(f"{hf}.conv_1d.bias", (*ours, "conv_1d", "b")),
        _Spec(f"{hf}.rg_lru.recurrent_param", (*lru, "a_param")),
        _Spec(f"{hf}.rg_lru.input_gate_weight", (*lru, "input_gate", "w")),
        _Spec(f"{hf}.rg_lru.input_gate_bias", (*lru, "input_gate", "b")),
        _Spec(f"{hf}.rg_lru.recurrent_gate_weight", (*lru, "a_gate", "w")),
        _Spec(f"{hf}.rg_lru.recurrent_gate_bias", (*lru, "a_gate", "b")),
    ]


def _attention_specs(hf: str, ours: tuple[str, ...]) -> list[_Spec]:
    return [
        *_dense_specs(f"{hf}.q_proj", (*ours, "proj_q"), bias=False),
        *_dense_specs(f"{hf}.k_proj", (*ours, "proj_k"), bias=False),
        *_dense_specs(f"{hf}.v_proj", (*ours, "proj_v"), bias=False),
        *_dense_specs(f"{hf}.o_proj", (*ours, "proj_final")),
    ]


def _block_kinds(params: Mapping[str, Any]) -> list[str]:
    count = sum(1 for key in params if key.startswith("blocks."))
    kinds = []
    for i in range(count):
        block = params[f"blocks.{i}"]
        kinds.append("recurrent" if "recurrent_block" in block else "attention")
    return kinds


# Layout transforms -------------------------------------------------------------------------------
def _to_ours(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return value.T
    if layout == "conv":  # [D, 1, W] -> [W, D]
        return value[:, 0, :].T
    if layout == "bias_row":  # [m] -> [1, 1, m]
        return value.reshape(1, 1, -1)
    return value


def _to_hf(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return value.T
    if layout == "conv":  # [W, D] -> [D, 1, W]
        return value.T[:, None, :]
    if layout == "bias_row":
        return value.reshape(-1)
    return value


# Conversion ---------------------------------------------------------------------------------------
def _convert(
    tensors: Iterable[tuple[str, np.ndarray]], cfg: ModelConfig, dtype: Any
) -> dict[str, Any]:
    """Places each HF tensor as it arrives (so a shard's memory can go before the next loads)."""
    specs = {spec.hf_name: spec for spec in _specs(cfg.block_types)}
    shapes = param_shapes(cfg)
    target = None if dtype is None else np.dtype(dtype)
    tree: dict[str, Any] = {}
    slots: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    lm_head = None
    for name, value in tensors:
        if name == _LM_HEAD:
            lm_head = value
            continue
        spec = specs.pop(name, None)
        if spec is None:
            raise ValueError(f"unexpected tensor {name!r} in the Hugging Face checkpoint")
        value = _place(value, spec, shapes, target)
        if spec.slot is None:
            _set(tree, spec.path, value)
        else:
            slots.setdefault(spec.path, {})[spec.slot] = value
    if specs:
        raise ValueError(f"Hugging Face checkpoint lacks tensors: {sorted(specs)}")
    for path, pieces in slots.items():
        _set(tree, path, np.stack([pieces[k] for k in sorted(pieces)]))
    if lm_head is not None:
        _check_tied(lm_head, tree, target)
    return tree


def _place(value: np.ndarray, spec: _Spec, shapes: dict[str, Any], target: Any) -> np.ndarray:
    value = _to_ours(value, spec.layout)
    want = tuple(_get(shapes, spec.path))
    if spec.slot is not None:
        want = want[1:]
    if value.shape != want:
        raise ValueError(
            f"tensor {spec.hf_name!r} has shape {value.shape} after layout change, expected {want}"
        )
    if target is not None:
        value = value.astype(target, copy=False)
    return np.ascontiguousarray(value)


def _check_tied(lm_head: np.ndarray, tree: dict[str, Any], target: Any) -> None:
    embed = tree["embedder"]["input_embedding"]
    head = lm_head if target is None else lm_head.astype(target, copy=False)
    if head.shape != embed.shape or not np.array_equal(head, embed):
        raise ValueError(f"{_LM_HEAD!r} differs from {_EMBED!r}; only tied heads are supported")


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# Files --------------------------------------------------------------------------------------------
def _weight_files(root: Path) -> list[Path]:
    index = root / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [root / name for name in names]
    else:
        files = [root / WEIGHTS_FILE]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"no safetensors weights at {path}")
    return files


_ST_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ML_DTYPES = {"BF16", "F8_E4M3", "F8_E5M2"}


def _read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields a file's tensors; falls back to raw bytes for bf16/fp8 where safetensors can't."""
    header: dict[str, Any] | None = None
    with safe_open(str(path), framework="np") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            try:
                value = f.get_tensor(name)
            except Exception:
                header = header if header is not None else _read_header(path)[0]
                if header[name]["dtype"] not in _ML_DTYPES:
                    raise
                value = _read_raw_tensor(path, name)
            yield name, value


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and the byte offset where tensor data begins."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_raw_tensor(path: Path, name: str) -> np.ndarray:
    """Reads one tensor from its bytes (numpy + ml_dtypes), independent of safetensors' version."""
    header, data_start = _read_header(path)
    entry = header[name]
    dtype = np.dtype(_ST_DTYPES[entry["dtype"]])
    begin, end = entry["data_offsets"]
    count = (end - begin) // dtype.itemsize
    flat = np.fromfile(path, dtype=dtype, count=count, offset=data_start + begin)
    return flat.reshape(entry["shape"])
