"""OpenAI batch files (pipeline/formats/openai_batch.py): request parsing, Gemma chat rendering,
the rows' settings, response lines, config rules, and a whole run on a local Ray cluster whose
lines parse with the openai types."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pytest
import yaml
from openai.types import Completion
from openai.types.chat import ChatCompletion
from pipeline_helpers import job_config, job_yaml, read_table

from model.tokenizer import Tokenizer
from pipeline import columns as S
from pipeline import formats
from pipeline.config import ConfigError, load_job_config
from pipeline.formats import ReadSpec
from pipeline.formats import openai_batch as ob
from pipeline.readers import read_keyed
from pipeline.request import ROW_SETTINGS, cut_at_stop
from pipeline.runner import run_job

LOCAL = fsspec.filesystem("file")


def chat_line(custom_id: Any, content: Any = "Hello there", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gemma", "messages": [{"role": "user", "content": content}], **body},
    }


def completion_line(custom_id: str, prompt: Any = "Once upon", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "gemma", "prompt": prompt, **body},
    }


# Chat rendering ---------------------------------------------------------------------------------


def test_one_user_message_renders_as_the_tokenizer_chat_prompt() -> None:
    rendered = ob.render_chat([{"role": "user", "content": "Hi"}])
    assert rendered == Tokenizer.chat_prompt("Hi")


def test_system_goes_into_the_first_user_turn_and_roles_map_to_gemma() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "No lists."}]},
        {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
        {"role": "assistant", "content": "C"},
        {"role": "user", "content": "D"},
    ]
    assert ob.render_chat(messages) == (
        "<start_of_turn>user\nBe brief.\n\nNo lists.\n\nAB<end_of_turn>\n"
        "<start_of_turn>model\nC<end_of_turn>\n"
        "<start_of_turn>user\nD<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "system", "content": "x"}], "no user message"),
        ([{"role": "assistant", "content": "x"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "tool", "content": "x"}], "'tool' is not supported"),
        ([{"role": "user", "content": 3}], "string or a list of text parts"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "'image_url' part"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "must come before",
        ),
    ],
)
def test_bad_messages(messages: Any, fragment: str) -> None:
    with pytest.raises(ob.RequestError, match=fragment):
        ob.render_chat(messages)


# Request parsing --------------------------------------------------------------------------------


def test_parse_chat_and_completion_requests_with_params() -> None:
    chat = ob.parse_request(
        chat_line("a", max_completion_tokens=5, max_tokens=9, temperature=0.7, seed=3, stop="x")
    )
    assert chat == ob.Request("chat", Tokenizer.chat_prompt("Hello there"), 5, 0.7, None, 3, ("x",))
    done = ob.parse_request(completion_line("b", ["Go"], max_tokens=2, top_p=0.5, stop=["a", ""]))
    assert done == ob.Request("completions", "Go", 2, None, 0.5, None, ("a",))
    # Fields that do not change the answer are ignored; inactive values of unsupported ones pass.
    quiet = completion_line("c", user="u", metadata={"k": "v"}, n=1, stream=False, logprobs=None)
    assert ob.parse_request(quiet).prompt == "Once upon"


def test_response_format_becomes_the_rows_constraint() -> None:
    from model.grammar import Constraint

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    request = ob.parse_request(chat_line("a", response_format=fmt))
    assert Constraint.from_json(request.constraint) == Constraint.json_schema(schema)
    request = ob.parse_request(chat_line("b", response_format={"type": "json_object"}))
    assert Constraint.from_json(request.constraint) == Constraint.json_object()
    assert ob.parse_request(chat_line("c", response_format={"type": "text"})).constraint is None


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"method": "GET"}, "method must be 'POST'"),
        ({"method": None}, "method must be 'POST'"),
        ({"url": "/v1/embeddings"}, "url '/v1/embeddings' is not supported"),
        ({"body": "x"}, "body must be an object"),
        ({"body": {"model": "m"}}, "body.messages is missing"),
        ({"body": {"messages": [{"role": "user", "content": "x"}], "n": 0}}, "body.n must"),
        ({"body": {"messages": [{"role": "user", "content": "x"}], "stream": True}}, "stream"),
        ({"body": {"messages": [{"role": "user", "content": "x"}], "tools": [{}]}}, "tools"),
        ({"body": {"messages": [{"role": "user", "content": "x"}], "logprobs": 3}}, "logprobs"),
        (
            {"body": {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}},
            "top_logprobs needs",
        ),
        (
            {"body": {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 3}},
            "presence_penalty",
        ),
        (
            {
                "body": {
                    "messages": [{"role": "user", "content": "x"}],
                    "response_format": {"type": "grammar"},
                }
            },
            "response_format.type",
        ),
        (
            {
                "body": {
                    "messages": [{"role": "user", "content": "x"}],
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "x", "schema": {"type": "strung"}},
                    },
                }
            },
            "json_schema.schema: json_schema does not compile",
        ),
        (
            {
                "body": {
                    "messages": [{"role": "user", "content": "x"}],
                    "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
                }
            },
            "json_schema.name",
        ),
        ({"body": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}}, ">= 1"),
        ({"body": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}}, ">= 1"),
        ({"body": {"messages": [{"role": "user", "content": "x"}], "temperature": 3}}, "[0, 2]"),
        ({"body": {"messages": [{"role": "user", "content": "x"}], "top_p": 0}}, "(0, 1]"),
        ({"body": {"messages": [{"role": "user", "content": "x"}], "seed": True}}, "seed"),
        (
            {"body": {"messages": [{"role": "user", "content": "x"}], "stop": list("abcde")}},
            "at most 4",
        ),
        ({"body": {"messages": [{"role": "user", "content": "x"}], "stop": [1]}}, "stop must be"),
    ],
)
def test_invalid_requests(change: dict[str, Any], fragment: str) -> None:
    line = {**chat_line("a"), **change}
    with pytest.raises(ob.RequestError) as info:
        ob.parse_request(line)
    assert fragment in str(info.value)


def test_completion_prompt_must_be_one_string() -> None:
    with pytest.raises(ob.RequestError, match=r"body\.prompt"):
        ob.parse_request(completion_line("a", prompt=[1, 2, 3]))
    with pytest.raises(ob.RequestError, match=r"body\.prompt is missing"):
        ob.parse_request({**completion_line("a"), "body": {"model": "m"}})


# Reading ----------------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[Any]) -> list[str]:
    """Writes request lines (dicts as JSON, strings as they are); returns the raw lines."""
    raw = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(raw) + "\n")
    return raw


def test_reader_one_row_per_line_ids_unique_and_bad_lines_as_error_rows(tmp_path: Path) -> None:
    path = tmp_path / "batch.jsonl"
    write_lines(
        path,
        [
            chat_line("c1", max_tokens=3, temperature=0.5, top_p=0.9, seed=7, stop=["\n"]),
            completion_line("p1"),
            "",  # blank: no row
            "{not json",
            {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},  # no custom_id
            chat_line(42),  # not a string
            chat_line("c1"),  # repeats c1
            chat_line("bad", content=None),
            {**chat_line("gone"), "url": "/v1/embeddings"},
        ],
    )
    table = read_table(str(path), fmt="openai_batch")
    assert table.schema.names == [*S.READ_SCHEMA.names, *ob.REQUEST_SCHEMA.names]
    rows = table.to_pylist()
    assert len(rows) == 8
    ids = [r[S.ID] for r in rows]
    assert len(set(ids)) == 8 and ids[:2] == ["c1", "p1"] and "bad" in ids and "gone" in ids
    first, second = rows[0], rows[1]
    assert first[S.ERROR] is None and first[S.PROMPT] == Tokenizer.chat_prompt("Hello there")
    settings = first[ROW_SETTINGS]
    assert (settings["max_new_tokens"], settings["temperature"], settings["top_p"]) == (3, 0.5, 0.9)
    assert (settings["seed"], settings["stop"], first[ob.REQ_ENDPOINT]) == (7, ["\n"], "chat")
    assert settings["end_of_turn"] is True  # chat requests also stop at <end_of_turn>
    assert second[S.PROMPT] == "Once upon" and second[ob.REQ_ENDPOINT] == "completions"
    assert second[ROW_SETTINGS]["max_new_tokens"] is None and second[ROW_SETTINGS]["stop"] is None
    assert second[ROW_SETTINGS]["end_of_turn"] is None
    bad = rows[2:]
    # No usable custom_id (missing, not a string, a repeat): its own kind, for the error file.
    kinds = ["invalid_json"] + ["invalid_custom_id"] * 3 + ["invalid_request"] * 2
    assert [r[S.ERROR_KIND] for r in bad] == kinds
    # The kinds of its own are declared by the format (the registry lists them; columns.py,
    # shared by every format, does not name them).
    assert set(kinds) <= set(formats.error_kinds())
    assert set(ob.OpenAIBatchReader.error_kinds) == {"invalid_custom_id", "invalid_request"}
    assert not set(ob.OpenAIBatchReader.error_kinds) & set(S.ERROR_KINDS)
    assert set(ob.OpenAIBatchReader.answered_errors) <= set(formats.error_kinds())
    assert all(r[S.PROMPT] is None for r in bad)
    messages = [r[S.ERROR] for r in bad]
    assert "line 4" in messages[0]
    assert "custom_id is missing" in messages[1] and "must be a string" in messages[2]
    assert "repeats an earlier line" in messages[3] and bad[3][ob.REQ_CUSTOM_ID] == "c1"
    assert "content must be" in messages[4] and "not supported" in messages[5]
    # Lines with no usable custom_id, and the repeat, get derived ids (24 hex characters).
    assert all(len(r[S.ID]) == 24 for r in bad[:4])


def test_reader_records_custom_ids_for_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "batch.jsonl"
    write_lines(path, [chat_line("a"), chat_line("a"), "[1]", chat_line(None)])
    spec = ReadSpec(format="openai_batch", batch_rows=2)
    keys = [k for _, batch_keys in read_keyed(str(path), spec) for k in batch_keys]
    assert keys == ["s:a", "s:a", None, None]  # batches of 2: the repeat is seen across batches


def test_reader_refuses_an_id_column_or_passthrough() -> None:
    with pytest.raises(ValueError, match="custom_id is the id"):
        read_table("x.jsonl", fmt="openai_batch", id_column="id")


# Response lines ---------------------------------------------------------------------------------


def output_row(**values: Any) -> dict[str, Any]:
    row = {
        S.ID: "c1",
        ob.REQ_CUSTOM_ID: "c1",
        ob.REQ_ENDPOINT: "chat",
        S.PROMPT_TOKENS: 7,
        S.OUTPUT_TEXT: "Hi!",
        S.OUTPUT_TOKENS: 2,
        S.FINISH_REASON: "stop",
        S.ERROR: None,
        S.ERROR_KIND: None,
        S.MODEL: "tiny-it@abc",
        S.RUN_ID: "r1",
        S.GENERATED_AT: 1764400000.5,
        S.TOXICITY_PREFIX + "toxicity": 0.25,
        S.TOXIC: False,
        S.TOXICITY_DECISION: "keep",
    }
    return {**row, **values}


def test_response_lines_parse_with_the_openai_types() -> None:
    line = ob.response_line(output_row())
    assert line["custom_id"] == "c1" and line["error"] is None
    assert line["id"].startswith("batch_req_") and line["response"]["status_code"] == 200
    chat = ChatCompletion.model_validate(line["response"]["body"])
    assert chat.choices[0].message.content == "Hi!" and chat.choices[0].finish_reason == "stop"
    assert chat.usage.total_tokens == 9 and chat.created == 1764400000
    assert line["rgbatch"]["toxicity"] == {"toxicity": 0.25} and line["rgbatch"]["toxic"] is False

    text = ob.response_line(output_row(**{ob.REQ_ENDPOINT: "completions"}))
    done = Completion.model_validate(text["response"]["body"])
    assert done.object == "text_completion" and done.choices[0].text == "Hi!"
    # Ids derive from the run id and row id: a rerun writes the same line, another run does not.
    assert ob.response_line(output_row()) == line
    assert ob.response_line(output_row(**{S.RUN_ID: "r2"}))["id"] != line["id"]


def test_error_lines() -> None:
    bad = output_row(
        **{
            S.OUTPUT_TEXT: None,
            S.FINISH_REASON: "error",
            S.ERROR: "line 3: body.messages is missing",
            S.ERROR_KIND: "invalid_request",
        }
    )
    line = ob.response_line(bad)
    assert line["error"] == {"code": "invalid_request", "message": bad[S.ERROR]}
    assert line["response"]["status_code"] == 400
    assert line["response"]["body"]["error"]["code"] == "invalid_request"
    failed = ob.response_line({**bad, S.ERROR_KIND: "generation"})
    assert failed["response"]["status_code"] == 500
    assert failed["error"]["code"] == "generation_failed"
    # Annotate keeps a text whose scoring failed: a 200 line, the failure in the extra field.
    scored = ob.response_line(output_row(**{S.ERROR: "boom", S.ERROR_KIND: "toxicity"}))
    assert scored["response"]["status_code"] == 200 and scored["rgbatch"]["error"] == "boom"


# Config ----------------------------------------------------------------------------------------

CONFIG = """
task: generate
input: {uri: data/requests.jsonl, format: openai_batch}
model: {checkpoint: ckpt/2b}
output: {uri: out/, format: openai_batch}
"""


def test_config_rules() -> None:
    config = load_job_config(text=CONFIG, environ={})
    assert (config.input.format, config.output.format) == ("openai_batch", "openai_batch")
    with pytest.raises(ConfigError) as info:
        load_job_config(text=CONFIG.replace("generate", "summarize"), environ={})
    assert str(info.value) == "task: input.format openai_batch needs task generate"
    with pytest.raises(ConfigError) as info:
        load_job_config(
            text=CONFIG, environ={}, overrides=["input.format=jsonl", "input.id_column=id"]
        )
    assert str(info.value).startswith("output.format: openai_batch output needs input.format")
    with pytest.raises(ConfigError) as info:
        load_job_config(
            text=CONFIG,
            environ={},
            overrides=[
                "input.id_column=id",
                "input.passthrough=[a]",
                "prompts.generate=Q {prompt}",
            ],
        )
    paths = [path for path, _ in info.value.errors]
    assert paths == ["input.id_column", "input.passthrough", "prompts.generate"]
    # Never inferred from the name; the request columns are reserved.
    assert (
        load_job_config(
            text=CONFIG.replace(", format: openai_batch}", "}").replace(
                "output: {uri: out/, format: openai_batch}", "output: {uri: out/}"
            ),
            environ={},
        ).input.format
        == "jsonl"
    )
    with pytest.raises(ConfigError, match="clashes"):
        load_job_config(
            text=CONFIG,
            environ={},
            overrides=["input.format=jsonl", "output.format=jsonl", "input.passthrough=[req_x]"],
        )


# A whole run -----------------------------------------------------------------------------------


def run_config(fixtures: dict[str, str], input_uri: str, output_uri: str, **extra: Any) -> str:
    data = yaml.safe_load(
        job_yaml(fixtures, task="generate", input_uri=input_uri, output_uri=output_uri)
    )
    data["input"] = {"uri": input_uri, "format": "openai_batch"}
    data["output"]["format"] = "openai_batch"
    for section, values in extra.items():
        data.setdefault(section, {}).update(values)
    return yaml.safe_dump(data)


def read_lines(run_dir: str, sub: str = "") -> list[dict[str, Any]]:
    directory = f"{run_dir}/{sub}".rstrip("/")
    lines = []
    for path in sorted(LOCAL.glob(f"{directory}/part-*.jsonl")):
        lines += [json.loads(x) for x in LOCAL.cat_file(path).decode().splitlines()]
    return lines


def test_end_to_end_openai_batch(tmp_path: Path, fixtures, ray_cluster) -> None:
    prompt = "Write a line about the river"
    lines: list[Any] = [
        chat_line("chat-1", content=prompt, temperature=0),
        chat_line(
            "chat-sys",
            content=None,
            seed=11,
            temperature=0.9,
            top_p=0.8,
        ),
        completion_line("cmpl-1", prompt=prompt),
        completion_line("cmpl-max1", prompt=prompt, max_tokens=1),
        completion_line("cmpl-stop-space", prompt=prompt, stop=" "),
        completion_line("cmpl-stop-e", prompt=prompt, stop=["e", "o"]),
        "{this is not json",
        {**chat_line("no-messages"), "body": {"model": "gemma"}},
        completion_line("cmpl-n2", prompt=prompt, n=2, logprobs=2, temperature=0.9, seed=4),
        chat_line("chat-lp", content=prompt, logprobs=True, top_logprobs=3, presence_penalty=0.5),
        completion_line("cmpl-huge", prompt=prompt, max_tokens=2147483648, seed=1 << 64),
        {k: v for k, v in completion_line("x", prompt=prompt).items() if k != "custom_id"},
        completion_line("cmpl-1", prompt=prompt),  # repeats cmpl-1
    ]
    lines[1]["body"]["messages"] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": prompt}]},
    ]
    (tmp_path / "in").mkdir()
    write_lines(tmp_path / "in" / "requests.jsonl", lines)
    text = run_config(fixtures, str(tmp_path / "in" / "requests.jsonl"), str(tmp_path / "out"))
    result = run_job(job_config(text, run_id="oai"))
    run_dir = str(tmp_path / "out" / "oai")
    assert result.status == "succeeded"
    out = read_lines(run_dir)
    errors = read_lines(run_dir, "errors")
    # One line per request line: lines without a usable custom_id (not JSON, none given, a
    # repeat) in the error file, in OpenAI's shape, every other one in the output.
    assert len(out) + len(errors) == len(lines) and len(errors) == 3
    assert sorted(map(str, (e["custom_id"] for e in errors))) == ["None", "None", "cmpl-1"]
    for line in errors:
        assert line["response"] is None and set(line["error"]) == {"code", "message"}
    codes = sorted(e["error"]["code"] for e in errors)
    assert codes == ["invalid_custom_id", "invalid_custom_id", "invalid_json_line"]
    assert {e["error"]["message"].split(":")[0].split(" is ")[0] for e in errors} == {
        "line 7",
        "line 12",
        "line 13",
    }
    by_custom_id = {line["custom_id"]: line for line in out}
    assert len(by_custom_id) == len(out) and None not in by_custom_id
    valid = ["chat-1", "chat-sys", "cmpl-1", "cmpl-max1", "cmpl-stop-space", "cmpl-stop-e"]
    valid += ["cmpl-n2", "chat-lp"]
    assert set(by_custom_id) == {*valid, "no-messages", "cmpl-huge"}
    assert len({line["id"] for line in out + errors}) == len(lines)

    bodies = {}
    for custom_id in valid:
        line = by_custom_id[custom_id]
        assert line["error"] is None and line["response"]["status_code"] == 200, line
        body = line["response"]["body"]
        kind = ChatCompletion if custom_id.startswith("chat") else Completion
        bodies[custom_id] = parsed = kind.model_validate(body)
        usage = parsed.usage
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert usage.prompt_tokens > 0 and usage.completion_tokens <= 6 * len(parsed.choices)
        assert parsed.choices[0].finish_reason in ("stop", "length")
        extra = line["rgbatch"]
        assert extra["row_id"] == custom_id and extra["toxic"] in (True, False)
        assert 0 <= extra["toxicity"]["toxicity"] <= 1 and extra["toxicity_decision"] == "keep"

    # n = 2 from one prefill: two choices, the prompt counted once; logprobs as OpenAI shapes.
    two = bodies["cmpl-n2"]
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.prompt_tokens == bodies["cmpl-1"].usage.prompt_tokens
    for choice in two.choices:
        lp = choice.logprobs
        assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset)
        assert all(len(top) <= 2 for top in lp.top_logprobs) and all(
            v <= 0 for v in lp.token_logprobs
        )
    assert sum(len(c.logprobs.tokens) for c in two.choices) == two.usage.completion_tokens
    chat_lp = bodies["chat-lp"].choices[0]
    content = chat_lp.logprobs.content
    assert content and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert all(t.bytes == list(t.token.encode()) for t in content)
    assert "".join(t.token for t in content).strip() == chat_lp.message.content.strip()
    one = bodies["cmpl-max1"]
    assert one.usage.completion_tokens <= 1 and one.choices[0].finish_reason == "length"
    # The same greedy prompt with a stop string: the text is cut before the first stop string.
    full = bodies["cmpl-1"].choices[0].text
    cut_any = False
    for custom_id, stops in (("cmpl-stop-space", [" "]), ("cmpl-stop-e", ["e", "o"])):
        choice = bodies[custom_id].choices[0]
        position = cut_at_stop(full, stops)
        assert choice.text == (full if position is None else full[:position])
        assert not any(s in choice.text for s in stops)
        if position is not None:
            cut_any = True
            assert choice.finish_reason == "stop"
            assert (
                bodies[custom_id].usage.completion_tokens
                <= bodies["cmpl-1"].usage.completion_tokens
            )
    assert cut_any, full

    for custom_id, code, fragment in (
        ("no-messages", "invalid_request", "body.messages is missing"),
        ("cmpl-huge", "invalid_request", "line 11: body.max_tokens must be an integer >= 1"),
    ):
        line = by_custom_id[custom_id]
        assert line["error"]["code"] == code and fragment in line["error"]["message"]
        assert line["response"]["status_code"] == 400
        assert line["rgbatch"]["source"] == str(tmp_path / "in" / "requests.jsonl")
    assert (
        "not JSON"
        in next(e for e in errors if e["error"]["code"] == "invalid_json_line")["error"]["message"]
    )

    manifest = json.loads(LOCAL.cat_file(f"{run_dir}/_manifest.json"))
    assert manifest["counts"]["rows"] == len(lines)
    assert manifest["counts"]["rows_in_error_file"] == 3
    assert manifest["counts"]["rows_written"] == len(lines) - 3
    assert manifest["counts"]["error_kinds"] == {
        "invalid_json": 1,
        "invalid_request": 2,
        "invalid_custom_id": 2,
    }
    (per_file,) = manifest["inputs"].values()
    assert per_file == {"rows_in": len(lines), "rows_out": len(lines)}
    assert manifest["counts"]["ids_repeated"] == 1  # cmpl-1, repeated by the last line
    identity = json.loads(LOCAL.cat_file(f"{run_dir}/_run.json"))["identity"]
    assert identity["input.format"] == "openai_batch"
    assert run_job(job_config(text, run_id="oai")).status == "already_complete"

    # Under drop, toxic lines go to rejected/ in the same format (threshold 0: every line).
    dropping = run_config(
        fixtures,
        str(tmp_path / "in" / "requests.jsonl"),
        str(tmp_path / "out"),
        toxicity={"action": "drop", "threshold": 0.0},
    )
    assert run_job(job_config(dropping, run_id="oai-drop")).status == "succeeded"
    rejected = read_lines(str(tmp_path / "out" / "oai-drop"), "rejected")
    kept = read_lines(str(tmp_path / "out" / "oai-drop"))
    assert sorted(map(str, (x["custom_id"] for x in kept + rejected))) == sorted(
        map(str, by_custom_id)
    )
    assert len(read_lines(str(tmp_path / "out" / "oai-drop"), "errors")) == 3
    assert {x["custom_id"] for x in rejected} >= set(valid)
    for line in rejected:
        assert line["rgbatch"]["toxicity_decision"] == "drop" and line["rgbatch"]["toxic"]
        if line["custom_id"] in valid:
            assert line["error"] is None and line["response"]["body"]["usage"]["total_tokens"] > 0


def test_example_config_and_sample_requests() -> None:
    repo = Path(__file__).resolve().parents[3]
    config = load_job_config(repo / "configs" / "openai_batch.yaml", environ={})
    assert (config.task, config.input.format, config.output.format) == (
        "generate",
        "openai_batch",
        "openai_batch",
    )
    rows = read_table(str(repo / config.input.uri), fmt="openai_batch").to_pylist()
    assert rows and all(r[S.ERROR] is None for r in rows)
    assert len({r[S.ID] for r in rows}) == len(rows)


# Structured output runs (sharing this module's cluster) ----------------------------------------

STRUCTURED = {
    "type": "object",
    "properties": {
        "label": {"enum": ["river", "city"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["label", "score", "ok"],
    "additionalProperties": False,
}


def schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "row", "schema": schema, "strict": True}}


@pytest.mark.slow
def test_openai_batch_with_response_format(tmp_path: Path, fixtures, ray_cluster) -> None:
    """json_schema and json_object lines beside a plain one: outputs ending with stop parse and
    validate, a line cut by max_tokens says length, a schema that does not compile is an error
    line; every body parses with the openai types."""
    import jsonschema

    prompt = "Write a line about the river"
    lines = [
        chat_line("js-greedy", prompt, response_format=schema_format(STRUCTURED)),
        chat_line(
            "js-seed", prompt, temperature=1.0, seed=3, response_format=schema_format(STRUCTURED)
        ),
        chat_line("js-short", prompt, max_tokens=3, response_format=schema_format(STRUCTURED)),
        chat_line("obj", prompt, response_format={"type": "json_object"}),
        chat_line("bad-schema", prompt, response_format=schema_format({"type": "strung"})),
        completion_line("plain", prompt=prompt, max_tokens=4),
    ]
    (tmp_path / "in").mkdir()
    write_lines(tmp_path / "in" / "requests.jsonl", lines)
    text = run_config(
        fixtures,
        str(tmp_path / "in" / "requests.jsonl"),
        str(tmp_path / "out"),
        generation={"max_new_tokens": 60},
    )
    assert run_job(job_config(text, run_id="oai-json")).status == "succeeded"
    by_id = {line["custom_id"]: line for line in read_lines(str(tmp_path / "out" / "oai-json"))}
    assert set(by_id) == {line["custom_id"] for line in lines}
    bodies = {}
    for custom_id in ("js-greedy", "js-seed", "js-short", "obj", "plain"):
        body = by_id[custom_id]["response"]["body"]
        kind = Completion if custom_id == "plain" else ChatCompletion
        bodies[custom_id] = kind.model_validate(body)
    for custom_id in ("js-greedy", "js-seed"):
        choice = bodies[custom_id].choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), STRUCTURED)
    short = bodies["js-short"]
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].message.content.startswith("{")
    obj = bodies["obj"].choices[0]
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content), dict)
    else:
        assert obj.finish_reason == "length" and obj.message.content.startswith("{")
    bad = by_id["bad-schema"]
    assert bad["response"]["status_code"] == 400 and bad["error"]["code"] == "invalid_request"
    assert "json_schema.schema" in bad["error"]["message"]


@pytest.mark.slow
def test_corpus_job_with_a_json_schema(tmp_path: Path, fixtures, ray_cluster) -> None:
    """generation.structured_output on a JSONL corpus: every row that stops validates."""
    import jsonschema
    import pyarrow.parquet as pq

    rows = [{"id": f"r{i}", "title": "t", "prompt": f"Describe place {i}"} for i in range(5)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = yaml.safe_load(
        job_yaml(
            fixtures,
            task="generate",
            input_uri=str(tmp_path / "in" / "rows.jsonl"),
            output_uri=str(tmp_path / "out"),
        )
    )
    data["generation"].update(
        max_new_tokens=60, temperature=1.0, structured_output={"json_schema": STRUCTURED}
    )
    assert run_job(job_config(yaml.safe_dump(data), run_id="corpus-json")).status == "succeeded"
    parts = sorted(LOCAL.glob(str(tmp_path / "out" / "corpus-json" / "part-*.parquet")))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    assert sorted(table.column(S.ID).to_pylist()) == [r["id"] for r in rows]
    reasons = table.column(S.FINISH_REASON).to_pylist()
    assert "stop" in reasons and set(reasons) <= {"stop", "length"}
    for text, reason in zip(table.column(S.OUTPUT_TEXT).to_pylist(), reasons, strict=True):
        if reason == "stop":
            jsonschema.validate(json.loads(text), STRUCTURED)
