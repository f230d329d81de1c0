"""Request settings (pipeline/request.py): the job's, a row's own, stop strings, engine requests."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.engine import GenerationRequest
from model.tokenizer import Tokenizer
from pipeline import columns as S
from pipeline.config.schema import GenerationSection
from pipeline.request import (
    ROW_SETTINGS,
    ROW_SETTINGS_TYPE,
    RequestSettings,
    row_seed,
    row_settings,
)
from testkit.tiny_tokenizer import train_tiny_tokenizer

JOB = RequestSettings(max_new_tokens=16, temperature=0.0, top_k=3, top_p=1.0, seed=99)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def settings_column(rows: list[dict[str, Any] | None]) -> list[dict[str, Any] | None]:
    """The rows' settings as they travel: a ROW_SETTINGS struct column, read back."""
    return row_settings(pa.table({ROW_SETTINGS: pa.array(rows, ROW_SETTINGS_TYPE)}))


def test_the_jobs_settings_come_from_the_generation_section_by_name() -> None:
    gen = GenerationSection(max_new_tokens=9, temperature=0.3, top_k=5, top_p=0.8, seed=7)
    settings = RequestSettings.from_config(gen, chat=True)
    assert settings == RequestSettings(9, 0.3, 5, 0.8, 7, stop=(), end_of_turn=True)
    # Every field the section shares with the settings is carried (none is copied by hand).
    shared = {f.name for f in dataclasses.fields(RequestSettings)} & set(gen.model_fields)
    # (the constraint comes from generation.structured_output, compiled to its JSON text)
    own = {"end_of_turn", "constraint"}
    assert shared == {f.name for f in dataclasses.fields(RequestSettings)} - own

    def same(value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value  # stop: a list in the config

    assert all(getattr(settings, name) == same(getattr(gen, name)) for name in shared)
    # The row settings a row may set are settings fields.
    assert set(ROW_SETTINGS_TYPE.names) <= {f.name for f in dataclasses.fields(RequestSettings)}


def test_a_rows_settings_override_the_job_within_its_limits(tokenizer: Tokenizer) -> None:
    assert row_settings(pa.table({"x": [1]})) == [None]  # no column: the job's settings
    assert JOB.for_row(None, "r1") == dataclasses.replace(JOB, seed=row_seed(99, "r1"))
    stop_piece = next(
        tokenizer.processor.id_to_piece(i)
        for i in range(10, tokenizer.vocab_size)
        if "▁" not in tokenizer.processor.id_to_piece(i)
        and not tokenizer.processor.id_to_piece(i).startswith("<")
    )
    chat_row, completion_row = settings_column(
        [
            {"max_new_tokens": 500, "seed": 2**40 + 5, "end_of_turn": True},
            {
                "max_new_tokens": 2,
                "temperature": 0.8,
                "top_p": 0.5,
                "stop": [stop_piece, "two words"],
            },
        ]
    )
    chat = JOB.for_row(chat_row, "c1")
    assert chat.max_new_tokens == 16  # capped at the job's limit
    assert chat.seed == 5 and chat.stop_ids(tokenizer, 4) == (1, tokenizer.end_of_turn_id)
    done = JOB.for_row(completion_row, "p1")
    assert (done.max_new_tokens, done.temperature, done.top_p) == (2, 0.8, 0.5)
    assert done.seed == row_seed(99, "p1") and done.top_k == 3
    assert done.stop_ids(tokenizer, 4) == (1, tokenizer.processor.piece_to_id(stop_piece))
    # The engine's limit on stop ids holds; the other stop strings still cut the text.
    assert done.stop_ids(tokenizer, 1) == (1,)
    request = done.engine_request([2, 5], prefix_len=1, stop_ids=(1,))
    assert request == GenerationRequest(
        [2, 5], 2, stop_ids=(1,), temperature=0.8, top_k=3, top_p=0.5, seed=done.seed, prefix_len=1,
        stop_strings=(stop_piece, "two words"),
    )  # fmt: skip
    # Every stop string also goes to the engine as its plain encoding, matched on the device.
    seqs = done.stop_sequences(tokenizer, 8, 16)
    assert seqs == (tuple(tokenizer.encode(stop_piece)), tuple(tokenizer.encode("two words")))
    assert done.stop_sequences(tokenizer, 1, 16) == seqs[:1]
    assert done.stop_sequences(tokenizer, 8, 1) == seqs[:1]  # "two words" takes more ids


def test_stop_strings_cut_the_text_and_count_tokens_to_the_stop(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("the river rose overnight and the old bridge")
    text = tokenizer.decode(ids)
    stopping, plain = (
        JOB.for_row(row, "r") for row in settings_column([{"stop": ["bridge", "rose"]}, None])
    )
    cut, tokens, reason = stopping.finish(tokenizer, ids, text, len(ids), "length")
    assert cut == text[: text.index("rose")] and reason == "stop"
    assert "rose" in tokenizer.decode(ids[:tokens]) and "rose" not in tokenizer.decode(
        ids[: tokens - 1]
    )
    assert plain.finish(tokenizer, ids, text, len(ids), "length") == (text, len(ids), "length")


def test_row_seed_is_stable_and_spread() -> None:
    assert row_seed(0, "doc-1") == row_seed(0, "doc-1")
    assert len({row_seed(0, f"doc-{i}") for i in range(1000)}) == 1000
    assert row_seed(0, "doc-1") != row_seed(1, "doc-1")


def test_a_constraint_travels_from_the_config_and_a_row_replaces_it(tokenizer) -> None:
    """generation.structured_output becomes the job's constraint; a row's own (an OpenAI
    response_format) replaces it through the settings column; constrained rows stop only at
    EOS (and <end_of_turn>), never at stop strings, and their text is not cut."""
    from model.grammar import Constraint

    gen = GenerationSection(structured_output={"choice": ["yes", "no"]})
    job = RequestSettings.from_config(gen, chat=True)
    assert Constraint.from_json(job.constraint) == Constraint.choice(["yes", "no"])
    own = Constraint.json_object().to_json()
    (row,) = settings_column([{"constraint": own, "stop": ["e"]}])
    settings = job.for_row(row, "r1")
    assert settings.constraint_of() == Constraint.json_object()
    assert settings.stop_ids(tokenizer, 4) == (tokenizer.eos_id, tokenizer.end_of_turn_id)
    assert settings.finish(tokenizer, [5, 6], "the end", 2, "stop") == ("the end", 2, "stop")
    request = settings.engine_request([2, 5], prefix_len=0, stop_ids=(1,), grammar="compiled")
    assert request.grammar == "compiled"
    plain = RequestSettings.from_config(GenerationSection())
    assert plain.constraint is None and plain.for_row(None, "r").constraint_of() is None


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_settings_column_becomes_the_rows_settings(tmp_path, fmt: str) -> None:
    """``input.settings_column``: OpenAI body keys per row (an object, a struct or JSON text),
    parsed by the OpenAI batch parser; a bad value is that row's error."""
    from pipeline import formats
    from pipeline.formats import ReadSpec

    values = [
        {"max_tokens": 3, "n": 2, "temperature": 0.5, "stop": ["x"], "presence_penalty": 0.5},
        None,
        {"logprobs": True, "top_logprobs": 4, "repetition_penalty": 1.2, "min_tokens": 1},
        {"temperature": 9},
    ]
    rows = [{"id": f"r{i}", "prompt": "Hi", "params": v} for i, v in enumerate(values)]
    path = tmp_path / f"in.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:  # a JSON string column (a struct column of mixed keys would need one schema)
        texts = [None if v is None else json.dumps(v) for v in values]
        pq.write_table(pa.table({"id": ["r0", "r1", "r2", "r3"], "prompt": ["Hi"] * 4,
                                 "params": texts}), path)  # fmt: skip
    spec = ReadSpec(format=fmt, id_column="id", settings_column="params")
    (table, _), *_ = list(formats.reader(fmt).read(str(path), spec))
    got = row_settings(table)
    assert got[0]["max_new_tokens"] == 3 and got[0]["n"] == 2 and got[0]["stop"] == ["x"]
    assert got[0]["presence_penalty"] == 0.5 and got[1] is None
    assert got[2]["logprobs"] == 4 and got[2]["repetition_penalty"] == 1.2
    assert got[2]["min_tokens"] == 1
    errors, kinds = table.column(S.ERROR).to_pylist(), table.column(S.ERROR_KIND).to_pylist()
    assert (
        errors[:3] == [None] * 3 and kinds[3] == "invalid_settings" and "temperature" in errors[3]
    )
    done = JOB.for_row(got[0], "r0")
    assert (done.n, done.max_new_tokens, done.presence_penalty) == (2, 3, 0.5)
