"""The continuous-batching engine against a plain full-forward reference."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from model import RecurrentGemma
from model.engine import Engine, GenerationRequest, GenerationResult
from testkit.tiny_model import random_params, tiny_config

CONFIG = tiny_config()  # window 8
REF_LEN = 64  # the reference runs every sequence left-padded to this length: one compile


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG, seed=21)


@pytest.fixture(scope="module")
def engine(params):
    """4 slots, prefill 2 x 8-token chunks, 3 decode steps per call: everything gets exercised."""
    return Engine(CONFIG, params, max_slots=4, prefill_batch=2, prefill_chunk=8, decode_steps=3)


@pytest.fixture(scope="module")
def full_forward(params):
    forward = jax.jit(RecurrentGemma(CONFIG).apply, static_argnames="return_cache")

    def next_logits(ids: list[int]) -> np.ndarray:
        assert len(ids) <= REF_LEN
        tokens = np.zeros((1, REF_LEN), np.int32)
        positions = np.full((1, REF_LEN), -1, np.int32)
        tokens[0, -len(ids) :] = ids
        positions[0, -len(ids) :] = np.arange(len(ids))
        logits, _ = forward({"params": params}, tokens, positions, return_cache=False)
        return np.asarray(logits)[0, -1]

    return next_logits


def reference_greedy(full_forward, request: GenerationRequest) -> GenerationResult:
    """Decodes one request alone, token by token, re-running the full forward each time."""
    ids, out = list(request.prompt_ids), []
    while len(out) < request.max_new_tokens:
        token = int(np.argmax(full_forward(ids)))
        if token in request.stop_ids:
            return GenerationResult(out, "stop", len(request.prompt_ids), len(out))
        out.append(token)
        ids.append(token)
    return GenerationResult(out, "length", len(request.prompt_ids), len(out))


def random_requests(rng_seed: int, n: int, **overrides) -> list[GenerationRequest]:
    rng = np.random.default_rng(rng_seed)
    requests = []
    for _ in range(n):
        length = int(rng.integers(1, 30))  # 1 .. past the window (8) and several prefill chunks
        values = dict(
            prompt_ids=rng.integers(2, CONFIG.vocab_size, length).tolist(),
            max_new_tokens=int(rng.integers(1, 16)),
            stop_ids=(),
        )
        values.update(overrides)
        requests.append(GenerationRequest(**values))
    return requests


def test_greedy_equals_full_forward_reference(engine, full_forward) -> None:
    requests = random_requests(0, 14)  # more requests than slots (4) and prefill rows (2)
    results = engine.generate(requests)
    for request, result in zip(requests, results, strict=True):
        assert result == reference_greedy(full_forward, request)
    lengths = [len(r.prompt_ids) for r in requests]
    assert min(lengths) <= 3 and max(lengths) > 2 * CONFIG.attention_window_size


def test_stop_ids_first_and_in_the_middle(engine, full_forward) -> None:
    base = random_requests(1, 3, max_new_tokens=12)
    free_run = [reference_greedy(full_forward, r) for r in base]
    first_stop = dataclasses.replace(base[0], stop_ids=(free_run[0].token_ids[0],))
    middle = free_run[1].token_ids[4]
    cut = free_run[1].token_ids.index(middle)
    middle_stop = dataclasses.replace(base[1], stop_ids=(middle, CONFIG.vocab_size - 1))
    results = engine.generate([first_stop, middle_stop, base[2]])

    assert results[0] == GenerationResult([], "stop", len(base[0].prompt_ids), 0)
    assert results[1].finish_reason == "stop"
    assert results[1].token_ids == free_run[1].token_ids[:cut]
    assert results[2] == free_run[2]


def test_chunked_prefill_gives_one_shot_logits(params, full_forward) -> None:
    rng = np.random.default_rng(2)
    prompts = [rng.integers(2, CONFIG.vocab_size, n).tolist() for n in (1, 7, 8, 9, 33, 60)]
    for chunk in (4, 8, 64):
        engine = Engine(CONFIG, params, max_slots=2, prefill_batch=3, prefill_chunk=chunk)
        got = engine.next_token_logits(prompts)
        want = np.stack([full_forward(p) for p in prompts])
        assert np.max(np.abs(got - want)) <= 1e-5, chunk


def test_sampling_depends_only_on_seed_and_prompt(params) -> None:
    sampled = random_requests(3, 6, temperature=0.9, top_k=40, top_p=0.9, max_new_tokens=10)
    sampled = [dataclasses.replace(r, seed=100 + i) for i, r in enumerate(sampled)]
    fillers = random_requests(4, 9, temperature=1.3, seed=7)

    alone = Engine(CONFIG, params, max_slots=1, prefill_batch=1, prefill_chunk=8, decode_steps=2)
    reference = alone.generate(sampled)
    mixed = Engine(CONFIG, params, max_slots=5, prefill_batch=3, prefill_chunk=16, decode_steps=4)
    interleaved = [r for pair in zip(fillers, sampled, strict=False) for r in pair] + fillers[6:]
    results = mixed.generate(interleaved)
    got = [results[interleaved.index(r)] for r in sampled]
    assert got == reference
    # Different seeds really draw differently (the test above is not vacuous).
    reseeded = alone.generate([dataclasses.replace(r, seed=r.seed + 1) for r in sampled])
    assert [r.token_ids for r in reseeded] != [r.token_ids for r in reference]


def test_top_k_one_equals_greedy(engine) -> None:
    greedy = random_requests(5, 5)
    top1 = [dataclasses.replace(r, temperature=1.0, top_k=1, seed=i) for i, r in enumerate(greedy)]
    assert engine.generate(top1) == engine.generate(greedy)


def test_top_p_tiny_equals_greedy(engine) -> None:
    greedy = random_requests(6, 4)
    nucleus = [dataclasses.replace(r, temperature=2.0, top_p=1e-6, seed=9) for r in greedy]
    assert engine.generate(nucleus) == engine.generate(greedy)


def test_no_recompilation_after_warmup(params) -> None:
    engine = Engine(CONFIG, params, max_slots=3, prefill_batch=2, prefill_chunk=8, decode_steps=2)
    engine.warmup()
    compiled = engine.compiled_shapes()
    assert compiled == 3  # one prefill, one insert, one decode
    for seed, n in ((7, 1), (8, 5), (9, 11)):
        engine.generate(random_requests(seed, n, temperature=0.5, top_k=3))
        engine.generate(random_requests(seed, n))
    assert engine.compiled_shapes() == compiled


def test_bad_requests_become_error_results(engine, full_forward) -> None:
    good = random_requests(10, 2)
    bad = [
        GenerationRequest([], max_new_tokens=3),
        GenerationRequest([5, CONFIG.vocab_size], max_new_tokens=3),
        GenerationRequest([5, -1], max_new_tokens=3),
        GenerationRequest([5, 6], max_new_tokens=0),
        GenerationRequest([5, 6], max_new_tokens=3, top_p=0.0),
    ]
    results = engine.generate([bad[0], good[0], *bad[1:], good[1]])
    errors = [results[0], *results[2:6]]
    assert all(r.finish_reason == "error" and r.error and r.token_ids == [] for r in errors)
    assert "empty prompt" in errors[0].error
    assert f"token id {CONFIG.vocab_size} is outside the vocabulary" in errors[1].error
    assert "token id -1" in errors[2].error
    assert "max_new_tokens must be >= 1" in errors[3].error
    assert results[1] == reference_greedy(full_forward, good[0])
    assert results[6] == reference_greedy(full_forward, good[1])


def test_prompt_limit_is_config(params) -> None:
    engine = Engine(CONFIG, params, max_slots=2, max_prompt_tokens=10, prefill_chunk=8)
    short, long = GenerationRequest([3] * 10, 2), GenerationRequest([3] * 11, 2)
    results = engine.generate([short, long])
    assert results[0].finish_reason == "length"
    assert results[1].finish_reason == "error" and "max_prompt_tokens=10" in results[1].error


def test_stream_yields_in_finish_order_with_indices(engine) -> None:
    requests = [
        GenerationRequest([5, 6, 7], max_new_tokens=14, stop_ids=()),
        GenerationRequest([8], max_new_tokens=1, stop_ids=()),
    ]
    order = [index for index, _ in engine.stream(requests)]
    assert order == [1, 0]


@pytest.mark.slow
def test_long_document_prefills_in_chunks_like_one_shot(params) -> None:
    """A 3000-token prompt through 64-token chunks: same continuation as a one-shot prefill."""
    rng = np.random.default_rng(12)
    prompt = rng.integers(2, CONFIG.vocab_size, 3000).astype(np.int32)
    engine = Engine(CONFIG, params, max_slots=2, prefill_batch=1, prefill_chunk=64)
    (result,) = engine.generate([GenerationRequest(prompt.tolist(), 6, stop_ids=())])

    apply = jax.jit(RecurrentGemma(CONFIG).apply)
    logits, cache = apply({"params": params}, prompt[None], np.arange(len(prompt))[None])
    expected = []
    for step in range(6):
        token = int(np.argmax(np.asarray(logits)[0, -1]))
        expected.append(token)
        position = np.array([[len(prompt) + step]], np.int32)
        logits, cache = apply({"params": params}, np.array([[token]], np.int32), position, cache)
    assert result.token_ids == expected and result.finish_reason == "length"


def test_decode_hands_back_as_soon_as_a_prefill_batch_fits(params) -> None:
    """Slots that finish are refilled at once, not after decode_steps: 4 slots, budgets of 5,
    32 steps allowed per call. Each wave of 4 needs 4 decode steps (the first token comes from
    the prefill), so two waves take exactly 8 steps and no slot-step is wasted."""
    engine = Engine(CONFIG, params, max_slots=4, prefill_batch=2, prefill_chunk=8, decode_steps=32)
    requests = [GenerationRequest([2, 3 + i], max_new_tokens=5, stop_ids=()) for i in range(8)]
    results = engine.generate(requests)
    assert [r.output_tokens for r in results] == [5] * 8
    assert engine.stats.decode_steps == 8
    assert engine.stats.generated_tokens == 8 * 4
    assert engine.stats.decode_fill(4) == 1.0


@pytest.mark.parametrize(("lookahead", "token_slots"), [(1, 48), (64, 32)])
def test_prompts_of_similar_length_are_prefilled_together(
    params, full_forward, lookahead: int, token_slots: int
) -> None:
    """Arrival order long, short, long, short in 4-token chunks, 2 rows per prefill: pairing by
    length costs 3 + 1 chunks of 2 x 4 token slots; arrival order costs 3 + 3. Outputs are the
    same either way."""
    engine = Engine(
        CONFIG,
        params,
        max_slots=4,
        prefill_batch=2,
        prefill_chunk=4,
        decode_steps=4,
        length_lookahead=lookahead,
    )
    rng = np.random.default_rng(5)
    lengths = (12, 1, 11, 2)
    requests = [
        GenerationRequest(rng.integers(3, CONFIG.vocab_size, n).tolist(), 3, stop_ids=())
        for n in lengths
    ]
    results = engine.generate(requests)
    assert engine.stats.prefill_token_slots == token_slots
    assert engine.stats.prompt_tokens == sum(lengths)
    assert results == [reference_greedy(full_forward, r) for r in requests]


def test_the_oldest_queued_prompt_is_never_passed_over(params) -> None:
    """Similar lengths go together, but every admission includes the oldest queued prompt,
    however its length compares to the rest: nothing waits forever."""
    engine = Engine(CONFIG, params, max_slots=2, prefill_batch=2, prefill_chunk=8, decode_steps=2)
    lengths = [20, 1, 1, 1, 1, 19, 1, 1, 21]
    for key, n in enumerate(lengths):
        engine.submit(key, GenerationRequest([5] * n, max_new_tokens=2, stop_ids=()))
    admissions = []
    while engine.busy:
        queued = [key for key, _ in engine._pending]
        engine.step()
        still = {key for key, _ in engine._pending}
        admitted = [key for key in queued if key not in still]
        if admitted:
            assert min(queued) in admitted
            admissions.append(sorted(admitted))
    assert sorted(k for group in admissions for k in group) == list(range(len(lengths)))
    assert [0, 5] in admissions  # the two long ones paired up, ahead of shorts that came first


def test_256_mixed_requests_equal_the_reference(params, full_forward) -> None:
    """Greedy rows among sampled ones, stop ids, budgets of 1, prompts from 1 token to several
    chunks, more requests than slots many times over: every greedy result equals the reference
    loop's, and nothing compiles after warm-up."""
    engine = Engine(CONFIG, params, max_slots=8, prefill_batch=4, prefill_chunk=8, decode_steps=4)
    engine.warmup()
    compiled = engine.compiled_shapes()
    rng = np.random.default_rng(256)
    requests = random_requests(20, 256)
    for i, request in enumerate(requests):
        kind = i % 4
        if kind == 1:  # sampled: changes which slots free up when, not the greedy tokens
            requests[i] = dataclasses.replace(
                request, temperature=0.8, top_k=int(rng.integers(0, 40)), top_p=0.9, seed=i
            )
        elif kind == 2:  # a stop id: one the free run draws (when it runs long enough)
            free_run = reference_greedy(full_forward, request).token_ids
            stop = free_run[len(free_run) // 2] if len(free_run) > 1 else CONFIG.vocab_size - 1
            requests[i] = dataclasses.replace(request, stop_ids=(stop,))
        elif kind == 3 and i % 8 == 3:
            requests[i] = dataclasses.replace(request, max_new_tokens=1)
    results = engine.generate(requests)
    greedy = [i for i, r in enumerate(requests) if r.temperature == 0]
    for i in greedy:
        assert results[i] == reference_greedy(full_forward, requests[i]), i
    sampled = [results[i] for i, r in enumerate(requests) if r.temperature > 0]
    assert all(r.finish_reason == "length" for r in sampled)  # stop_ids=() on those
    assert sum(r.finish_reason == "stop" for r in results) > 0
    assert engine.compiled_shapes() == compiled == 3
