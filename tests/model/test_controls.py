"""Generation controls through the engine: stop sequences and strings, min_tokens, penalties,
logprobs, n samples from one prefill, the loop guard; rows without controls unchanged beside them.

The reference for greedy rows is the engine's own chunked prefill (``next_token_logits``, held
equal to a full forward in test_engine) re-run on prompt + output for each token, with the
control applied in numpy.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from model import control_ops
from model.controls import ENDED_LOOP, ENDED_NONE, ENDED_STOP_SEQUENCE, empty_controls
from model.engine import Engine, EngineStats, GenerationRequest
from testkit.tiny_model import random_params, tiny_config

CONFIG = tiny_config()
STEPS = 4


def detokenize(ids) -> str:
    """A stand-in text for ids (no tokenizer needed): each id as <id>."""
    return "".join(f"<{int(i)}>" for i in ids)


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG, seed=33)


@pytest.fixture(scope="module")
def engine(params):
    return Engine(
        CONFIG,
        params,
        max_slots=6,
        prefill_batch=2,
        prefill_chunk=8,
        decode_steps=STEPS,
        detokenize=detokenize,
    )


def request(rng_seed: int, /, **overrides) -> GenerationRequest:
    rng = np.random.default_rng(rng_seed)
    values = dict(
        prompt_ids=rng.integers(2, CONFIG.vocab_size, int(rng.integers(3, 14))).tolist(),
        max_new_tokens=12,
        stop_ids=(),
    )
    values.update(overrides)
    return GenerationRequest(**values)


def reference(engine: Engine, req: GenerationRequest) -> list[int]:
    """Greedy decoding token by token with the request's penalties and min_tokens in numpy."""
    ids, out = list(req.prompt_ids), []
    while len(out) < req.max_new_tokens:
        logits = engine.next_token_logits([ids + out])[0].astype(np.float64)
        if req.repetition_penalty != 1:
            seen = np.zeros(CONFIG.vocab_size, bool)
            seen[list(req.prompt_ids) + out] = True
            rp = req.repetition_penalty
            logits = np.where(seen, np.where(logits > 0, logits / rp, logits * rp), logits)
        counts = np.bincount(np.asarray(out, np.int64), minlength=CONFIG.vocab_size)
        logits = logits - req.frequency_penalty * counts - req.presence_penalty * (counts > 0)
        if len(out) < req.min_tokens:
            logits[list(req.stop_ids)] = -np.inf
        token = int(np.argmax(logits))
        if token in req.stop_ids:
            break
        out.append(token)
    return out


def test_stop_sequence_stops_the_row_on_the_device(engine) -> None:
    plain = engine.generate([request(1)])[0].token_ids
    seq = tuple(plain[4:6])
    end = next(i + len(seq) for i in range(len(plain)) if tuple(plain[i : i + len(seq)]) == seq)
    engine.stats = EngineStats()
    got = engine.generate([request(1, stop_sequences=(seq,))])[0]
    assert got.token_ids == plain[:end] and got.finish_reason == "stop"
    # Nothing generated past the stop (the stats count decode calls' tokens: all but the first).
    assert engine.stats.generated_tokens == end - 1
    # Before min_tokens a stop sequence does not match.
    late = engine.generate([request(1, stop_sequences=(seq,), min_tokens=end + 1)])[0]
    assert len(late.token_ids) > end


def test_stop_string_across_tokens_is_found_on_the_host(engine) -> None:
    plain = engine.generate([request(2)])[0].token_ids
    text = detokenize(plain)
    # A string spanning tokens 5 and 6 that the device's sequences do not spell.
    start = len(detokenize(plain[:5])) - 2
    stop = text[start : start + 4]
    first = min(
        m for m in range(1, len(plain) + 1) if stop in detokenize(plain[:m])
    )  # the token completing its first occurrence
    engine.stats = EngineStats()
    got = engine.generate([request(2, stop_strings=(stop,))])[0]
    assert got.token_ids == plain[:first] and got.finish_reason == "stop"
    assert got.output_tokens == first
    wasted = engine.stats.wasted_tokens
    assert engine.stats.generated_tokens + 1 == first + wasted  # the first token: the insert's
    assert 0 <= wasted <= STEPS - 1  # stopped after the call that completed it, not at the limit


def test_min_tokens_holds_back_the_stop_ids(engine) -> None:
    plain = engine.generate([request(3)])[0].token_ids
    k = next(i for i in range(1, 6) if plain[i] not in plain[:i])  # a token first drawn at k
    req = request(3, stop_ids=(plain[k],), min_tokens=6)
    got = engine.generate([req, request(3, stop_ids=(plain[k],))])
    assert got[1].token_ids == plain[:k] and got[1].finish_reason == "stop"
    assert len(got[0].token_ids) >= 6 and plain[k] not in got[0].token_ids[:6]
    assert got[0].token_ids == reference(engine, req)


@pytest.mark.parametrize(
    "controls",
    [
        dict(presence_penalty=1.5),
        dict(frequency_penalty=0.8),
        dict(repetition_penalty=1.7),
        dict(presence_penalty=-0.5, frequency_penalty=0.3, repetition_penalty=1.2),
    ],
)
def test_penalties_match_the_reference_and_leave_other_rows_alone(engine, controls) -> None:
    plain = [request(10 + i, max_new_tokens=14) for i in range(4)]
    alone = engine.generate(plain)
    penalised = [dataclasses.replace(r, **controls) for r in plain[:2]]
    mixed = engine.generate([plain[0], penalised[0], plain[1], penalised[1], plain[2], plain[3]])
    assert [mixed[i] for i in (0, 2, 4, 5)] == alone  # greedy rows unchanged beside them
    for req, got in zip(penalised, (mixed[1], mixed[3]), strict=True):
        assert got.token_ids == reference(engine, req)
    assert any(mixed[1 + 2 * i].token_ids != alone[i].token_ids for i in range(2))


def test_logprobs_are_the_raw_log_softmax(engine) -> None:
    req = request(4, logprobs=5, max_new_tokens=6)
    got, sampled = engine.generate([req, dataclasses.replace(req, temperature=1.5, seed=3)])
    ids = list(req.prompt_ids)
    for token, lp, top in zip(got.token_ids, got.logprobs, got.top_logprobs, strict=True):
        logits = engine.next_token_logits([ids])[0].astype(np.float64)
        lsm = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        assert lp == pytest.approx(lsm[token], abs=1e-4)
        assert [t for t, _ in top] == list(np.argsort(-lsm, kind="stable")[:5])
        assert [v for _, v in top] == pytest.approx(list(np.sort(lsm)[::-1][:5]), abs=1e-4)
        ids.append(token)
    assert len(sampled.logprobs) == len(sampled.token_ids) and len(sampled.top_logprobs[0]) == 5
    assert all(v <= 0 for v in sampled.logprobs)
    assert engine.generate([request(4)])[0].logprobs is None


def test_n_samples_share_one_prefill(engine) -> None:
    req = request(5, temperature=1.2, seed=11, n=4)
    engine.stats = EngineStats()
    got = engine.generate([req])[0]
    assert engine.stats.prompt_tokens == len(req.prompt_ids)  # prefilled once, not 4 times
    assert len(got.samples) == 4 and got.token_ids == got.samples[0].token_ids
    assert len({tuple(s.token_ids) for s in got.samples}) > 1  # each sample has its own seed
    one = engine.generate([dataclasses.replace(req, n=1)])[0]
    assert one.token_ids == got.samples[0].token_ids
    again = engine.generate([request(6), req, request(7, n=2, temperature=1.0)])
    assert again[1] == got  # deterministic, whatever shares the batch


def test_controls_compile_nothing_after_warmup(params) -> None:
    engine = Engine(CONFIG, params, max_slots=3, prefill_batch=2, prefill_chunk=8, decode_steps=2)
    engine.warmup()
    compiled = engine.compiled_shapes()
    engine.generate(
        [
            request(1, presence_penalty=0.5, logprobs=3, min_tokens=2, stop_ids=(5,)),
            request(2, n=3, temperature=0.8, repetition_penalty=1.3),
            request(3, stop_sequences=((7, 8),), loop_ngram=2, loop_repeats=3),
        ]
    )
    assert engine.compiled_shapes() == compiled


def test_bad_controls_are_error_results(engine) -> None:
    bad = [
        request(1, min_tokens=100),
        request(1, logprobs=21),
        request(1, repetition_penalty=0.0),
        request(1, n=7),
        request(1, stop_sequences=((1,) * 17,)),
        request(1, loop_ngram=3, loop_repeats=1),
    ]
    assert [r.finish_reason for r in engine.generate(bad)] == ["error"] * len(bad)


def test_loop_guard_and_stop_sequences_on_the_device_state() -> None:
    """``control_ops.ended`` on crafted histories: a loop of period 2 repeated 3 times, and a
    stop sequence at the end."""
    c = empty_controls(3, (2, 3), 64)
    c.loop_ngram[:2], c.loop_repeats[:2] = 2, 3
    c.stop_seqs[2, 0, 1:] = [5, 6]
    recent = np.full((3, 8), -1, np.int32)
    recent[0, :7] = [9, 1, 2, 1, 2, 1, 2]  # period 2 repeated 3 times: a loop
    recent[1, :7] = [9, 1, 2, 1, 3, 1, 2]  # broken
    recent[2, :4] = [4, 4, 5, 6]
    count = np.array([7, 7, 4], np.int32)
    codes = control_ops.ended(jnp.asarray(recent), jnp.asarray(count), c, 64)
    assert codes.tolist() == [ENDED_LOOP, ENDED_NONE, ENDED_STOP_SEQUENCE]
