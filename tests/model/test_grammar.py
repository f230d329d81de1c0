"""Structured output: token bytes, compiled-grammar caching, packed masks, and constrained rows
through the engine beside unconstrained ones (tiny model, tiny SentencePiece tokenizer)."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from model.engine import Engine, GenerationRequest
from model.grammar import Constraint, ConstraintError, GrammarCache, token_bytes, words
from model.sampling import apply_mask
from model.tokenizer import Tokenizer
from testkit.tiny_model import random_params, tiny_config
from testkit.tiny_tokenizer import train_tiny_tokenizer

CONFIG = tiny_config()
EOS = 1
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "score": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["news", "sport"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "score", "kind", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "t.model")
    return Tokenizer(path)


@pytest.fixture(scope="module")
def grammars() -> GrammarCache:
    return GrammarCache()


@pytest.fixture(scope="module")
def engine() -> Engine:
    """4 slots, prefill 2 rows, 4 decode steps per call (so one-step calls are visible)."""
    engine = Engine(
        CONFIG, random_params(CONFIG, seed=3), max_slots=4, prefill_batch=2, decode_steps=4
    )
    engine.warmup()
    return engine


def prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=True)


def test_token_bytes_spell_the_text(tokenizer) -> None:
    """Joined token bytes give the text back, byte-fallback pieces (é, braces) and ▁ included;
    control pieces and the turn markers are special and spell nothing."""
    table, special = token_bytes(tokenizer)
    text = 'The city {"é": 7} ran\tfar'
    ids = tokenizer.encode(text)
    assert any(tokenizer.processor.is_byte(i) for i in ids)  # the test needs byte fallback
    assert b"".join(table[i] for i in ids) == text.encode()
    for idx in (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id):
        assert idx in special and table[idx] == b""
    assert tokenizer.end_of_turn_id in special


def test_a_constraint_compiles_once_per_tokenizer(tokenizer, grammars) -> None:
    cache = GrammarCache()
    first = cache.get(Constraint.json_schema(SCHEMA), tokenizer)
    again = cache.get(Constraint.json_schema(json.loads(json.dumps(SCHEMA))), tokenizer)
    assert first is again and cache.compiled == 1
    cache.get(Constraint.regex("[a-z]+"), tokenizer)
    assert cache.compiled == 2


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint("json_schema", "{not json"),
        Constraint.json_schema({"type": "object", "properties": {"a": {"type": "strung"}}}),
        Constraint.regex("(unclosed"),
        Constraint.choice([]),
    ],
)
def test_bad_constraints_raise(tokenizer, constraint) -> None:
    with pytest.raises(ConstraintError):
        GrammarCache().get(constraint, tokenizer)


def test_apply_mask_keeps_exactly_the_set_bits() -> None:
    vocab = 70  # three words, the last one partly used
    rng = np.random.default_rng(0)
    allowed = rng.random((3, vocab)) < 0.3
    allowed[2] = True
    packed = np.zeros((3, words(vocab)), np.uint32)
    for row, col in zip(*np.nonzero(allowed), strict=True):
        packed[row, col // 32] |= np.uint32(1 << (col % 32))
    logits = rng.standard_normal((3, vocab)).astype(np.float32)
    out = np.asarray(apply_mask(jnp.asarray(logits), jnp.asarray(packed.view(np.int32))))
    np.testing.assert_array_equal(np.isfinite(out), allowed)
    np.testing.assert_array_equal(out[allowed], logits[allowed])


def constrained(tokenizer, grammars, constraint, budget, **settings) -> GenerationRequest:
    grammar = grammars.get(constraint, tokenizer)
    ids = prompt(tokenizer, "Summary: the council approved")
    return GenerationRequest(ids, budget, stop_ids=(EOS,), grammar=grammar, **settings)


def test_constrained_rows_beside_plain_ones(engine, tokenizer, grammars) -> None:
    """JSON rows that stop validate against the schema, rows cut short say length, choices and
    regex rows match; the plain greedy rows in the same batch draw what they draw alone; no
    executable is added."""
    before = engine.compiled_shapes()
    schema = Constraint.json_schema(SCHEMA)
    plain = [
        GenerationRequest(prompt(tokenizer, text), 12, stop_ids=(EOS,))
        for text in ("The storm moved", "A small bakery", "Ticket sales rose")
    ]
    alone = engine.generate(plain)
    rows = [
        *[constrained(tokenizer, grammars, schema, 72, temperature=1.0, seed=s) for s in range(4)],
        constrained(tokenizer, grammars, schema, 3),
        constrained(tokenizer, grammars, Constraint.choice(["yes", "no", "not sure"]), 8),
        constrained(tokenizer, grammars, Constraint.regex(r"[0-9]{3}-[a-z]{2}"), 12),
        *plain,
    ]
    results = engine.generate(rows)
    texts = [tokenizer.decode(r.token_ids) for r in results]
    json_rows = results[:4]
    assert {r.finish_reason for r in json_rows} <= {"stop", "length"}
    stopped = [t for r, t in zip(json_rows, texts, strict=False) if r.finish_reason == "stop"]
    assert stopped, "no JSON row finished within its budget"
    for text in stopped:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert results[4].finish_reason == "length" and results[4].output_tokens == 3
    assert '{"name": "'.startswith(texts[4]) or texts[4].startswith('{"')
    assert results[5].finish_reason == "stop" and texts[5] in ("yes", "no", "not sure")
    assert results[6].finish_reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2}", texts[6])
    assert [r.token_ids for r in results[7:]] == [r.token_ids for r in alone]
    assert engine.compiled_shapes() == before


def test_a_constrained_request_needs_eos_among_its_stop_ids(engine, tokenizer, grammars) -> None:
    request = constrained(tokenizer, grammars, Constraint.json_object(), 8)
    bad = GenerationRequest(request.prompt_ids, 8, stop_ids=(5,), grammar=request.grammar)
    (result,) = engine.generate([bad])
    assert result.finish_reason == "error" and "EOS" in result.error


def test_json_object_rows_parse_as_objects(engine, tokenizer, grammars) -> None:
    rows = [
        constrained(tokenizer, grammars, Constraint.json_object(), 40, temperature=1.0, seed=s)
        for s in range(4)
    ]
    for result in engine.generate(rows):
        text = tokenizer.decode(result.token_ids)
        if result.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert result.finish_reason == "length" and text.startswith("{")


def test_constraints_with_other_controls(engine, tokenizer, grammars) -> None:
    """n samples of a constrained request each follow the grammar (a matcher per sample slot),
    a penalty and logprobs leave the match intact, and a plain row's stop sequence still stops
    it while constrained rows run beside it."""
    choices = ["alpha", "beta", "gamma delta"]
    pick = constrained(
        tokenizer,
        grammars,
        Constraint.choice(choices),
        16,
        temperature=1.0,
        seed=7,
        n=3,
        presence_penalty=1.5,
        logprobs=2,
    )
    (result,) = engine.generate([pick])
    assert result.samples is not None and len(result.samples) == 3
    for sample in result.samples:
        assert sample.finish_reason == "stop" and tokenizer.decode(sample.token_ids) in choices
        assert sample.logprobs is not None and len(sample.logprobs) == len(sample.token_ids)
    plain_ids = prompt(tokenizer, "The storm moved")
    (free,) = engine.generate([GenerationRequest(plain_ids, 12, stop_ids=(EOS,))])
    assert len(free.token_ids) >= 3, "the plain row needs a few tokens to stop on"
    stop = tuple(free.token_ids[1:3])
    mixed = engine.generate(
        [
            constrained(tokenizer, grammars, Constraint.regex(r"[0-9]{3}"), 8),
            GenerationRequest(plain_ids, 12, stop_ids=(EOS,), stop_sequences=(stop,)),
        ]
    )
    assert re.fullmatch(r"[0-9]{3}", tokenizer.decode(mixed[0].token_ids))
    assert mixed[1].finish_reason == "stop" and mixed[1].token_ids == free.token_ids[:3]
