"""Checkpoint I/O in the Kaggle layout, presets at full size, and the errors bad input gets."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import s3fs

from model import (
    ModelConfig,
    RecurrentGemma,
    TokenRangeError,
    cache_bytes_per_sequence,
    count_params,
    param_shapes,
)
from model.checkpoint import (
    CheckpointMismatchError,
    check_params,
    fingerprint,
    infer_config,
    load_checkpoint,
    load_params,
    save_params,
)
from model.tokenizer import Tokenizer
from testkit.tiny_model import random_params, tiny_config, write_kaggle_checkpoint


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    return config, random_params(config, seed=4)


def assert_bit_identical(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


# Presets at full size, without allocating them ----------------------------------------------------
@pytest.mark.parametrize(("preset", "expected"), [("2b", 2_682_862_080), ("9b-it", 8_579_977_216)])
def test_preset_parameter_counts_equal_the_official_ones(preset: str, expected: int) -> None:
    assert count_params(param_shapes(ModelConfig.from_preset(preset))) == expected


@pytest.mark.parametrize("preset", ["2b", "9b"])
def test_cache_bytes_per_sequence_are_fixed_and_reported(preset: str, capsys) -> None:
    config = ModelConfig.from_preset(preset)
    got = cache_bytes_per_sequence(config, jnp.bfloat16)
    n_attn = config.block_types.count("attention")
    n_rec = config.num_layers - n_attn
    r, w, h = config.recurrent_width, config.attention_window_size, config.head_dim
    # per recurrent block: float32 RG-LRU state + bf16 conv taps; per attention block: bf16 K and V
    # ring buffers + int32 slot positions.
    expected = n_rec * (4 * r + 2 * 3 * r) + n_attn * (2 * 2 * w * h + 4 * w)
    assert got == expected
    with capsys.disabled():
        print(f"\n{preset}: cache bytes per sequence (bfloat16) = {got:,}")


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown preset '3b'.*2b, 2b-it, 9b, 9b-it"):
        ModelConfig.from_preset("3b")


def test_bad_config_values_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"block_types\[1\]"):
        tiny_config(block_types=("recurrent", "mamba"))
    with pytest.raises(ValueError, match="num_heads"):
        tiny_config(num_heads=3)


def test_token_ids_outside_the_vocabulary_raise(tiny) -> None:
    config, params = tiny
    model = RecurrentGemma(config)
    tokens = np.array([[5, config.vocab_size]], np.int32)
    with pytest.raises(TokenRangeError, match=rf"token id {config.vocab_size} at index \(0, 1\)"):
        model.apply({"params": params}, tokens, np.arange(2)[None])
    with pytest.raises(TokenRangeError, match="token id -1"):
        model.apply({"params": params}, np.array([[-1]]), np.zeros((1, 1), np.int32))
    # Under jit, where no host check can run, an out-of-range id poisons its sequence's logits
    # with NaN instead of silently reading another embedding row; other rows are unaffected.
    batch = np.array([[5, config.vocab_size], [5, 6]], np.int32)
    logits, _ = jax.jit(model.apply)({"params": params}, batch, np.tile(np.arange(2), (2, 1)))
    logits = np.asarray(logits)
    assert np.isnan(logits[0, 1]).all() and np.isfinite(logits[1]).all()


# Kaggle layout round trips ------------------------------------------------------------------------
def test_kaggle_layout_round_trip_is_bit_identical(tmp_path, tiny) -> None:
    config, params = tiny
    variant_dir = write_kaggle_checkpoint(tmp_path / "ckpt", params, config, variant="2b-tiny")
    assert (tmp_path / "ckpt" / "tokenizer.model").is_file()

    assert_bit_identical(load_params(variant_dir, config), params)
    loaded = load_checkpoint(variant_dir)
    assert loaded.config == config
    assert loaded.variant == "2b-tiny"
    assert_bit_identical(loaded.params, params)
    assert Tokenizer.load(loaded.tokenizer_path).vocab_size == config.vocab_size
    assert fingerprint(loaded.params) == fingerprint(params)


def test_bfloat16_checkpoint_round_trips_and_casts(tmp_path, tiny) -> None:
    _, params = tiny
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    save_params(params16, tmp_path / "bf16")
    assert_bit_identical(load_params(tmp_path / "bf16"), jax.tree.map(np.asarray, params16))
    as32 = load_params(tmp_path / "bf16", dtype="float32")
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(as32))


def test_save_refuses_to_overwrite(tmp_path, tiny) -> None:
    _, params = tiny
    save_params(params, tmp_path / "p")
    with pytest.raises(FileExistsError):
        save_params(params, tmp_path / "p")


def test_s3_round_trip_is_bit_identical(tmp_path, tiny, s3_bucket, monkeypatch) -> None:
    config, params = tiny
    bucket, options = s3_bucket
    monkeypatch.setenv("RGBATCH_CACHE_DIR", str(tmp_path / "cache"))
    local = write_kaggle_checkpoint(tmp_path / "ckpt", params, config, variant="tiny-it")
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(tmp_path / "ckpt") + "/", f"{bucket}/models/", recursive=True)

    uri = f"s3://{bucket}/models/tiny-it"
    loaded = load_checkpoint(uri, storage_options=options)
    assert loaded.config == config
    assert_bit_identical(loaded.params, params)
    assert loaded.tokenizer_path is not None
    assert loaded.tokenizer_path.read_bytes() == (local.parent / "tokenizer.model").read_bytes()

    # save_params writes straight to object storage too; a second load hits the local cache.
    save_params(params, f"s3://{bucket}/direct/p", storage_options=options)
    assert_bit_identical(load_params(f"s3://{bucket}/direct/p", storage_options=options), params)
    fs.rm(f"{bucket}/direct", recursive=True)
    assert_bit_identical(load_params(f"s3://{bucket}/direct/p", storage_options=options), params)


# Mismatches ---------------------------------------------------------------------------------------
def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, tiny) -> None:
    config, params = tiny
    save_params(params, tmp_path / "p")
    wider = config.replace(mlp_expanded_width=128)
    with pytest.raises(CheckpointMismatchError) as err:
        load_params(tmp_path / "p", wider)
    message = str(err.value)
    assert "'blocks.0/mlp_block/ffw_down/kernel'" in message
    assert "(96, 64) in the checkpoint" in message and "(128, 64) in the config" in message


def test_tree_mismatch_names_the_missing_or_extra_key(tiny) -> None:
    config, params = tiny
    with pytest.raises(CheckpointMismatchError, match=r"lacks parameter 'blocks\.5/"):
        check_params(params, config.replace(block_types=(*config.block_types, "recurrent")))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected parameter 'blocks\.1/attention"):
        check_params(params, config.replace(block_types=("recurrent",) * 5))


def test_missing_checkpoint_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_params(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not an Orbax checkpoint"):
        load_params(tmp_path / "empty")


def test_infer_config_recovers_the_architecture(tiny) -> None:
    config, params = tiny
    inferred = infer_config(params, attention_window_size=config.attention_window_size)
    assert inferred == config


def test_variant_config_file_is_plain_json(tmp_path, tiny) -> None:
    config, params = tiny
    variant_dir = write_kaggle_checkpoint(tmp_path, params, config, variant="tiny-it")
    data = json.loads((variant_dir / "rgbatch_config.json").read_text())
    assert ModelConfig.from_dict(data) == config
