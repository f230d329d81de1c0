"""Shared-prefix reuse: the prefix cache on its own, and the engine with and without reuse."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from model import RecurrentGemma
from model.engine import Engine, EngineStats, GenerationRequest, GenerationResult
from model.griffin import cache_bytes_per_sequence
from model.prefix_cache import PrefixCache, tree_nbytes
from testkit.tiny_model import random_params, tiny_config

CONFIG = tiny_config()  # window 8
SHAPES = dict(max_slots=4, prefill_batch=2, prefill_chunk=8, decode_steps=3)
REF_LEN = 64
ROOT = Path(__file__).resolve().parents[2]


# The cache alone ----------------------------------------------------------------------------------
def state(nbytes: int) -> dict:
    return {"a": np.zeros(nbytes // 4, np.float32)}


def test_lru_order_and_get_refreshes() -> None:
    cache = PrefixCache(300)
    for key in "abc":
        assert cache.put(key, state(100), tokens=5) is not None
    assert list(cache) == ["a", "b", "c"] and cache.nbytes == 300
    assert cache.get("a").tokens == 5  # a is now the most recent: b goes first
    cache.put("d", state(100), tokens=1)
    assert list(cache) == ["c", "a", "d"] and cache.evictions == 1
    assert "b" not in cache and cache.get("b") is None
    cache.touch(["c", "zz"])  # held keys move to the end, unknown ones are ignored
    assert list(cache) == ["a", "d", "c"]
    assert "a" in cache and list(cache) == ["a", "d", "c"]  # membership is not a use


def test_bytes_never_above_the_budget() -> None:
    cache = PrefixCache(1000)
    rng = np.random.default_rng(0)
    for i in range(200):
        cache.put(i % 37, state(4 * int(rng.integers(1, 120))), tokens=i)
        assert cache.nbytes <= 1000
        assert cache.nbytes == sum(cache.get(k).nbytes for k in cache)
    assert cache.evictions > 0
    assert cache.put("huge", state(1004), tokens=1) is None  # over the whole budget: refused
    assert "huge" not in cache and cache.nbytes <= 1000


def test_replacing_a_key_and_capacity() -> None:
    cache = PrefixCache(250)
    cache.put("a", state(100), tokens=1)
    cache.put("a", state(200), tokens=2)
    assert len(cache) == 1 and cache.nbytes == 200 and cache.get("a").tokens == 2
    assert cache.pop("a").nbytes == 200 and cache.nbytes == 0 and cache.evictions == 0
    assert cache.capacity(100) == 2 and cache.capacity(251) == 0
    cache.put("b", state(100), tokens=1)
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    assert tree_nbytes({"x": (np.zeros(3, np.int32), [np.zeros(2, np.float64)])}) == 28
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        PrefixCache(-1)


# The engine ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG, seed=21)


@pytest.fixture(scope="module")
def engine(params):
    return Engine(CONFIG, params, **SHAPES)


@pytest.fixture(scope="module")
def reference(params):
    """Greedy decoding of one request alone, full forward per token, no cache of any kind."""
    forward = jax.jit(RecurrentGemma(CONFIG).apply, static_argnames="return_cache")

    def greedy(request: GenerationRequest) -> GenerationResult:
        ids, out = list(request.prompt_ids), []
        while len(out) < request.max_new_tokens:
            tokens = np.zeros((1, REF_LEN), np.int32)
            positions = np.full((1, REF_LEN), -1, np.int32)
            tokens[0, -len(ids) :] = ids
            positions[0, -len(ids) :] = np.arange(len(ids))
            logits, _ = forward({"params": params}, tokens, positions, return_cache=False)
            token = int(np.argmax(np.asarray(logits)[0, -1]))
            if token in request.stop_ids:
                return GenerationResult(out, "stop", len(request.prompt_ids), len(out))
            out.append(token)
            ids.append(token)
        return GenerationResult(out, "length", len(request.prompt_ids), len(out))

    return greedy


def documents(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(3, CONFIG.vocab_size, n - 1).tolist()] for n in lengths]


def questions(
    seed: int, docs: list[list[int]], per_doc: int, **overrides
) -> list[GenerationRequest]:
    """``per_doc`` questions on each document, interleaved (doc 0 q0, doc 1 q0, ..., doc 0 q1,
    ...), suffixes of 1 to 9 tokens, budgets of 1 to 8 tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(per_doc):
        for doc in docs:
            suffix = rng.integers(3, CONFIG.vocab_size, int(rng.integers(1, 10))).tolist()
            values = dict(
                prompt_ids=doc + suffix,
                max_new_tokens=int(rng.integers(1, 9)),
                stop_ids=(),
                prefix_len=len(doc),
            )
            values.update(overrides)
            out.append(GenerationRequest(**values))
    return out


def fresh(engine: Engine) -> Engine:
    """The shared engine with an empty prefix cache and zeroed stats."""
    engine.prefix_cache.clear()
    engine.stats = EngineStats()
    return engine


def without_prefix(requests: list[GenerationRequest]) -> list[GenerationRequest]:
    return [dataclasses.replace(r, prefix_len=0) for r in requests]


def test_reuse_gives_the_same_tokens_as_no_reuse(engine, reference) -> None:
    """Three documents past the window (8) and the prefill chunk (8), four questions each,
    interleaved: 12 requests on 4 slots, 2 prefill rows."""
    docs = documents(0, (30, 13, 21))
    requests = questions(1, docs, per_doc=4)
    reused = fresh(engine).generate(requests)
    stats = dataclasses.replace(engine.stats)  # a copy: the engine counts on
    plain = engine.generate(without_prefix(requests))
    assert reused == plain
    assert reused == [reference(r) for r in requests]
    assert sum(r.output_tokens for r in reused) > 2 * len(requests)  # not vacuous

    total = sum(len(r.prompt_ids) for r in requests)
    assert stats.prefix_cache_misses == len(docs)  # each document prefilled once
    assert stats.prefix_cache_hits == len(requests) - len(docs)
    assert stats.reused_prompt_tokens == (4 - 1) * sum(map(len, docs))
    assert stats.prompt_tokens + stats.reused_prompt_tokens == total
    assert stats.prompt_tokens == sum(map(len, docs)) + sum(
        len(r.prompt_ids) - r.prefix_len for r in requests
    )
    assert len(engine.prefix_cache) == len(docs)


def test_stats_count_prefilled_and_reused_tokens(engine) -> None:
    """One 20-token document, three questions of 2, 3 and 4 tokens, one plain request."""
    fresh(engine)
    (doc,) = documents(2, (20,))
    requests = [
        GenerationRequest([*doc, *[5] * n], 2, stop_ids=(), prefix_len=20) for n in (2, 3, 4)
    ] + [GenerationRequest([7] * 6, 2, stop_ids=())]
    engine.generate(requests)
    s = engine.stats
    assert (s.prefix_cache_misses, s.prefix_cache_hits) == (1, 2)
    assert s.reused_prompt_tokens == 2 * 20
    assert s.prompt_tokens == 20 + 2 + 3 + 4 + 6
    engine.generate(requests[:2])  # the document is cached now: every use is a hit
    assert (s.prefix_cache_misses, s.prefix_cache_hits) == (1, 4)
    assert s.reused_prompt_tokens == 4 * 20
    assert s.prompt_tokens == 20 + 2 + 3 + 4 + 6 + 2 + 3


def test_queued_prefixes_share_a_prefill_batch(engine) -> None:
    """Four 16-token documents (2 chunks of 8) with two 3-token questions each, in document
    order, 2 prefill rows: the first admission prefills documents 0 and 1 together, the third
    2 and 3; each suffix batch takes one chunk. 2 x 32 + 4 x 16 token slots, where prefilling
    each document alone would take 4 x 32 + 4 x 16."""
    fresh(engine)
    docs = documents(11, (16, 16, 16, 16))
    requests = [
        GenerationRequest([*doc, 7 + q, 8, 9], 2, stop_ids=(), prefix_len=16)
        for doc in docs
        for q in range(2)
    ]
    engine.generate(requests)
    s = engine.stats
    assert s.prefill_token_slots == 2 * 2 * 8 * 2 + 4 * 8 * 2
    assert s.prompt_tokens == 4 * 16 + 8 * 3
    assert (s.prefix_cache_misses, s.prefix_cache_hits) == (4, 4)


def test_a_small_budget_evicts_least_recent_and_stays_exact(params, engine) -> None:
    """Room for two states, five documents interleaved: states are evicted and recomputed,
    tokens do not change, the bytes held never exceed the budget."""
    entry = cache_bytes_per_sequence(CONFIG, np.float32)
    assert engine.prefix_entry_bytes == entry
    budget = 2 * entry + entry // 2
    small = Engine(CONFIG, params, prefix_cache_bytes=budget, **SHAPES)
    docs = documents(3, (11, 17, 9, 25, 14))
    requests = questions(4, docs, per_doc=3)
    held = []
    for index, request in enumerate(requests):
        small.submit(index, request)
    results: dict[int, GenerationResult] = {}
    while small.busy:
        results.update(small.step())
        held.append(small.prefix_cache.nbytes)
    plain = engine.generate(without_prefix(requests))
    assert [results[i] for i in range(len(requests))] == plain
    assert max(held) <= budget and len(small.prefix_cache) <= 2
    assert small.prefix_cache.evictions > 0
    assert small.stats.prefix_cache_hits > 0 and small.stats.prefix_cache_misses > len(docs)


def test_reuse_off_when_disabled_or_too_small(params, engine, caplog) -> None:
    docs = documents(5, (12,))
    requests = questions(6, docs, per_doc=3)
    assert Engine(CONFIG, params, prefix_cache_bytes=0, **SHAPES).prefix_cache is None
    tiny = Engine(CONFIG, params, prefix_cache_bytes=10, **SHAPES)
    assert tiny.prefix_cache is None and "prefix reuse is off" in caplog.text
    results = tiny.generate(requests)
    assert tiny.stats.prompt_tokens == sum(len(r.prompt_ids) for r in requests)
    assert tiny.stats.reused_prompt_tokens == tiny.stats.prefix_cache_hits == 0
    assert results == engine.generate(requests)
    with pytest.raises(ValueError, match="prefix_cache_bytes must be >= 0"):
        Engine(CONFIG, params, prefix_cache_bytes=-1, **SHAPES)


def test_nothing_compiles_after_warmup(params) -> None:
    """Prefix reuse adds no executable: loading states is a host-to-device copy into the
    prefill cache. Checked by the jit caches and by JAX's own compile events (op by op too)."""
    engine = Engine(CONFIG, params, max_slots=3, prefill_batch=2, prefill_chunk=8, decode_steps=2)
    engine.warmup()
    assert engine.compiled_shapes() == 3
    compiles = []

    def listener(event: str, duration: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        docs = documents(7, (9, 26, 40))
        for seed in range(3):
            mixed = questions(seed, docs, per_doc=2) + without_prefix(questions(9, docs[:1], 2))
            sampled = questions(seed + 10, docs[1:], per_doc=2, temperature=0.8, top_k=5)
            engine.generate(mixed[seed:] + sampled)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert engine.stats.prefix_cache_hits > 0
    assert engine.compiled_shapes() == 3
    assert compiles == []


def test_bad_prefix_len_is_an_error_result(engine, reference) -> None:
    (doc,) = documents(8, (10,))
    good = questions(9, [doc], per_doc=2)
    bad = [
        GenerationRequest(doc, 3, prefix_len=len(doc)),  # no token after the prefix
        GenerationRequest(doc, 3, prefix_len=len(doc) + 4),
        GenerationRequest([*doc, 5], 3, prefix_len=-1),
        GenerationRequest([*doc, 5], 3, prefix_len=2.0),
        GenerationRequest([*doc, 5], 3, prefix_len=True),
    ]
    results = engine.generate([bad[0], good[0], *bad[1:], good[1]])
    errors = [results[0], *results[2:6]]
    assert all(r.finish_reason == "error" and r.token_ids == [] for r in errors)
    assert all("prefix_len must be an integer in [0, " in r.error for r in errors)
    assert "[0, 10) for a 10-token prompt" in errors[0].error
    assert results[1] == reference(good[0]) and results[6] == reference(good[1])


TP_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
from model.engine import Engine, GenerationRequest
from testkit.tiny_model import random_params, tiny_config
config = tiny_config()
params = random_params(config, seed=21)
rng = np.random.default_rng(0)
docs = [[2, *rng.integers(3, 512, n).tolist()] for n in (29, 12, 20)]
requests = [
    GenerationRequest(d + rng.integers(3, 512, int(rng.integers(1, 9))).tolist(), 6,
                      stop_ids=(), prefix_len=len(d))
    for _ in range(3) for d in docs
]
shapes = dict(max_slots=4, prefill_batch=2, prefill_chunk=8, decode_steps=3)
out = {{}}
for n in (1, 2):
    engine = Engine(config, params, tensor_parallel=n, **shapes)
    engine.warmup()
    before = engine.compiled_shapes()
    reused = [r.token_ids for r in engine.generate(requests)]
    hits = engine.stats.prefix_cache_hits
    plain = [r.token_ids for r in engine.generate(
        [GenerationRequest(r.prompt_ids, 6, stop_ids=()) for r in requests])]
    out[n] = dict(reused=reused, plain=plain, hits=hits, compiled=[before, engine.compiled_shapes()])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_tensor_parallel_reuses_prefixes() -> None:
    """Two virtual CPU devices (a fresh interpreter: the device count is fixed at JAX import):
    cached states are split over the mesh like an empty prefill cache."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    done = subprocess.run(
        [sys.executable, "-c", TP_SCRIPT.format(root=str(ROOT))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    one, two = runs["1"], runs["2"]
    assert one["reused"] == one["plain"] == two["reused"] == two["plain"]
    assert one["hits"] == two["hits"] == 6
    assert one["compiled"] == [3, 3] and two["compiled"] == [5, 5]
