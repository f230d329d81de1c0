"""The job config: validation messages, overrides, interpolation, rendering, redaction, preflight."""

from __future__ import annotations

import datetime as dt
import importlib
import pickle
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import pipeline.config
from model.engine_config import EngineConfig
from pipeline.config import (
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    TASKS,
    TOXICITY_ACTIONS,
    TOXICITY_MODELS,
    TRUNCATIONS,
    ConfigError,
    JobConfig,
    infer_format,
    load_job_config,
    new_run_id,
    preflight,
    redacted_dict,
)
from pipeline.config import loading as config_loading
from pipeline.config import schema as config_schema

# The function pipeline.config.preflight shadows the submodule of that name on the package.
config_preflight = importlib.import_module("pipeline.config.preflight")

MINIMAL = """
task: summarize
input: {uri: data/*.jsonl}
model: {checkpoint: ckpt/2b}
output: {uri: out/}
"""


def load(text: str = MINIMAL, **kwargs: Any) -> JobConfig:
    kwargs.setdefault("environ", {})
    return load_job_config(text=text, **kwargs)


def with_(**sections: Any) -> str:
    """MINIMAL with some top-level keys replaced or added."""
    data = yaml.safe_load(MINIMAL)
    data.update(sections)
    return yaml.safe_dump(data)


def error_of(text: str, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(text, **kwargs)
    return str(info.value)


# Valid configs and defaults ---------------------------------------------------------------------


def test_minimal_config_and_defaults() -> None:
    cfg = load()
    assert cfg.task == "summarize"
    assert cfg.input.format == "jsonl"
    assert (cfg.input.text_column, cfg.input.question_column, cfg.input.prompt_column) == (
        "text",
        "question",
        "prompt",
    )
    assert cfg.input.passthrough == [] and cfg.input.storage_options == {}
    assert cfg.input.id_column is None and cfg.input.num_blocks is None
    m = cfg.model
    assert (m.dtype, m.replicas, m.gpus_per_replica, m.cpus_per_replica) == ("bfloat16", 1, 0, 1)
    assert m.resources_per_replica == {} and m.chat_template is None
    g = cfg.generation
    assert (g.max_new_tokens, g.max_prompt_tokens, g.truncation) == (256, 8192, "head")
    assert (g.temperature, g.top_k, g.top_p, g.seed) == (0.0, 0, 1.0, 0)
    # The engine's limits have one default: the engine's own (model.engine_config).
    engine = EngineConfig()
    assert (g.max_slots, g.prefill_batch, g.prefill_chunk, g.decode_steps) == (
        engine.max_slots,
        engine.prefill_batch,
        engine.prefill_chunk,
        engine.decode_steps,
    )
    assert g.batch_size == 256 and m.tensor_parallel is None and m.replica_devices == 1
    assert cfg.prompts.summarize == "Summarize the following text.\n\n{text}\n\nSummary:"
    assert cfg.prompts.generate == "{prompt}"
    assert cfg.prompt_template() == cfg.prompts.summarize
    t = cfg.toxicity
    assert (t.enabled, t.model, t.checkpoint, t.threshold, t.action) == (
        True,
        "original",
        None,
        0.5,
        "annotate",
    )
    assert (t.score_inputs, t.replicas, t.batch_size, t.redaction_text) == (
        False,
        1,
        64,
        "[redacted]",
    )
    assert (cfg.output.format, cfg.output.storage_options) == ("parquet", {})
    assert (cfg.run.ray_address, cfg.run.num_cpus, cfg.run.checkpoint_uri) == (None, None, None)
    assert cfg.run.progress_interval_s == 10


def test_config_is_frozen() -> None:
    cfg = load()
    with pytest.raises(ValueError):
        cfg.generation.max_new_tokens = 3  # type: ignore[misc]


def test_every_field_is_documented() -> None:
    def walk(model: type) -> Iterator[tuple[str, Any]]:
        for name, info in model.model_fields.items():
            yield f"{model.__name__}.{name}", info
            ann = info.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                yield from walk(ann)

    undocumented = [name for name, info in walk(JobConfig) if not info.description]
    assert undocumented == []


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(MINIMAL)
    assert load_job_config(path, environ={}).model.checkpoint == "ckpt/2b"
    with pytest.raises(ConfigError, match=r"^<root>: cannot read"):
        load_job_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("checkpoint", "setting", "expected"),
    [
        ("k/2b-it", None, True),
        ("k/2b-it/", None, True),
        ("k/2b", None, False),
        ("k/2b", True, True),
    ],
)
def test_chat_template_default(checkpoint: str, setting: bool | None, expected: bool) -> None:
    cfg = load(with_(model={"checkpoint": checkpoint, "chat_template": setting}))
    assert cfg.model.use_chat_template is expected


def test_rows_per_file() -> None:
    assert load().output.rows_per_file == 1024
    assert load(overrides=["output.rows_per_file=10"]).output.rows_per_file == 10
    message = error_of(with_(output={"uri": "out/", "rows_per_file": 0}))
    assert message.startswith("output.rows_per_file: Input should be greater than or equal to 1")


@pytest.mark.parametrize(
    ("path", "allowed", "expected"),
    [
        ("task", TASKS, ("summarize", "qa", "generate")),
        ("input.format", INPUT_FORMATS, ("jsonl", "parquet", "openai_batch")),
        ("output.format", OUTPUT_FORMATS, ("parquet", "jsonl", "openai_batch")),
        ("generation.truncation", TRUNCATIONS, ("head", "tail", "error")),
        ("toxicity.action", TOXICITY_ACTIONS, ("annotate", "drop", "redact")),
        (
            "toxicity.model",
            TOXICITY_MODELS,
            ("original", "unbiased", "multilingual", "original-small", "unbiased-small"),
        ),
    ],
)
def test_allowed_value_tuples_are_what_the_fields_accept(
    path: str, allowed: tuple[str, ...], expected: tuple[str, ...]
) -> None:
    assert allowed == expected
    for value in allowed:
        # OpenAI batch files answer generate requests and only they give custom_ids to answer.
        needs = ["task=generate", "input.format=openai_batch"] if value == "openai_batch" else []
        cfg = load(overrides=[*needs, f"{path}={value}"])
        node: Any = cfg
        for part in path.split("."):
            node = getattr(node, part)
        assert node == value
    assert error_of(MINIMAL, overrides=[f"{path}=nonsense"]).startswith(f"{path}: ")


def test_package_reexports_the_public_names_of_its_modules() -> None:
    for module in (config_schema, config_loading, config_preflight):
        for name, value in vars(module).items():
            defined_here = getattr(value, "__module__", None) == module.__name__
            if name.startswith("_") or not (defined_here or name.isupper()):
                continue
            assert name in pipeline.config.__all__, f"{module.__name__}.{name}"
            assert getattr(pipeline.config, name) is value, name
    assert all(hasattr(pipeline.config, name) for name in pipeline.config.__all__)


# Errors name the field path ---------------------------------------------------------------------


def test_unknown_keys_top_level_and_nested() -> None:
    message = error_of(MINIMAL + "colour: red\n")
    assert message == "colour: unknown key (extra inputs are not permitted)"
    message = error_of(with_(input={"uri": "a.jsonl", "colour": "red"}))
    assert message == "input.colour: unknown key (extra inputs are not permitted)"


def test_unknown_key_suggests_the_nearest_field() -> None:
    message = error_of(MINIMAL, overrides=["generation.max_new_token=3"])
    assert message.endswith(
        "unknown key (extra inputs are not permitted); did you mean 'max_new_tokens'?"
    )
    message = error_of(with_(input={"uri": "a.jsonl", "text_colum": "body"}))
    assert message.endswith("did you mean 'text_column'?")
    message = error_of(MINIMAL + "taks: qa\n")
    assert message.startswith("taks: unknown key") and message.endswith("did you mean 'task'?")
    message = error_of(MINIMAL + "colour: red\n")  # nothing close: no suggestion
    assert "did you mean" not in message


def test_wrong_type() -> None:
    message = error_of(with_(generation={"max_new_tokens": "lots"}))
    assert message.startswith("generation.max_new_tokens: Input should be a valid integer")
    message = error_of(with_(input="data.jsonl"))
    assert message.startswith("input: Input should be a valid dictionary")


def test_missing_required() -> None:
    assert error_of(with_(model={"dtype": "float32"})) == "model.checkpoint: field required"
    message = error_of("model: {checkpoint: c}\n")
    assert message.splitlines() == [
        "task: field required",
        "input: field required",
        "output: field required",
    ]


def test_out_of_range_and_bad_choices() -> None:
    message = error_of(with_(generation={"max_new_tokens": 0}))
    assert message.startswith(
        "generation.max_new_tokens: Input should be greater than or equal to 1"
    )
    assert error_of(with_(generation={"top_p": 0})).startswith("generation.top_p: ")
    assert error_of(with_(generation={"max_prompt_tokens": 4})).startswith(
        "generation.max_prompt_tokens: "
    )
    assert error_of(with_(generation={"loop_ngram": 9})).startswith("generation.loop_ngram: ")
    assert error_of(with_(generation={"min_tokens": 999})).startswith("generation.min_tokens: ")
    assert error_of(with_(generation={"logprobs": 21})).startswith("generation.logprobs: ")
    assert error_of(with_(generation={"repetition_penalty": 0})).startswith(
        "generation.repetition_penalty: "
    )
    assert error_of(with_(toxicity={"threshold": 1.5})).startswith("toxicity.threshold: ")
    assert error_of(with_(model={"checkpoint": "c", "replicas": 0})).startswith("model.replicas: ")
    assert error_of(with_(task="translate")).startswith("task: Input should be 'summarize'")
    assert error_of(with_(toxicity={"action": "burn"})).startswith("toxicity.action: ")


def test_multiple_errors_one_line_each() -> None:
    message = error_of(
        with_(generation={"max_new_tokens": 0, "temperature": -1}, toxicity={"model": "x"})
    )
    lines = message.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "generation.max_new_tokens",
        "generation.temperature",
        "toxicity.model",
    ]


def test_resources_must_not_name_cpu_or_gpu() -> None:
    message = error_of(with_(model={"checkpoint": "c", "resources_per_replica": {"GPU": 1}}))
    assert message.startswith("model.resources_per_replica: 'GPU': use model.gpus_per_replica")
    cfg = load(with_(model={"checkpoint": "c", "resources_per_replica": {"TPU": 4}}))
    assert cfg.model.resources_per_replica == {"TPU": 4.0}


def test_passthrough_clashes_and_duplicates() -> None:
    message = error_of(with_(input={"uri": "a.jsonl", "passthrough": ["title", "output_text"]}))
    assert message.startswith("input.passthrough: column 'output_text' clashes")
    message = error_of(with_(input={"uri": "a.jsonl", "passthrough": ["toxicity_insult"]}))
    assert message.startswith("input.passthrough: ")
    message = error_of(with_(input={"uri": "a.jsonl", "passthrough": ["a", "a"]}))
    assert message == "input.passthrough: column 'a' is listed twice"


@pytest.mark.parametrize(
    ("task", "template", "fragment"),
    [
        ("summarize", "Sum up {document}", "placeholder {document} is not allowed"),
        ("summarize", "Sum up {text} for {question}", "placeholder {question} is not allowed"),
        ("summarize", "Sum up", "template must use {text}"),
        ("summarize", "Sum up {text:>10}", "placeholder {text} is not allowed"),
        ("summarize", "Sum up {}", "placeholder {} is not allowed"),
        ("summarize", "Sum up {text", "bad template syntax"),
        ("qa", "Q: {question}", "template must use {text}"),
        ("generate", "{text}", "placeholder {text} is not allowed"),
    ],
)
def test_bad_template(task: str, template: str, fragment: str) -> None:
    message = error_of(with_(prompts={task: template}))
    assert message.startswith(f"prompts.{task}: ")
    assert fragment in message


def test_template_with_literal_braces() -> None:
    cfg = load(with_(prompts={"summarize": 'Reply as {{"summary": ...}}: {text}'}))
    assert cfg.prompts.summarize.format(text="x") == 'Reply as {"summary": ...}: x'


def test_bad_uri_placeholder() -> None:
    message = error_of(with_(output={"uri": "s3://b/{day}/"}))
    assert message.startswith("output.uri: unknown placeholder {day}")


def test_top_level_must_be_a_mapping() -> None:
    assert error_of("- a\n- b\n").startswith("<root>: the top level must be a mapping")
    assert error_of("task: [unclosed\n").startswith("<root>: invalid YAML")


def test_empty_document_reports_required_fields() -> None:
    assert "task: field required" in error_of("")


def test_config_error_pickles() -> None:
    error = ConfigError([("a.b", "bad"), ("c", "worse")])
    again = pickle.loads(pickle.dumps(error))
    assert again.errors == error.errors and str(again) == "a.b: bad\nc: worse"
    assert isinstance(again, ValueError)


# --set overrides --------------------------------------------------------------------------------


def test_overrides_nested_keys_lists_and_dicts() -> None:
    cfg = load(
        overrides=[
            "generation.max_new_tokens=32",
            "input.passthrough=[title,url]",
            "input.uri=*.parquet",
            "output.storage_options={anon: true}",
            "toxicity.enabled=false",
            "run.ray_address=auto",
            "model.chat_template=null",
            "task=qa",
        ]
    )
    assert cfg.generation.max_new_tokens == 32
    assert cfg.input.passthrough == ["title", "url"]
    assert (cfg.input.uri, cfg.input.format) == ("*.parquet", "parquet")
    assert cfg.output.storage_options == {"anon": True}
    assert cfg.toxicity.enabled is False and cfg.run.ray_address == "auto"
    assert cfg.task == "qa"


def test_override_creates_missing_sections_and_keeps_the_rest() -> None:
    cfg = load(overrides=["toxicity.threshold=0.9", "input.id_column=doc_id"])
    assert cfg.toxicity.threshold == 0.9
    assert (cfg.input.id_column, cfg.input.uri) == ("doc_id", "data/*.jsonl")


def test_override_values_are_validated() -> None:
    message = error_of(MINIMAL, overrides=["generation.max_new_tokens=0"])
    assert message.startswith("generation.max_new_tokens: ")
    message = error_of(MINIMAL, overrides=["generation.max_new_token=3"])
    assert message.startswith("generation.max_new_token: unknown key")


@pytest.mark.parametrize("item", ["generation.max_new_tokens", "=3", "a..b=1"])
def test_malformed_override(item: str) -> None:
    message = error_of(MINIMAL, overrides=[item])
    assert message == f"--set {item}: malformed override, expected a.b.c=value"


def test_override_through_a_non_mapping() -> None:
    message = error_of(MINIMAL, overrides=["task.name=qa"])
    assert message == "task.name: cannot set: task is not a mapping"
    message = error_of(MINIMAL, overrides=["input.uri.x.y=1"])
    assert message == "input.uri.x.y: cannot set: input.uri is not a mapping"


# ${VAR} interpolation ---------------------------------------------------------------------------


def test_env_interpolation_and_defaults() -> None:
    text = with_(
        input={"uri": "s3://${BUCKET}/in/*.jsonl", "text_column": "${TEXT_COL:-body}"},
        generation={"max_new_tokens": "${MAX_NEW:-16}", "seed": "${SEED:-7}"},
        output={"uri": "out/", "storage_options": {"key": "${AWS_KEY}"}},
    )
    cfg = load(text, environ={"BUCKET": "bkt", "AWS_KEY": "sekret", "TEXT_COL": ""})
    assert cfg.input.uri == "s3://bkt/in/*.jsonl"
    assert cfg.input.text_column == "body"  # empty counts as unset for :-
    assert cfg.generation.max_new_tokens == 16 and cfg.generation.seed == 7
    assert cfg.output.storage_options == {"key": "sekret"}
    assert cfg.interpolated_paths == {
        "input.uri",
        "input.text_column",
        "generation.max_new_tokens",
        "generation.seed",
        "output.storage_options.key",
    }


def test_env_interpolation_in_lists_and_escapes() -> None:
    text = with_(
        input={"uri": "a.jsonl", "passthrough": ["${COL}", "literal"]},
        toxicity={"redaction_text": "[removed: $${REASON}, costs $5]"},
    )
    cfg = load(text, environ={"COL": "title"})
    assert cfg.input.passthrough == ["title", "literal"]
    assert cfg.toxicity.redaction_text == "[removed: ${REASON}, costs $5]"
    assert cfg.interpolated_paths == {"input.passthrough.0"}


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RGBATCH_TEST_CKPT", "/models/2b-it")
    cfg = load_job_config(text=with_(model={"checkpoint": "${RGBATCH_TEST_CKPT}"}))
    assert cfg.model.checkpoint == "/models/2b-it"


def test_unset_env_var_names_path_and_variable() -> None:
    text = with_(output={"uri": "out/", "storage_options": {"key": "${AWS_KEY}"}})
    message = error_of(text, environ={})
    assert message == "output.storage_options.key: environment variable AWS_KEY is not set"


def test_override_values_are_interpolated() -> None:
    cfg = load(overrides=["output.uri=s3://${BUCKET}/x/"], environ={"BUCKET": "b"})
    assert cfg.output.uri == "s3://b/x/"
    assert "output.uri" in cfg.interpolated_paths


# {date} / {run_id} rendering --------------------------------------------------------------------


def test_rendering_keeps_raw_templates() -> None:
    text = with_(
        input={"uri": "s3://in/{date}/*.parquet"},
        output={"uri": "s3://out/summaries/{date}/"},
        run={"checkpoint_uri": "s3://ckpt/{run_id}/"},
    )
    cfg = load(text, run_id="r-1", date="2024-03-05")
    assert cfg.input.uri == "s3://in/2024-03-05/*.parquet"
    assert cfg.output.uri == "s3://out/summaries/2024-03-05/"
    assert cfg.run.checkpoint_uri == "s3://ckpt/r-1/"
    assert (cfg.run_id, cfg.date, cfg.is_rendered) == ("r-1", "2024-03-05", True)
    assert cfg.templates == {
        "input.uri": "s3://in/{date}/*.parquet",
        "output.uri": "s3://out/summaries/{date}/",
        "run.checkpoint_uri": "s3://ckpt/{run_id}/",
    }
    again = cfg.rendered("r-2", dt.date(2025, 1, 2))
    assert again.output.uri == "s3://out/summaries/2025-01-02/"
    assert again.run.checkpoint_uri == "s3://ckpt/r-2/"
    assert again.templates == cfg.templates
    assert pickle.loads(pickle.dumps(again)).run_id == "r-2"


def test_unrendered_config_from_model_validate() -> None:
    data = yaml.safe_load(with_(output={"uri": "out/{run_id}"}))
    raw = JobConfig.model_validate(data)
    assert (raw.run_id, raw.date, raw.is_rendered) == (None, None, False)
    assert raw.output.uri == "out/{run_id}"
    assert raw.rendered("abc", "2024-01-01").output.uri == "out/abc"


def test_default_run_id_and_date() -> None:
    cfg = load(with_(output={"uri": "out/{date}/{run_id}"}))
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert cfg.date == today
    assert cfg.run_id is not None
    assert cfg.output.uri == f"out/{today}/{cfg.run_id}"
    assert new_run_id(dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)).startswith(
        "20240102T030405Z-"
    )


def test_bad_run_id_and_date() -> None:
    assert error_of(MINIMAL, run_id="a/b").startswith("run_id: ")
    assert error_of(MINIMAL, date="2024-13-01").startswith("date: expected YYYY-MM-DD")
    assert error_of(MINIMAL, date="24-1-1").startswith("date: ")


# Format inference -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("data/*.jsonl", "jsonl"),
        ("data/x.json", "jsonl"),
        ("s3://b/x.jsonl.gz", "jsonl"),
        ("x.JSON.GZ", "jsonl"),
        ("gs://b/**/*.parquet", "parquet"),
        ("x.pq", "parquet"),
        ("data/", None),
        ("data/x.csv", None),
    ],
)
def test_infer_format(uri: str, expected: str | None) -> None:
    assert infer_format(uri) == expected


def test_uninferable_format_is_an_error_unless_given() -> None:
    message = error_of(with_(input={"uri": "data/"}))
    assert message.startswith("input.format: cannot infer the format from 'data/'")
    assert load(with_(input={"uri": "data/", "format": "parquet"})).input.format == "parquet"
    assert load(with_(input={"uri": "x.jsonl", "format": "parquet"})).input.format == "parquet"


def test_a_local_folder_takes_the_format_of_its_files(tmp_path) -> None:
    folder = tmp_path / "corpus"
    (folder / "2026" / "11").mkdir(parents=True)
    for name in ("a.jsonl", "2026/b.jsonl.gz", "2026/11/c.ndjson", "_SUCCESS", ".hidden.parquet"):
        (folder / name).write_text("")
    assert load(with_(input={"uri": str(folder)})).input.format == "jsonl"
    assert load(with_(input={"uri": f"{folder}/"})).input.format == "jsonl"
    (folder / "2026" / "d.parquet").write_text("")  # two formats: not guessed
    message = error_of(with_(input={"uri": str(folder)}))
    assert message.startswith(f"input.format: cannot infer the format from '{folder}'")
    assert error_of(with_(input={"uri": str(tmp_path / "missing")})).startswith("input.format: ")


# Redaction --------------------------------------------------------------------------------------


def test_redacted_dict() -> None:
    text = with_(
        input={"uri": "s3://${BUCKET}/*.jsonl", "storage_options": {"anon": False}},
        model={
            "checkpoint": "c/2b",
            "storage_options": {"token": "tok", "client_kwargs": {"endpoint_url": "http://x"}},
        },
        output={"uri": "out/", "storage_options": {"key": "k", "secret": "${SECRET}"}},
        prompts={"generate": "${PREFIX:-Q:} {prompt}"},
    )
    cfg = load(text, environ={"BUCKET": "bkt", "SECRET": "s3cr3t"})
    red = redacted_dict(cfg)
    assert red["input"]["storage_options"] == {"anon": "***"}
    assert red["model"]["storage_options"] == {
        "token": "***",
        "client_kwargs": {"endpoint_url": "***"},
    }
    assert red["output"]["storage_options"] == {"key": "***", "secret": "***"}
    assert red["input"]["uri"] == "***"
    assert red["prompts"]["generate"] == "***"
    assert red["model"]["checkpoint"] == "c/2b"
    assert red["output"]["uri"] == "out/"
    assert "s3cr3t" not in repr(red) and "bkt" not in repr(red)
    assert red["generation"] == cfg.generation.model_dump(mode="json")


def test_redacted_dict_masks_userinfo_and_query_strings_of_literal_uris() -> None:
    """Literal URIs (not only interpolated ones) lose their userinfo and query strings; paths and
    plain URIs stay as written."""
    text = with_(
        input={"uri": "s3://AKIA1:s3cr3t@bucket/in/*.jsonl?versionId=v9", "format": "jsonl"},
        model={"checkpoint": "https://hf.example/ckpt?token=t0k"},
        output={"uri": "gs://out/nightly/"},
        run={"checkpoint_uri": "/abs/ckpt"},
        prompts={"generate": "See https://u:pw@wiki.example/page. {prompt}"},
    )
    red = redacted_dict(load(text))
    assert red["input"]["uri"] == "s3://***@bucket/in/*.jsonl?versionId=***"
    assert red["model"]["checkpoint"] == "https://hf.example/ckpt?token=***"
    assert red["prompts"]["generate"] == "See https://***@wiki.example/page. {prompt}"
    assert (red["output"]["uri"], red["run"]["checkpoint_uri"]) == (
        "gs://out/nightly/",
        "/abs/ckpt",
    )
    assert not {"AKIA1", "s3cr3t", "v9", "t0k", "pw"} & set(re.split(r"\W+", repr(red)))


def test_error_messages_mask_the_uris_they_quote() -> None:
    message = error_of(with_(output={"uri": "out/", "format": "https://u:pw@h/x?sig=s1g"}))
    assert "(got 'https://***@h/x?sig=***')" in message
    assert "pw" not in message and "s1g" not in message


# Files and preflight ----------------------------------------------------------------------------


def local_job(tmp_path: Path, uri: str, **sections: Any) -> JobConfig:
    ckpt = tmp_path / "ckpt" / "2b"
    ckpt.mkdir(parents=True, exist_ok=True)
    base = {
        "task": "summarize",
        "input": {"uri": uri},
        "model": {"checkpoint": str(ckpt)},
        "output": {"uri": str(tmp_path / "out")},
    }
    base.update(sections)
    return load(yaml.safe_dump(base), run_id="r1", date="2024-01-02")


def test_preflight_local(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "2024-01-02").mkdir(parents=True)
    for name in ("b.jsonl", "a.jsonl", "skip.parquet"):
        (data / "2024-01-02" / name).write_text('{"text": "x"}\n')
    cfg = local_job(tmp_path, str(data / "{date}" / "*.jsonl"))
    preflight(cfg)
    assert cfg.input_files() == [
        str(data / "2024-01-02" / "a.jsonl"),
        str(data / "2024-01-02" / "b.jsonl"),
    ]


def test_preflight_local_no_match(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = local_job(tmp_path, str(tmp_path / "data" / "*.jsonl"))
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    assert str(info.value) == f"input.uri: no files match {tmp_path / 'data' / '*.jsonl'}"


def test_preflight_local_directory_and_single_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "day=1").mkdir(parents=True)
    (data / "day=1" / "part-0.parquet").write_text("")
    (data / "part-1.pq").write_text("")
    (data / "_SUCCESS").write_text("")
    (data / "notes.jsonl").write_text("")
    cfg = local_job(tmp_path, str(data), input={"uri": str(data), "format": "parquet"})
    assert cfg.input_files() == [str(data / "day=1" / "part-0.parquet"), str(data / "part-1.pq")]
    single = local_job(tmp_path, str(data / "notes.jsonl"))
    assert single.input_files() == [str(data / "notes.jsonl")]


def test_preflight_missing_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    cfg = local_job(
        tmp_path,
        str(tmp_path / "a.jsonl"),
        model={"checkpoint": str(tmp_path / "nope" / "2b")},
        toxicity={"checkpoint": str(tmp_path / "tox.ckpt")},
    )
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    assert info.value.errors == [
        ("model.checkpoint", f"not found: {tmp_path / 'nope' / '2b'}"),
        ("toxicity.checkpoint", f"not found: {tmp_path / 'tox.ckpt'}"),
    ]


def s3_job(bucket: str, options: dict[str, Any], uri: str, **sections: Any) -> JobConfig:
    base = {
        "task": "summarize",
        "input": {"uri": uri, "storage_options": options},
        "model": {"checkpoint": f"s3://{bucket}/models/2b", "storage_options": options},
        "output": {"uri": f"s3://{bucket}/out/{{date}}/"},
        "run": {"preflight_timeout_s": 20},
    }
    base.update(sections)
    return load(yaml.safe_dump(base), run_id="r1", date="2024-01-02")


def test_preflight_s3(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    fs.pipe(
        {
            f"{bucket}/in/2024-01-02/b.jsonl": b'{"text": "x"}\n',
            f"{bucket}/in/2024-01-02/a.jsonl": b'{"text": "x"}\n',
            f"{bucket}/models/2b/_METADATA": b"{}",
        }
    )
    cfg = s3_job(bucket, options, f"s3://{bucket}/in/{{date}}/*.jsonl")
    preflight(cfg)
    assert cfg.input_files() == [
        f"s3://{bucket}/in/2024-01-02/a.jsonl",
        f"s3://{bucket}/in/2024-01-02/b.jsonl",
    ]

    empty = s3_job(bucket, options, f"s3://{bucket}/in/2099-01-01/*.jsonl")
    with pytest.raises(ConfigError) as info:
        preflight(empty)
    assert str(info.value) == f"input.uri: no files match s3://{bucket}/in/2099-01-01/*.jsonl"


def test_preflight_s3_missing_bucket_and_checkpoint(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    bucket, options = s3_bucket
    missing = f"{bucket}-missing"
    cfg = s3_job(
        bucket,
        options,
        f"s3://{missing}/in/*.jsonl",
        model={"checkpoint": f"s3://{missing}/models/2b", "storage_options": options},
    )
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    paths = [path for path, _ in info.value.errors]
    assert paths == ["input.uri", "model.checkpoint"]
    assert missing in str(info.value)


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An HTTP endpoint that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def test_preflight_does_not_hang_on_a_silent_endpoint(
    s3_bucket: tuple[str, dict[str, Any]], silent_endpoint: str
) -> None:
    bucket, options = s3_bucket
    options = {**options, "client_kwargs": {"endpoint_url": silent_endpoint}}
    cfg = s3_job(bucket, options, f"s3://{bucket}/in/*.jsonl", run={"preflight_timeout_s": 1})
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    assert time.monotonic() - start < 5
    assert [path for path, _ in info.value.errors] == ["input.uri", "model.checkpoint"]
    assert "no answer from storage within 1 s" in str(info.value)


def test_loading_a_config_imports_no_jax(tmp_path: Path) -> None:
    """The answers a run directory gives (nothing to do, a changed config) come right after the
    config is loaded: loading it, plan checks included, must not pay for importing JAX."""
    import subprocess
    import sys

    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "task": "summarize",
                "input": {"uri": str(tmp_path / "in" / "*.jsonl")},
                "output": {"uri": str(tmp_path / "out")},
                "model": {"checkpoint": str(tmp_path / "ckpt")},
            }
        )
    )
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"id": 1, "text": "x"}\n')
    code = (
        "import sys\n"
        "from pipeline.config import load_job_config\n"
        f"load_job_config({str(config)!r}, run_id='r')\n"
        "print(sorted(m for m in ('jax', 'torch', 'detoxify') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("structured", "fragment"),
    [
        ({"json_schema": {"type": "strung"}}, "structured_output.json_schema: "),
        ({"regex": "(open"}, "structured_output.regex: "),
        ({"regex": "a", "choice": ["a"]}, "exactly one of"),
        ({}, "exactly one of"),
        ({"choice": []}, "structured_output.choice: "),
    ],
)
def test_structured_output_must_compile(structured: dict[str, Any], fragment: str) -> None:
    message = error_of(with_(generation={"structured_output": structured}))
    assert message.startswith("generation.structured_output") and fragment in message, message


def test_structured_output_loads() -> None:
    cfg = load(with_(generation={"structured_output": {"json_schema": {"type": "object"}}}))
    assert cfg.generation.structured_output.constraint().kind == "json_schema"
