"""Prompt building: templates per task, chat wrapping, truncation policies, error rows."""

from __future__ import annotations

import pickle
from typing import Any

import pyarrow as pa
import pytest

from model.tokenizer import Tokenizer
from pipeline.columns import (
    ERROR,
    ERROR_KIND,
    ID,
    PROMPT,
    PROMPT_IDS,
    PROMPT_TOKENS,
    PROMPT_TRUNCATED,
    QUESTION,
    TASK,
    TEXT,
)
from pipeline.prompts import (
    DEFAULT_TEMPLATES,
    PromptBuilder,
    split_template,
    truncate_ids,
)
from testkit.tiny_tokenizer import train_tiny_tokenizer

SUMMARIZE = "Summarize the text.\n{text}\nSummary:"
QA = "Text: {text}\nQuestion: {question}\nAnswer:"
GENERATE = "{prompt}"
LONG_TEXT = " ".join(
    f"Report {i}: the council voted to expand the bus network, and riders welcomed it."
    for i in range(40)
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    names = (ID, TEXT, QUESTION, PROMPT, ERROR, ERROR_KIND)
    return pa.table(
        {
            name: pa.array(
                [row.get(name, f"r{i}" if name == ID else None) for i, row in enumerate(rows)],
                pa.string(),
            )
            for name in names
        }
    )


def _builder(tok: Tokenizer, task: str, **kwargs: Any) -> PromptBuilder:
    options: dict[str, Any] = {
        "template": {"summarize": SUMMARIZE, "qa": QA, "generate": GENERATE}.get(task, "{text}"),
        "chat": False,
        "max_prompt_tokens": 4096,
        "truncation": "head",
    }
    options.update(kwargs)
    return PromptBuilder(tok, task=task, **options)


def _one(builder: PromptBuilder, **row: Any) -> dict[str, Any]:
    (out,) = builder(_table([row])).to_pylist()
    return out


# ----------------------------------------------------------------------------- the tasks


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize(
    ("task", "row", "user_text"),
    [
        (
            "summarize",
            {TEXT: "The storm passed."},
            "Summarize the text.\nThe storm passed.\nSummary:",
        ),
        (
            "qa",
            {TEXT: "The bridge opened.", QUESTION: "What opened?"},
            "Text: The bridge opened.\nQuestion: What opened?\nAnswer:",
        ),
        ("generate", {PROMPT: "Write a short poem."}, "Write a short poem."),
    ],
)
def test_tasks_tokenize_like_encode_prompt(
    tok: Tokenizer, task: str, row: dict[str, str], user_text: str, chat: bool
) -> None:
    out = _one(_builder(tok, task, chat=chat), **row)
    want = tok.encode_prompt(user_text, chat=chat)
    assert out[PROMPT_IDS] == want and want[0] == tok.bos_id
    assert out[PROMPT_TOKENS] == len(want)
    assert out[TASK] == task and out[PROMPT_TRUNCATED] is False
    assert out[ERROR] is None and out[ERROR_KIND] is None
    if chat:
        assert tok.start_of_turn_id in out[PROMPT_IDS]


def test_output_types_and_row_count(tok: Tokenizer) -> None:
    rows = [{TEXT: "One."}, {TEXT: None}, {TEXT: "Three."}, {TEXT: " "}]
    out = _builder(tok, "summarize")(_table(rows))
    assert out.num_rows == len(rows)
    assert out.schema.field(PROMPT_IDS).type == pa.list_(pa.int32())
    assert out.schema.field(PROMPT_TOKENS).type == pa.int32()
    assert out.schema.field(PROMPT_TRUNCATED).type == pa.bool_()
    assert out.column(ID).to_pylist() == ["r0", "r1", "r2", "r3"]
    empty = _builder(tok, "summarize")(_table([]))
    assert empty.num_rows == 0 and PROMPT_IDS in empty.schema.names


def test_default_templates_are_valid(tok: Tokenizer) -> None:
    for task, template in DEFAULT_TEMPLATES.items():
        PromptBuilder(
            tok, task=task, template=template, chat=True, max_prompt_tokens=64, truncation="tail"
        )


# ---------------------------------------------------------------------------- truncation


def _template_tokens(builder: PromptBuilder, **row: Any) -> int:
    """Tokens of the prompt with a one-character document (a lower bound for the budget)."""
    return _one(builder, **row)[PROMPT_TOKENS]


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("side", ["head", "tail"])
def test_truncation_keeps_template_and_cuts_document(tok: Tokenizer, side: str, chat: bool) -> None:
    base = _template_tokens(_builder(tok, "qa", chat=chat), text="x", question="Who voted?")
    limit = base + 20
    builder = _builder(tok, "qa", chat=chat, max_prompt_tokens=limit, truncation=side)
    out = _one(builder, text=LONG_TEXT, question="Who voted?")
    assert out[PROMPT_TRUNCATED] is True and out[ERROR] is None
    assert out[PROMPT_TOKENS] == limit == len(out[PROMPT_IDS])
    assert out[PROMPT_IDS][0] == tok.bos_id
    text = tok.decode(out[PROMPT_IDS])
    head = Tokenizer.chat_prompt("\0").split("\0")[0] if chat else ""
    tail = Tokenizer.chat_prompt("\0").split("\0")[1] if chat else ""
    assert text.startswith(head + "Text: ")
    assert text.endswith("\nQuestion: Who voted?\nAnswer:" + tail)
    document = text[len(head + "Text: ") : -len("\nQuestion: Who voted?\nAnswer:" + tail)]
    assert 0 < len(document) < len(LONG_TEXT)
    assert LONG_TEXT.startswith(document) if side == "head" else LONG_TEXT.endswith(document)


def test_generate_truncates_the_prompt_field(tok: Tokenizer) -> None:
    builder = _builder(
        tok, "generate", template="Continue: {prompt}", max_prompt_tokens=30, truncation="tail"
    )
    out = _one(builder, prompt=LONG_TEXT)
    assert out[PROMPT_TOKENS] == 30 and out[PROMPT_TRUNCATED] is True
    text = tok.decode(out[PROMPT_IDS])
    assert text.startswith("Continue: ") and LONG_TEXT.endswith(text[len("Continue: ") :])


def test_prompt_that_fits_is_not_truncated(tok: Tokenizer) -> None:
    full = _one(_builder(tok, "summarize"), text="A short one.")
    exact = _builder(tok, "summarize", max_prompt_tokens=full[PROMPT_TOKENS])
    out = _one(exact, text="A short one.")
    assert out[PROMPT_IDS] == full[PROMPT_IDS] and out[PROMPT_TRUNCATED] is False


def test_error_policy(tok: Tokenizer) -> None:
    builder = _builder(tok, "summarize", max_prompt_tokens=40, truncation="error")
    # LONG_TEXT[:300] is tokenized and found too long; LONG_TEXT is longer than 40 tokens could
    # ever be (40 * the longest piece), so it is rejected without tokenizing it.
    rows = [{TEXT: LONG_TEXT[:300]}, {TEXT: "Short."}, {TEXT: LONG_TEXT}]
    out = builder(_table(rows))
    assert out.column(ERROR_KIND).to_pylist() == ["prompt_too_long", None, "prompt_too_long"]
    assert out.column(PROMPT_IDS).to_pylist()[::2] == [[], []]
    assert out.column(PROMPT_TOKENS).to_pylist()[::2] == [0, 0]
    assert out.column(PROMPT_TRUNCATED).to_pylist() == [False, False, False]
    first, _, last = out.column(ERROR).to_pylist()
    assert "over the limit of 40" in first and first.split()[0].isdigit()
    assert "over the limit of 40" in last


def test_template_alone_too_long(tok: Tokenizer) -> None:
    question = "Which of the many proposals did the council approve on Tuesday evening?"
    builder = _builder(tok, "qa", max_prompt_tokens=8, truncation="head")
    out = _one(builder, text=LONG_TEXT, question=question)
    assert out[ERROR_KIND] == "prompt_too_long" and "template alone" in out[ERROR]
    assert out[PROMPT_IDS] == []


def test_huge_document_is_cut_without_full_tokenization(tok: Tokenizer) -> None:
    huge = LONG_TEXT * 200  # far over limit * longest piece, so never tokenized whole
    for side in ("head", "tail"):
        out = _one(_builder(tok, "summarize", max_prompt_tokens=64, truncation=side), text=huge)
        assert out[PROMPT_TOKENS] == 64 and out[PROMPT_TRUNCATED] is True
        text = tok.decode(out[PROMPT_IDS])
        assert text.startswith("Summarize the text.\n") and text.endswith("\nSummary:")


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("task", "row", "kind", "field"),
    [
        ("summarize", {TEXT: None}, "missing_text", TEXT),
        ("summarize", {TEXT: " \n\t "}, "empty_text", TEXT),
        ("summarize", {TEXT: ""}, "empty_text", TEXT),
        ("qa", {TEXT: "Some text.", QUESTION: None}, "missing_text", QUESTION),
        ("qa", {TEXT: None, QUESTION: "Why?"}, "missing_text", TEXT),
        ("qa", {TEXT: "Some text.", QUESTION: "  "}, "empty_text", QUESTION),
        ("generate", {PROMPT: None, TEXT: "unused"}, "missing_text", PROMPT),
        ("generate", {PROMPT: "\n"}, "empty_text", PROMPT),
    ],
)
def test_rows_that_cannot_be_prompted(
    tok: Tokenizer, task: str, row: dict[str, Any], kind: str, field: str
) -> None:
    out = _one(_builder(tok, task), **row)
    assert out[ERROR_KIND] == kind and field in out[ERROR]
    assert out[PROMPT_IDS] == [] and out[PROMPT_TOKENS] == 0 and out[PROMPT_TRUNCATED] is False
    assert out[TASK] == task


def test_prior_errors_pass_through(tok: Tokenizer) -> None:
    rows = [
        {TEXT: None, ERROR: "line 3 is not JSON: Expecting value", ERROR_KIND: "invalid_json"},
        {TEXT: "Fine text.", ERROR: "missing id: column 'id'", ERROR_KIND: "missing_text"},
        {TEXT: "Fine text."},
    ]
    out = _builder(tok, "summarize")(_table(rows)).to_pylist()
    assert [r[ERROR_KIND] for r in out] == ["invalid_json", "missing_text", None]
    assert out[0][ERROR] == rows[0][ERROR] and out[1][ERROR] == rows[1][ERROR]
    assert out[0][PROMPT_IDS] == [] and out[1][PROMPT_IDS] == []
    assert out[2][PROMPT_TOKENS] > 0


def test_rerun_replaces_columns(tok: Tokenizer) -> None:
    builder = _builder(tok, "summarize")
    once = builder(_table([{TEXT: "Hello there."}]))
    twice = builder(once)
    assert twice.schema.names == once.schema.names and twice.equals(once)


def test_builder_pickles(tok: Tokenizer) -> None:
    builder = _builder(tok, "qa", chat=True, max_prompt_tokens=50, truncation="tail")
    table = _table([{TEXT: LONG_TEXT, QUESTION: "What?"}, {TEXT: "Short.", QUESTION: "Why?"}])
    assert pickle.loads(pickle.dumps(builder))(table).equals(builder(table))


# ----------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("task", "template", "match"),
    [
        ("summarize", "No document here.", "exactly once"),
        ("summarize", "{text} and again {text}", "exactly once"),
        ("summarize", "{text!r}", "plain"),
        ("summarize", "{text:>10}", "plain"),
        ("summarize", "{text} {title}", "not one of"),
        ("summarize", "{} {text}", "not one of"),
        ("summarize", "{text", "malformed"),
        ("qa", "Context: {text}", "must use"),
        ("generate", "{text}", "exactly once"),
    ],
)
def test_bad_templates(tok: Tokenizer, task: str, template: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _builder(tok, task, template=template)


def test_bad_options(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="task"):
        _builder(tok, "translate", template="{text}")
    with pytest.raises(ValueError, match="truncation"):
        _builder(tok, "summarize", truncation="middle")
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        _builder(tok, "summarize", max_prompt_tokens=1)


def test_split_template_escapes_braces() -> None:
    prefix, suffix, fields = split_template("{{json}} {question!s}: {text} -> {{}}", TEXT)
    assert prefix == "{{json}} {question!s}: " and suffix == " -> {{}}"
    assert fields == {TEXT, QUESTION}
    assert prefix.format(question="Q") == "{json} Q: " and suffix.format() == " -> {}"


def test_truncate_ids() -> None:
    ids = [5, 6, 7, 8]
    assert truncate_ids(ids, 2, "head") == [5, 6] and truncate_ids(ids, 2, "tail") == [7, 8]
    assert truncate_ids(ids, 0, "tail") == [] and truncate_ids(ids, 9, "tail") == ids
    with pytest.raises(ValueError):
        truncate_ids(ids, -1, "head")
