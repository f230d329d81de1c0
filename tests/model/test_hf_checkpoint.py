"""Hugging Face RecurrentGemma checkpoints load into the Flax tree and give HF's logits."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from oracle import official_griffin_config
from safetensors import safe_open
from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

from model import RecurrentGemma, hf
from model.config import ModelConfig

BLOCK_TYPES = ("recurrent", "attention", "recurrent", "recurrent", "attention")
WINDOW = 6  # ours / the official code's; HF's is WINDOW + 1
SEQ_LEN = 20  # longer than the window
TOLERANCE = 1e-4


def _hf_config(**overrides: Any) -> RecurrentGemmaConfig:
    kwargs: dict[str, Any] = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=2 * 96,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        lru_width=64,
        num_hidden_layers=len(BLOCK_TYPES),
        block_types=list(BLOCK_TYPES),
        attention_window_size=WINDOW + 1,
        conv1d_width=4,
        logits_soft_cap=30.0,
    )
    kwargs.update(overrides)
    return RecurrentGemmaConfig(**kwargs)


def _perturbed_hf_model(seed: int = 0) -> RecurrentGemmaForCausalLM:
    """A float32 HF model whose every parameter (norms and biases too) is away from its init."""
    torch.manual_seed(seed)
    model = RecurrentGemmaForCausalLM(_hf_config()).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def hf_model() -> RecurrentGemmaForCausalLM:
    return _perturbed_hf_model()


@pytest.fixture(scope="module")
def checkpoint(
    hf_model: RecurrentGemmaForCausalLM, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("hf-ckpt")
    hf_model.save_pretrained(path, max_shard_size="200KB")
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint: Path) -> tuple[ModelConfig, dict[str, Any]]:
    return hf.load_hf_checkpoint(str(checkpoint))


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 300, size=(3, SEQ_LEN), dtype=np.int32)


def _griffin(cfg: ModelConfig) -> Any:
    from recurrentgemma import jax as rg

    return rg.Griffin(official_griffin_config(cfg), gradient_checkpointing=False)


def _our_logits(cfg: ModelConfig, params: dict[str, Any], tokens: np.ndarray) -> np.ndarray:
    """Logits of the model under test: our RecurrentGemma."""
    segment_pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = jax.jit(RecurrentGemma(cfg).apply, static_argnames="return_cache")(
        {"params": params}, jnp.asarray(tokens), segment_pos, return_cache=False
    )
    return np.asarray(logits)


def _hf_logits(model: RecurrentGemmaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


# Logits -------------------------------------------------------------------------------------------
def test_sharded_checkpoint_matches_hf_logits(
    checkpoint: Path, loaded: tuple[ModelConfig, dict[str, Any]], hf_model, tokens
) -> None:
    assert (checkpoint / hf.INDEX_FILE).is_file()
    assert len(list(checkpoint.glob("*.safetensors"))) > 1
    cfg, params = loaded
    assert cfg.attention_window_size == WINDOW
    assert cfg.block_types == BLOCK_TYPES
    want = _hf_logits(hf_model, tokens)
    got = _our_logits(cfg, params, tokens)
    assert got.shape == want.shape == (3, SEQ_LEN, 300)
    assert float(np.std(want)) > 0.1, "logits should not be degenerate"
    diff = float(np.max(np.abs(got - want)))
    assert diff <= TOLERANCE, f"max |ours - HF| = {diff}"


def test_window_off_by_one_matters(loaded, hf_model, tokens) -> None:
    """Using HF's window unchanged would attend one key too many: the mapping is not a no-op."""
    cfg, params = loaded
    wrong = cfg.replace(attention_window_size=WINDOW + 1)
    diff = float(np.max(np.abs(_our_logits(wrong, params, tokens) - _hf_logits(hf_model, tokens))))
    assert diff > 100 * TOLERANCE


# Structure ----------------------------------------------------------------------------------------
def test_tree_matches_official_init(loaded: tuple[ModelConfig, dict[str, Any]]) -> None:
    cfg, params = loaded
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    variables = jax.eval_shape(
        lambda t: _griffin(cfg).init(jax.random.key(0), t, t, return_cache=False), tokens
    )
    official = jax.tree.map(lambda x: tuple(x.shape), variables["params"])
    ours = jax.tree.map(lambda x: tuple(x.shape), params)
    assert jax.tree.structure(ours) == jax.tree.structure(official)
    assert ours == official
    shape_tree = jax.tree.map(tuple, hf.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    assert shape_tree == official
    assert "blocks.0" in params
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))


def test_round_trip_to_hf_state_dict(loaded, hf_model) -> None:
    _, params = loaded
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    np.testing.assert_array_equal(state.pop("lm_head.weight"), state["model.embed_tokens.weight"])
    back = hf.params_to_hf_state_dict(params)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        assert back[name].shape == value.shape, name
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    assert all(v.flags.c_contiguous for v in back.values())


def test_hf_state_dict_to_params_accepts_torch_tensors(loaded, hf_model) -> None:
    cfg, params = loaded
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    again = hf.hf_state_dict_to_params(state, cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)


# Config -------------------------------------------------------------------------------------------
def test_config_round_trip(loaded) -> None:
    cfg, _ = loaded
    as_hf = hf.model_config_to_hf_config(cfg)
    assert hf.hf_config_to_model_config(as_hf) == cfg
    rebuilt = RecurrentGemmaConfig(**as_hf)
    reference = _hf_config()
    for name in ("layers_block_type", "sliding_window", "intermediate_size", "head_dim"):
        assert getattr(rebuilt, name) == getattr(reference, name), name
    assert rebuilt.rope_parameters["partial_rotary_factor"] == 0.5


def test_old_style_config_cycles_block_pattern() -> None:
    """Released checkpoints' config.json: ``_block_types`` is a cycle, rope keys at top level."""
    old = {
        "_block_types": ["recurrent", "recurrent", "attention"],
        "attention_window_size": 2048,
        "conv1d_width": 4,
        "embeddings_scale_by_sqrt_dim": True,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 2560,
        "intermediate_size": 15360,
        "logits_soft_cap": 30.0,
        "lru_width": 2560,
        "model_type": "recurrent_gemma",
        "num_attention_heads": 10,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "vocab_size": 256000,
    }
    cfg = hf.hf_config_to_model_config(old)
    assert cfg == ModelConfig.from_preset("2b").replace(attention_window_size=2047)


def test_dtype_cast(checkpoint: Path) -> None:
    _, params = hf.load_hf_checkpoint(str(checkpoint), dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}


def test_bf16_checkpoint_keeps_dtype_and_raw_reader_agrees(hf_model, tmp_path: Path) -> None:
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path)
    assert (tmp_path / hf.WEIGHTS_FILE).is_file()
    _, params = hf.load_hf_checkpoint(str(tmp_path))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    with safe_open(str(tmp_path / hf.WEIGHTS_FILE), framework="np") as f:
        name = "model.layers.0.temporal_block.conv_1d.weight"
        via_safetensors = f.get_tensor(name)
    raw = hf._read_raw_tensor(tmp_path / hf.WEIGHTS_FILE, name)
    assert raw.dtype == ml_dtypes.bfloat16 and raw.shape == via_safetensors.shape
    np.testing.assert_array_equal(raw, via_safetensors)


class _NoBf16SafeOpen:
    """Stands in for an old safetensors whose numpy framework cannot make bfloat16 arrays."""

    def __init__(self, path: str, framework: str) -> None:
        self._inner = safe_open(path, framework=framework)

    def __enter__(self) -> _NoBf16SafeOpen:
        self._file = self._inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def get_tensor(self, name: str) -> np.ndarray:
        value = self._file.get_tensor(name)
        if value.dtype == ml_dtypes.bfloat16:
            raise TypeError("data type 'bfloat16' not understood")
        return value


def test_bf16_fallback_for_old_safetensors(hf_model, tmp_path: Path, monkeypatch) -> None:
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path)
    cfg, expected = hf.load_hf_checkpoint(str(tmp_path))
    monkeypatch.setattr(hf, "safe_open", _NoBf16SafeOpen)
    cfg_again, params = hf.load_hf_checkpoint(str(tmp_path))
    assert cfg_again == cfg
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}


def test_loads_from_s3(checkpoint: Path, loaded, s3_bucket, tmp_path, monkeypatch) -> None:
    import s3fs

    bucket, options = s3_bucket
    monkeypatch.setenv("RGBATCH_CACHE_DIR", str(tmp_path / "cache"))
    s3fs.S3FileSystem(**options).put(str(checkpoint) + "/", f"{bucket}/ckpt", recursive=True)
    cfg, params = hf.load_hf_checkpoint(f"s3://{bucket}/ckpt", storage_options=options)
    assert cfg == loaded[0]
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


# Errors -------------------------------------------------------------------------------------------
def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "ckpt"
    shutil.copytree(checkpoint, dest)
    return dest


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        hf.load_hf_checkpoint(str(tmp_path / "nope"))


def test_missing_config(checkpoint: Path, tmp_path: Path) -> None:
    path = _copy(checkpoint, tmp_path)
    (path / hf.CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        hf.load_hf_checkpoint(str(path))


def test_missing_weights(checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "config-only"
    path.mkdir()
    shutil.copy(checkpoint / hf.CONFIG_FILE, path)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        hf.load_hf_checkpoint(str(path))


def test_missing_shard(checkpoint: Path, tmp_path: Path) -> None:
    path = _copy(checkpoint, tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shard.name)):
        hf.load_hf_checkpoint(str(path))


def test_multi_query_kv_heads_rejected(checkpoint: Path, tmp_path: Path) -> None:
    path = _copy(checkpoint, tmp_path)
    config = json.loads((path / hf.CONFIG_FILE).read_text())
    config["num_key_value_heads"] = 2
    (path / hf.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        hf.load_hf_checkpoint(str(path))


def test_unexpected_and_missing_tensors(loaded, hf_model) -> None:
    cfg, _ = loaded
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    extra = {**state, "model.layers.0.temporal_block.q_proj.bias": np.zeros(64, np.float32)}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.temporal_block\.q_proj\.bias"):
        hf.hf_state_dict_to_params(extra, cfg)
    missing = dict(state)
    del missing["model.layers.4.temporal_block.o_proj.bias"]
    with pytest.raises(ValueError, match=r"model\.layers\.4\.temporal_block\.o_proj\.bias"):
        hf.hf_state_dict_to_params(missing, cfg)
    untied = {**state, "lm_head.weight": state["lm_head.weight"] + 1}
    with pytest.raises(ValueError, match="lm_head"):
        hf.hf_state_dict_to_params(untied, cfg)
    wrong_shape = {**state, "model.final_norm.weight": np.zeros(65, np.float32)}
    with pytest.raises(ValueError, match=r"model\.final_norm\.weight"):
        hf.hf_state_dict_to_params(wrong_shape, cfg)
