"""Many questions about one document: lists of questions, shared prefixes, one prefill each."""

from __future__ import annotations

import json
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import corpus_rows, job_config, job_yaml, read_output, read_table

from model.tokenizer import Tokenizer
from pipeline import columns as S
from pipeline.config import GenerationSection, ModelSection
from pipeline.model_stage import ModelStage
from pipeline.prompts import PromptBuilder
from pipeline.runner import run_job
from testkit.tiny_tokenizer import train_tiny_tokenizer

LOCAL = fsspec.filesystem("file")
QA = "Text: {text}\nQuestion: {question}\nAnswer:"
LONG_DOC = " ".join(f"On day {i} the council met and the riders waited." for i in range(6))


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def _qa_table(rows: list[tuple[str, str, str]]) -> pa.Table:
    ids, texts, questions = zip(*rows, strict=True) if rows else ((), (), ())
    n = len(rows)
    return pa.table(
        {
            S.ID: pa.array(ids, pa.string()),
            S.TEXT: pa.array(texts, pa.string()),
            S.QUESTION: pa.array(questions, pa.string()),
            S.PROMPT: pa.nulls(n, pa.string()),
            S.ERROR: pa.nulls(n, pa.string()),
            S.ERROR_KIND: pa.nulls(n, pa.string()),
        }
    )


# ------------------------------------------------------------------------------ reading


def test_a_list_of_questions_gives_one_adjacent_row_each(tmp_path) -> None:
    path = tmp_path / "in.jsonl"
    lines = [
        {"id": "a", "text": "Doc a.", "question": ["Who?", "When?", 7], "title": "A"},
        {"id": "b", "text": "Doc b.", "question": "Why?", "title": "B"},
        {"id": "c", "text": "Doc c.", "question": [], "title": "C"},
        {"id": 4, "text": "Doc d.", "question": ["How?"], "title": "D"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = read_table(
        str(path), fmt="jsonl", id_column="id", passthrough=["title"], expand_questions=True
    ).to_pylist()
    assert [r[S.ID] for r in rows] == ["a/q0", "a/q1", "a/q2", "b", "c", "4/q0"]
    assert [r[S.QUESTION] for r in rows] == ["Who?", "When?", None, "Why?", None, "How?"]
    assert [r["title"] for r in rows] == ["A", "A", "A", "B", "C", "D"]
    assert {r[S.TEXT] for r in rows[:3]} == {"Doc a."}
    assert len({r[S.ROW_KEY] for r in rows}) == len(rows)  # resume keys stay unique
    assert rows[0][S.ROW_KEY].endswith("/q0") and rows[3][S.ROW_KEY].endswith("-1")
    kinds = [r[S.ERROR_KIND] for r in rows]
    assert kinds == [None, None, "not_a_string", None, "empty_text", None]
    assert "question 2 of the list holds int" in rows[2][S.ERROR]

    # Without expansion (every task but qa) a list is not a string, as before.
    plain = read_table(str(path), fmt="jsonl", id_column="id").to_pylist()
    assert [r[S.ID] for r in plain] == ["a", "b", "c", "4"]
    assert plain[0][S.ERROR_KIND] == "not_a_string"


def test_parquet_list_columns_expand_with_derived_ids(tmp_path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["x", "y"], "question": [["p", "q"], None]}), str(path))
    rows = read_table(str(path), fmt="parquet", expand_questions=True).to_pylist()
    assert len(rows) == 3
    base = rows[0][S.ID].removesuffix("/q0")
    assert [r[S.ID] for r in rows[:2]] == [f"{base}/q0", f"{base}/q1"]
    assert [r[S.QUESTION] for r in rows] == ["p", "q", None]
    again = read_table(str(path), fmt="parquet", expand_questions=True).to_pylist()
    assert again == rows  # ids are stable: a rerun resumes the same rows


# ------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize("chat", [False, True])
def test_questions_about_one_document_share_its_prefix(tok: Tokenizer, chat: bool) -> None:
    builder = PromptBuilder(
        tok, task="qa", template=QA, chat=chat, max_prompt_tokens=4096, truncation="head"
    )
    assert builder.shared_prefix
    table = _qa_table(
        [
            ("a0", LONG_DOC, "When did they meet?"),
            ("a1", LONG_DOC, "Who waited for a long time?"),
            ("b0", "A short note.", "What is it?"),
        ]
    )
    out = builder(table).to_pylist()
    head = Tokenizer.chat_prompt("\x00").split("\x00")[0] if chat else ""
    want_prefix = [tok.bos_id, *tok.encode(head + "Text: " + LONG_DOC)]
    a0, a1, b0 = out
    assert a0[S.PREFIX_LEN] == a1[S.PREFIX_LEN] == len(want_prefix)
    assert a0[S.PROMPT_IDS][: len(want_prefix)] == want_prefix
    assert a1[S.PROMPT_IDS][: len(want_prefix)] == want_prefix
    assert a0[S.PROMPT_IDS] != a1[S.PROMPT_IDS]
    assert b0[S.PREFIX_LEN] == 0  # a document asked once: nothing to share
    for row in out:  # the prompt still decodes to the whole formatted text
        text = tok.decode(row[S.PROMPT_IDS])
        assert row[S.QUESTION] in text and row[S.TEXT] in text


def test_truncated_documents_share_what_is_kept(tok: Tokenizer) -> None:
    """A cut document leaves room for SHARED_SUFFIX_TOKENS (a quarter of the limit here) after
    it, so questions of different lengths below that share it; a longer one gets its own cut."""
    limit = 100
    builder = PromptBuilder(
        tok, task="qa", template=QA, chat=False, max_prompt_tokens=limit, truncation="head"
    )
    doc = " ".join([LONG_DOC] * 4)
    long_question = " ".join(["Who waited there, and when, and why?"] * 3)
    rows = [("a0", doc, "Who?"), ("a1", doc, "When was it?")]
    a0, a1, a2 = builder(_qa_table([*rows, ("a2", doc, long_question)])).to_pylist()
    assert a0[S.PROMPT_TRUNCATED] and a1[S.PROMPT_TRUNCATED] and a2[S.PROMPT_TRUNCATED]
    assert max(len(r[S.PROMPT_IDS]) for r in (a0, a1, a2)) <= limit
    n = a0[S.PREFIX_LEN]
    assert n == a1[S.PREFIX_LEN] and 0 < n < len(a0[S.PROMPT_IDS])
    assert a0[S.PROMPT_IDS][:n] == a1[S.PROMPT_IDS][:n]
    assert tok.decode(a0[S.PROMPT_IDS][n:]).strip().startswith("Question: Who?")
    assert len(tok.encode(f"\nQuestion: {long_question}\nAnswer:")) > limit // 4
    assert len(a2[S.PROMPT_IDS]) == limit  # cut further to fit its question: shares nothing
    assert a2[S.PREFIX_LEN] == 0 and a2[S.PROMPT_IDS][:n] != a0[S.PROMPT_IDS][:n]


@pytest.mark.parametrize(
    ("task", "template", "row"),
    [
        ("qa", "Question: {question}\nText: {text}\nAnswer:", ("a", LONG_DOC, "Who?")),
        ("summarize", "Summarize: {text}\nSummary:", ("a", LONG_DOC, None)),
    ],
)
def test_no_shared_prefix_when_nothing_is_shared(
    tok: Tokenizer, task: str, template: str, row: tuple[str, str, str]
) -> None:
    builder = PromptBuilder(
        tok, task=task, template=template, chat=False, max_prompt_tokens=4096, truncation="head"
    )
    assert not builder.shared_prefix
    (out,) = builder(_qa_table([row])).to_pylist()
    assert out[S.PREFIX_LEN] == 0 and out[S.ERROR] is None


# ------------------------------------------------------------------------------ model stage


def _model_stage(fixtures: dict[str, str], cache_bytes: int) -> ModelStage:
    model = ModelSection(
        checkpoint=fixtures["checkpoint"],
        dtype="float32",
        chat_template=False,
        compilation_cache=False,
        memory_headroom=0.1,
        max_failed_steps=3,
    )
    generation = GenerationSection(
        max_new_tokens=6,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        max_slots=4,
        prefill_batch=2,
        prefill_chunk=16,
        decode_steps=4,
        max_prompt_tokens=256,
        prefix_cache_bytes=cache_bytes,
    )
    return ModelStage(model, generation)


def test_the_model_stage_prefills_each_document_once(fixtures, tok: Tokenizer) -> None:
    """Greedy answers are the same with and without reuse; with it, each document's tokens
    (past the attention window of 8) are prefilled once for its 3 questions."""
    stage = _model_stage(fixtures, cache_bytes=1 << 26)
    tokenizer = stage.tokenizer
    builder = PromptBuilder(
        tokenizer, task="qa", template=QA, chat=False, max_prompt_tokens=256, truncation="head"
    )
    docs = [f"{LONG_DOC} Report {d}." for d in range(3)]
    questions = ["Who met?", "When did the riders wait for the bus?", "Why?"]
    rows = [(f"d{d}/q{k}", doc, q) for d, doc in enumerate(docs) for k, q in enumerate(questions)]
    prompted = builder(_qa_table(rows))
    shared = prompted.column(S.PREFIX_LEN).to_pylist()
    assert min(shared) > 8  # documents longer than the window

    reused = stage(prompted)
    stats = stage.worker.engine_stats
    plain_stage = _model_stage(fixtures, cache_bytes=0)
    plain = plain_stage(prompted)
    plain_stats = plain_stage.worker.engine_stats
    stage.worker.close()
    plain_stage.worker.close()

    assert reused.column(S.OUTPUT_TEXT).to_pylist() == plain.column(S.OUTPUT_TEXT).to_pylist()
    assert reused.column(S.ERROR).null_count == len(rows)
    assert S.PREFIX_LEN not in reused.column_names and S.PROMPT_IDS not in reused.column_names
    total = sum(prompted.column(S.PROMPT_TOKENS).to_pylist())
    assert plain_stats.prompt_tokens == total and plain_stats.reused_prompt_tokens == 0
    per_doc = shared[:: len(questions)]
    saved = sum(n * (len(questions) - 1) for n in per_doc)
    assert stats.reused_prompt_tokens == saved
    assert stats.prompt_tokens == total - saved
    assert stats.prefix_cache_hits == len(docs) * (len(questions) - 1)


# ------------------------------------------------------------------------------ a whole run


def test_a_qa_run_answers_every_question(tmp_path, fixtures, ray_cluster) -> None:
    docs = corpus_rows(12)
    lines: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        asked = [f"Question {k} about {doc['id']}?" for k in range(i % 4)]  # 0 to 3 questions
        lines.append({**doc, "question": asked if i % 5 else doc["question"]})
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    text = job_yaml(
        fixtures,
        task="qa",
        input_uri=str(tmp_path / "in" / "qa.jsonl"),
        output_uri=str(tmp_path / "out"),
    )
    result = run_job(job_config(text, run_id="qa-lists"))
    assert result.status == "succeeded"
    run_dir = str(tmp_path / "out" / "qa-lists")
    table = read_output(LOCAL, run_dir, "parquet")
    got = {r[S.ID]: r for r in table.to_pylist()}
    want: dict[str, str | None] = {}
    for line in lines:
        if isinstance(line["question"], str):
            want[line["id"]] = line["question"]
        elif not line["question"]:
            want[line["id"]] = None  # an empty list: one error row
        else:
            want.update({f"{line['id']}/q{k}": q for k, q in enumerate(line["question"])})
    assert sorted(got) == sorted(want)
    assert {i: r[S.QUESTION] for i, r in got.items()} == want
    for row_id, question in want.items():
        row = got[row_id]
        if question is None:
            assert row[S.ERROR_KIND] == "empty_text"
        else:
            assert row[S.ERROR] is None and row[S.FINISH_REASON] in ("stop", "length")
    manifest = json.loads(LOCAL.cat_file(f"{run_dir}/_manifest.json"))
    assert manifest["counts"]["rows"] == len(want)
    (entry,) = manifest["inputs"].values()
    assert entry["rows_in"] == entry["rows_out"] == len(want)
