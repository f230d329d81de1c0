"""Our Flax RecurrentGemma against the official package, and cached decoding against the full
forward pass."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import recurrentgemma.jax as official
from oracle import official_griffin_config

from model import ModelConfig, RecurrentGemma, count_params
from model.griffin import fuse_params
from testkit.tiny_model import left_padded_batch, random_params, tiny_config

CONFIGS = {
    "mixed-5": tiny_config(),
    "attention-first-6": tiny_config(
        block_types=("attention", "recurrent", "recurrent", "attention", "recurrent", "attention"),
        num_heads=2,
        attention_window_size=5,
        lru_width=48,
        mlp_expanded_width=80,
    ),
    "griffin-7-no-scale": tiny_config(
        block_types=("recurrent", "recurrent", "attention") * 2 + ("recurrent",),
        width=96,
        num_heads=6,
        lru_width=96,
        attention_window_size=3,
        embeddings_scale_by_sqrt_dim=False,
        logits_soft_cap=0.0,
        vocab_size=300,
    ),
}


def official_logits(config: ModelConfig, params, tokens, segment_pos) -> np.ndarray:
    griffin_config = official_griffin_config(config)
    model = official.Griffin(griffin_config, gradient_checkpointing=False)
    logits, _ = jax.jit(model.apply)({"params": params}, tokens, segment_pos)
    return np.asarray(logits)


def random_sequences(rng: np.random.Generator, lengths: list[int], vocab: int) -> list[list[int]]:
    return [rng.integers(1, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("scan_impl", ["linear", "associative"])
def test_logits_match_official_on_left_padded_batch(name: str, scan_impl: str) -> None:
    config = CONFIGS[name]
    params = random_params(config, seed=len(name))
    rng = np.random.default_rng(1)
    lengths = [23, 17, 9, 2, 1]
    assert max(lengths) > config.attention_window_size
    tokens, segment_pos = left_padded_batch(random_sequences(rng, lengths, config.vocab_size))

    expected = official_logits(config, params, tokens, segment_pos)
    ours, _ = jax.jit(RecurrentGemma(config, scan_impl=scan_impl).apply)(
        {"params": params}, tokens, segment_pos
    )

    assert ours.dtype == jnp.float32 and ours.shape == (5, 23, config.vocab_size)
    real = segment_pos >= 0
    assert np.max(np.abs(np.asarray(ours)[real] - expected[real])) <= 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_serving_layout_matches_official(name: str) -> None:
    """fuse_params + RecurrentGemma(fused=True), what the engine runs, against the official
    model on the checkpoint layout; the fused tree keeps every value of the original."""
    config = CONFIGS[name]
    params = random_params(config, seed=len(name) + 1)
    fused = fuse_params(params)
    assert count_params(fused) == count_params(params)
    rng = np.random.default_rng(2)
    tokens, segment_pos = left_padded_batch(random_sequences(rng, [19, 12, 1], config.vocab_size))
    expected = official_logits(config, params, tokens, segment_pos)
    ours, _ = jax.jit(RecurrentGemma(config, fused=True).apply)(
        {"params": fused}, tokens, segment_pos
    )
    real = segment_pos >= 0
    assert np.max(np.abs(np.asarray(ours)[real] - expected[real])) <= 1e-4


def test_logits_match_official_with_packed_segments() -> None:
    config = CONFIGS["mixed-5"]
    params = random_params(config, seed=3)
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, config.vocab_size, (2, 20)).astype(np.int32)
    segment_pos = np.stack(
        [np.r_[np.arange(12), np.arange(8)], np.r_[np.arange(5), np.arange(15)]]
    ).astype(np.int32)
    expected = official_logits(config, params, tokens, segment_pos)
    ours, _ = jax.jit(RecurrentGemma(config).apply)({"params": params}, tokens, segment_pos)
    assert np.max(np.abs(np.asarray(ours) - expected)) <= 1e-4


def _decode(model, params, tokens, segment_pos, bounds):
    apply, cache, outs = jax.jit(model.apply), None, []
    for start, stop in bounds:
        logits, cache = apply(
            {"params": params}, tokens[:, start:stop], segment_pos[:, start:stop], cache
        )
        outs.append(np.asarray(logits))
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_by_step_decoding_equals_full_forward(name: str) -> None:
    config = CONFIGS[name]
    params = random_params(config, seed=7)
    model = RecurrentGemma(config)
    rng = np.random.default_rng(3)
    length = 3 * config.attention_window_size + 4
    tokens, segment_pos = left_padded_batch(
        random_sequences(rng, [length, length - 5, 2], config.vocab_size)
    )
    full, _ = jax.jit(model.apply)({"params": params}, tokens, segment_pos)
    steps = _decode(model, params, tokens, segment_pos, [(t, t + 1) for t in range(length)])
    real = segment_pos >= 0
    assert np.max(np.abs(steps[real] - np.asarray(full)[real])) <= 1e-5


@pytest.mark.parametrize("chunks", [(1, 5, 16), (9, 2, 3, 17), (20, 11)])
def test_chunked_continuation_equals_full_forward(chunks: tuple[int, ...]) -> None:
    """Chunks shorter and longer than the window (8), left pads inside the first chunk."""
    config = tiny_config()
    params = random_params(config, seed=11)
    model = RecurrentGemma(config)
    rng = np.random.default_rng(4)
    total = sum(chunks)
    tokens, segment_pos = left_padded_batch(
        random_sequences(rng, [total, total - 1, total - 3], config.vocab_size)
    )
    full, _ = jax.jit(model.apply)({"params": params}, tokens, segment_pos)
    bounds = np.cumsum((0, *chunks))
    chunked = _decode(model, params, tokens, segment_pos, list(itertools.pairwise(bounds)))
    real = segment_pos >= 0
    assert np.max(np.abs(chunked[real] - np.asarray(full)[real])) <= 1e-5


def test_left_pads_do_not_change_a_sequence_through_decoding() -> None:
    """A 1- or 2-token prompt padded into a batch decodes exactly as it does alone."""
    config = tiny_config()
    params = random_params(config, seed=5)
    model = RecurrentGemma(config)
    rng = np.random.default_rng(6)
    prompts = random_sequences(rng, [12, 1, 2], config.vocab_size)
    continuation = rng.integers(1, config.vocab_size, (3, 10)).astype(np.int32)
    tokens, segment_pos = left_padded_batch(prompts)
    apply = jax.jit(model.apply)
    _, cache = apply({"params": params}, tokens, segment_pos)
    batched = []
    for step in range(continuation.shape[1]):
        pos = segment_pos[:, -1:] + 1 + step
        logits, cache = apply({"params": params}, continuation[:, step : step + 1], pos, cache)
        batched.append(np.asarray(logits)[:, 0])
    for row, prompt in enumerate(prompts):
        alone = np.asarray(prompt + continuation[row].tolist(), np.int32)[None]
        logits, _ = apply({"params": params}, alone, np.arange(alone.shape[1])[None])
        expected = np.asarray(logits)[0, len(prompt) :]
        got = np.stack([b[row] for b in batched])
        assert np.max(np.abs(got - expected)) <= 1e-5


def test_new_segment_in_a_cached_call_forgets_the_old_one() -> None:
    config = tiny_config()
    params = random_params(config, seed=8)
    model = RecurrentGemma(config)
    rng = np.random.default_rng(9)
    first = rng.integers(1, config.vocab_size, (1, 11)).astype(np.int32)
    second = rng.integers(1, config.vocab_size, (1, 6)).astype(np.int32)
    apply = jax.jit(model.apply)
    _, cache = apply({"params": params}, first, np.arange(11)[None])
    restarted, _ = apply({"params": params}, second, np.arange(6)[None], cache)
    fresh, _ = apply({"params": params}, second, np.arange(6)[None])
    assert np.max(np.abs(np.asarray(restarted) - np.asarray(fresh))) <= 1e-5


def test_bfloat16_compute_tracks_float32_and_params_may_differ_in_dtype() -> None:
    config = tiny_config()
    params32 = random_params(config, seed=2)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    rng = np.random.default_rng(0)
    tokens, segment_pos = left_padded_batch(random_sequences(rng, [14, 6], config.vocab_size))
    real = segment_pos >= 0

    f32 = jax.jit(RecurrentGemma(config).apply)
    ref, _ = f32({"params": params32}, tokens, segment_pos)
    f32_from_bf16, _ = f32({"params": params16}, tokens, segment_pos)
    bf16, cache = jax.jit(RecurrentGemma(config, dtype=jnp.bfloat16).apply)(
        {"params": params32}, tokens, segment_pos
    )
    assert bf16.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    assert cache["blocks.1"].keys.dtype == jnp.bfloat16
    assert cache["blocks.0"].rg_lru_state.dtype == jnp.float32
    ref, bf16, f32_from_bf16 = (np.asarray(a)[real] for a in (ref, bf16, f32_from_bf16))
    # Rounding the weights or the activations to bfloat16 moves logits by ~1e-1, not more.
    assert np.max(np.abs(bf16 - ref)) <= 0.5
    assert np.max(np.abs(f32_from_bf16 - ref)) <= 0.5
    assert np.mean(np.argmax(bf16, -1) == np.argmax(ref, -1)) >= 0.9
