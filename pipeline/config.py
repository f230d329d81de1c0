"""The job configuration: pydantic models, loading (YAML + ``--set`` + ``${VAR}``), preflight.

A job config is validated completely before any work starts, and every problem is reported as a
:class:`ConfigError` whose message has one ``<field.path>: <what is wrong>`` line per problem.

Loading (:func:`load_job_config`) goes: YAML -> ``--set`` overrides -> ``${VAR}`` interpolation
-> pydantic validation -> rendering of ``{date}`` / ``{run_id}`` in the URIs.

Raw and rendered URIs
    ``input.uri``, ``output.uri`` and ``run.checkpoint_uri`` may hold ``{date}`` and ``{run_id}``
    placeholders. ``JobConfig.model_validate(data)`` gives an *unrendered* config: those fields
    hold the templates. :meth:`JobConfig.rendered` returns a copy whose fields hold the rendered
    URIs (what every stage reads) and which remembers the templates (:attr:`JobConfig.templates`),
    the :attr:`JobConfig.run_id` and the :attr:`JobConfig.date` it was rendered with. Rendering a
    rendered config again starts from the remembered templates, so it never renders twice.
    :func:`load_job_config` returns a rendered config.

Interpolated values
    :func:`load_job_config` records the dotted path of every string that contained ``${...}``
    (:attr:`JobConfig.interpolated_paths`, e.g. ``output.storage_options.secret`` or
    ``input.passthrough.0``); copies made by :meth:`JobConfig.rendered` keep that record, and
    :func:`redacted_dict` masks those paths.
"""

from __future__ import annotations

import datetime as dt
import glob as _glob
import os
import re
import secrets
import string
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml
from fsspec.implementations.local import LocalFileSystem
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from pipeline import schema

Task = Literal["summarize", "qa", "generate"]
InputFormat = Literal["jsonl", "parquet"]

ROOT = "<root>"  # the path named by errors about the document as a whole
MASK = "***"
URI_FIELDS = ("input.uri", "output.uri", "run.checkpoint_uri")
URI_PLACEHOLDERS = ("date", "run_id")

_FORMAT_BY_SUFFIX: tuple[tuple[str, InputFormat], ...] = (
    (".jsonl.gz", "jsonl"),
    (".json.gz", "jsonl"),
    (".jsonl", "jsonl"),
    (".json", "jsonl"),
    (".parquet", "parquet"),
    (".pq", "parquet"),
)
# Placeholders each prompt template may use; all of them are required.
PROMPT_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "summarize": ("text",),
    "qa": ("text", "question"),
    "generate": ("prompt",),
}
# Columns the pipeline itself writes: a passthrough column of the same name would clash.
_RESERVED_COLUMNS = frozenset(
    {
        schema.ID,
        schema.SOURCE,
        schema.ERROR,
        schema.ERROR_KIND,
        schema.TASK,
        schema.PROMPT_IDS,
        schema.PROMPT_TOKENS,
        schema.PROMPT_TRUNCATED,
        schema.OUTPUT_TEXT,
        schema.OUTPUT_TOKENS,
        schema.FINISH_REASON,
        schema.TOXIC,
        schema.TOXICITY_DECISION,
        schema.MODEL,
        schema.RUN_ID,
    }
)
_RESERVED_PREFIXES = (schema.TOXICITY_PREFIX, schema.INPUT_TOXICITY_PREFIX)
_ENV_PATTERN = re.compile(r"\$(\$)?\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DATE_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")


class ConfigError(ValueError):
    """A job config problem; ``errors`` holds (field path, message) pairs, one line each in str()."""

    def __init__(self, errors: Sequence[tuple[str, str]]) -> None:
        self.errors: list[tuple[str, str]] = [(str(p), str(m)) for p, m in errors]
        super().__init__("\n".join(f"{path}: {message}" for path, message in self.errors))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errors,))

    @classmethod
    def at(cls, path: str, message: str) -> ConfigError:
        return cls([(path, message)])


# Sections ---------------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_uri_template(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        fields = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"bad placeholder syntax ({exc}); write {{{{ and }}}} for braces") from exc
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in URI_PLACEHOLDERS or spec or conversion:
            allowed = ", ".join(f"{{{p}}}" for p in URI_PLACEHOLDERS)
            raise ValueError(
                f"unknown placeholder {{{name}}}; allowed: {allowed} (write {{{{ and }}}} for "
                "literal braces)"
            )
    return value


def infer_format(uri: str) -> InputFormat | None:
    """The input format implied by the extension of ``uri`` (or of its glob), else None."""
    path = uri.split("?", 1)[0].rstrip("/").lower()
    for suffix, fmt in _FORMAT_BY_SUFFIX:
        if path.endswith(suffix):
            return fmt
    return None


class InputSection(_Section):
    uri: str = Field(
        min_length=1,
        description=(
            "Input files: a local path, a glob (`data/*.jsonl`, `s3://b/p/**/*.parquet`), a "
            "directory (every file of the format below it) or any fsspec URI. May contain {date} "
            "and {run_id}."
        ),
    )
    format: InputFormat | None = Field(
        default=None,
        validate_default=True,
        description=(
            "jsonl | parquet. When omitted, inferred from the URI's extension: .jsonl, .json, "
            ".jsonl.gz, .json.gz -> jsonl; .parquet, .pq -> parquet."
        ),
    )
    id_column: str | None = Field(
        default=None,
        description="Column holding a stable row id; when absent the id is a hash of source file "
        "and row content.",
    )
    text_column: str = Field(
        default="text", description="Column with the document (summarize) or the context (qa)."
    )
    question_column: str = Field(default="question", description="Column with the question (qa).")
    prompt_column: str = Field(default="prompt", description="Column with the prompt (generate).")
    passthrough: list[str] = Field(
        default_factory=list, description="Input columns copied unchanged to the output rows."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for the input filesystem (redacted in the manifest).",
    )
    num_blocks: int | None = Field(
        default=None,
        ge=1,
        description="Repartition the input into this many blocks (spreads small inputs over "
        "actors); None keeps the reader's blocks.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        _check_uri_template(value)
        return value

    @field_validator("format")
    @classmethod
    def _format(cls, value: InputFormat | None, info: ValidationInfo) -> InputFormat | None:
        if value is not None:
            return value
        uri = info.data.get("uri")
        if uri is None:  # already reported
            return None
        inferred = infer_format(uri)
        if inferred is None:
            raise ValueError(
                f"cannot infer the format from {uri!r}; set input.format to jsonl or parquet"
            )
        return inferred

    @field_validator("passthrough")
    @classmethod
    def _passthrough(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        for name in value:
            if name in seen:
                raise ValueError(f"column {name!r} is listed twice")
            seen.add(name)
            if name in _RESERVED_COLUMNS or name.startswith(_RESERVED_PREFIXES):
                raise ValueError(f"column {name!r} clashes with a column the pipeline writes")
        return value


class ModelSection(_Section):
    checkpoint: str = Field(
        min_length=1,
        description="RecurrentGemma checkpoint: a Kaggle variant directory (tokenizer.model in "
        "its parent) or a Hugging Face directory; local path or fsspec URI.",
    )
    dtype: Literal["bfloat16", "float32"] = Field(
        default="bfloat16", description="Dtype of parameters and activations."
    )
    replicas: int = Field(default=1, ge=1, description="Number of model actors (replicas).")
    gpus_per_replica: float = Field(
        default=0, ge=0, description="GPUs per replica; 0 runs the model on CPU."
    )
    resources_per_replica: dict[str, float] = Field(
        default_factory=dict,
        description='Extra Ray resources per replica, e.g. {"TPU": 4} for one TPU host. CPU and '
        "GPU go in cpus_per_replica / gpus_per_replica.",
    )
    cpus_per_replica: float = Field(default=1, ge=0, description="CPUs per replica.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for reading the checkpoint (redacted in the manifest).",
    )
    chat_template: bool | None = Field(
        default=None,
        description="Wrap prompts in the Gemma chat turn format; None means on when the "
        "checkpoint's name ends in -it (instruction-tuned).",
    )
    compilation_cache: bool = Field(
        default=True,
        description="Keep compiled executables on each node's local disk (JAX's persistent "
        "compilation cache, under $RGBATCH_CACHE_DIR/xla): restarted actors and later runs "
        "with the same model and engine shapes skip compilation.",
    )

    @field_validator("resources_per_replica")
    @classmethod
    def _resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name.upper() in ("CPU", "GPU"):
                raise ValueError(
                    f"{name!r}: use model.{name.lower()}s_per_replica for {name.upper()}s"
                )
            if amount < 0:
                raise ValueError(f"{name!r}: must be >= 0, got {amount}")
        return value

    @property
    def use_chat_template(self) -> bool:
        """Whether prompts get the chat format: ``chat_template``, else the ``-it`` suffix."""
        if self.chat_template is not None:
            return self.chat_template
        return self.checkpoint.rstrip("/").endswith("-it")


class GenerationSection(_Section):
    max_new_tokens: int = Field(default=256, ge=1, description="Most tokens generated per row.")
    max_prompt_tokens: int = Field(
        default=8192,
        ge=8,
        description="Most prompt tokens (template, BOS and chat markers included); longer "
        "prompts are handled by `truncation`.",
    )
    truncation: Literal["head", "tail", "error"] = Field(
        default="head",
        description="What to do with a prompt over max_prompt_tokens. Only the document text "
        "(the {text} / {prompt} value) is cut, never the template or the question: 'head' "
        "keeps the first tokens of the document text (drops its end), 'tail' keeps its last "
        "tokens (drops its start), 'error' makes the row an error (prompt_too_long).",
    )
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature; 0 is greedy.")
    top_k: int = Field(default=0, ge=0, description="Sample from the k most likely; 0 is off.")
    top_p: float = Field(
        default=1.0, gt=0, le=1, description="Nucleus sampling probability mass; 1 is off."
    )
    seed: int = Field(
        default=0, description="Base sampling seed; each row's seed derives from it and its id."
    )
    max_slots: int = Field(
        default=64, ge=1, description="Sequences decoded at once per replica (engine slots)."
    )
    prefill_batch: int = Field(default=8, ge=1, description="Prompts prefilled together.")
    prefill_chunk: int = Field(
        default=512,
        ge=1,
        description="Prompt tokens per prefill step (longer prompts are chunked).",
    )
    decode_steps: int = Field(
        default=16,
        ge=1,
        description="Most decode steps per host round-trip (a call returns early once "
        "prefill_batch slots are free and prompts are waiting).",
    )
    batch_size: int = Field(default=256, ge=1, description="Rows per model-stage batch.")


def _template_fields(template: str) -> list[tuple[str | None, str, str | None]]:
    return [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)]


class PromptsSection(_Section):
    summarize: str = Field(
        default="Summarize the following text.\n\n{text}\n\nSummary:",
        description="Template for summarize (str.format): must use {text}; write {{ and }} for "
        "literal braces.",
    )
    qa: str = Field(
        default="Answer the question using the context.\n\nContext: {text}\n\n"
        "Question: {question}\n\nAnswer:",
        description="Template for qa (str.format): must use {text} (the context) and {question}.",
    )
    generate: str = Field(
        default="{prompt}", description="Template for generate (str.format): must use {prompt}."
    )

    @field_validator("summarize", "qa", "generate")
    @classmethod
    def _template(cls, value: str, info: ValidationInfo) -> str:
        task = str(info.field_name)
        allowed = PROMPT_PLACEHOLDERS[task]
        shown = ", ".join(f"{{{p}}}" for p in allowed)
        try:
            fields = _template_fields(value)
        except ValueError as exc:
            raise ValueError(
                f"bad template syntax ({exc}); write {{{{ and }}}} for braces"
            ) from exc
        used: set[str] = set()
        for name, spec, conv in fields:
            if name is None:
                continue
            if name not in allowed or spec or conv:
                raise ValueError(
                    f"placeholder {{{name}}} is not allowed; {task} templates use only {shown} "
                    "(plain, without format specs; write {{ and }} for literal braces)"
                )
            used.add(name)
        missing = [p for p in allowed if p not in used]
        if missing:
            raise ValueError(f"template must use {', '.join(f'{{{p}}}' for p in missing)}")
        return value

    def template(self, task: Task) -> str:
        return getattr(self, task)


class ToxicitySection(_Section):
    enabled: bool = Field(default=True, description="Score outputs with detoxify.")
    model: Literal["original", "unbiased", "multilingual", "original-small", "unbiased-small"] = (
        Field(default="original", description="detoxify model type.")
    )
    checkpoint: str | None = Field(
        default=None,
        description="Local path or URI of a detoxify checkpoint (for clusters without internet); "
        "None downloads the released weights.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for reading the checkpoint (redacted in the manifest).",
    )
    threshold: float = Field(
        default=0.5, ge=0, le=1, description="A row is toxic when any label scores >= threshold."
    )
    action: Literal["annotate", "drop", "redact"] = Field(
        default="annotate",
        description="Policy for toxic rows: annotate (keep, flagged), drop (to rejected/ with "
        "scores) or redact (output_text replaced by redaction_text).",
    )
    score_inputs: bool = Field(
        default=False, description="Also score the input text (input_toxicity_<label>)."
    )
    replicas: int = Field(default=1, ge=1, description="Number of toxicity actors.")
    gpus_per_replica: float = Field(
        default=0, ge=0, description="GPUs per toxicity actor; 0 runs on CPU."
    )
    cpus_per_replica: float = Field(default=1, ge=0, description="CPUs per toxicity actor.")
    batch_size: int = Field(default=64, ge=1, description="Rows per toxicity batch.")
    redaction_text: str = Field(
        default="[redacted]", description="Replacement output text for redacted rows."
    )


class OutputSection(_Section):
    uri: str = Field(
        min_length=1,
        description="Output directory (local path or fsspec URI); the run writes under "
        "<uri>/<run id>/. May contain {date} and {run_id}.",
    )
    format: Literal["parquet", "jsonl"] = Field(
        default="parquet", description="Format of the part files."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for the output filesystem (redacted in the manifest).",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        _check_uri_template(value)
        return value


class RunSection(_Section):
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster address ('auto', 'ray://...'); None starts a local one.",
    )
    num_cpus: int | None = Field(
        default=None, ge=1, description="Logical CPUs of the local cluster; None lets Ray decide."
    )
    checkpoint_uri: str | None = Field(
        default=None,
        description="Where Ray Data's resume checkpoint lives; None lets the runner derive it. "
        "May contain {date} and {run_id}.",
    )
    progress_interval_s: float = Field(
        default=10, gt=0, description="Seconds between progress log lines."
    )
    preflight_timeout_s: float = Field(
        default=60,
        gt=0,
        description="Seconds preflight waits for storage (input listing, checkpoint lookups) "
        "before failing, so an unreachable endpoint fails fast instead of hanging.",
    )

    @field_validator("checkpoint_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return _check_uri_template(value)


class JobConfig(_Section):
    """A whole job. See the module docstring for raw vs rendered URIs."""

    task: Task = Field(description="summarize | qa | generate.")
    input: InputSection = Field(description="Where the rows come from.")
    model: ModelSection = Field(description="The RecurrentGemma model and its replicas.")
    generation: GenerationSection = Field(
        default_factory=GenerationSection, description="Decoding settings."
    )
    prompts: PromptsSection = Field(
        default_factory=PromptsSection, description="Prompt templates per task."
    )
    toxicity: ToxicitySection = Field(
        default_factory=ToxicitySection, description="Toxicity scoring and policy."
    )
    output: OutputSection = Field(description="Where results go.")
    run: RunSection = Field(default_factory=RunSection, description="Cluster and run settings.")

    _templates: dict[str, str | None] | None = PrivateAttr(default=None)
    _run_id: str | None = PrivateAttr(default=None)
    _date: str | None = PrivateAttr(default=None)
    _interpolated: frozenset[str] = PrivateAttr(default=frozenset())

    @property
    def templates(self) -> dict[str, str | None]:
        """The unrendered values of the URI fields, keyed by path (``input.uri``, ...)."""
        if self._templates is not None:
            return dict(self._templates)
        return {path: _get_path(self, path) for path in URI_FIELDS}

    @property
    def run_id(self) -> str | None:
        """The run id the URIs were rendered with; None for an unrendered config."""
        return self._run_id

    @property
    def date(self) -> str | None:
        """The date (YYYY-MM-DD) the URIs were rendered with; None for an unrendered config."""
        return self._date

    @property
    def is_rendered(self) -> bool:
        return self._run_id is not None

    @property
    def interpolated_paths(self) -> frozenset[str]:
        """Dotted paths of the values that came from ``${...}`` interpolation."""
        return self._interpolated

    def rendered(self, run_id: str, date: str | dt.date | None = None) -> JobConfig:
        """A copy with {date} / {run_id} rendered in the URI fields; ``date`` defaults to today (UTC)."""
        date_str = _check_date(date)
        _check_run_id(run_id)
        templates = self.templates
        values = {
            path: None if raw is None else raw.format(date=date_str, run_id=run_id)
            for path, raw in templates.items()
        }
        copy = self.model_copy(
            update={
                "input": self.input.model_copy(update={"uri": values["input.uri"]}),
                "output": self.output.model_copy(update={"uri": values["output.uri"]}),
                "run": self.run.model_copy(update={"checkpoint_uri": values["run.checkpoint_uri"]}),
            }
        )
        copy._templates = templates
        copy._run_id = run_id
        copy._date = date_str
        copy._interpolated = self._interpolated
        return copy

    def prompt_template(self) -> str:
        """The prompt template of this job's task."""
        return self.prompts.template(self.task)

    def input_files(self) -> list[str]:
        """Sorted, fully qualified input files (``s3://bucket/key`` remote, absolute paths local).

        A glob lists its matching files; a directory lists every file below it with an extension
        of ``input.format`` (names starting with ``_`` or ``.`` skipped); a file is itself.
        """
        uri = self.input.uri
        if not self.is_rendered and _has_placeholders(uri):
            raise ConfigError.at(
                "input.uri", "has {date}/{run_id} placeholders: render the config first"
            )
        return list_files(uri, self.input.format, self.input.storage_options)


# Loading ----------------------------------------------------------------------------------------


def new_run_id(now: dt.datetime | None = None) -> str:
    """A fresh, sortable run id: ``YYYYMMDDTHHMMSSZ-<6 hex>`` (UTC)."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def load_job_config(
    path: str | Path | None = None,
    *,
    text: str | None = None,
    overrides: Sequence[str] = (),
    run_id: str | None = None,
    date: str | dt.date | None = None,
    environ: Mapping[str, str] | None = None,
) -> JobConfig:
    """Loads, validates and renders a job config from a YAML file (``path``) or string (``text``).

    ``overrides`` are ``--set`` items (``generation.max_new_tokens=32``; the value is read as
    YAML, so ``input.passthrough=[title,url]`` is a list). ``${VAR}`` and ``${VAR:-default}``
    in string values come from ``environ`` (default ``os.environ``; the default applies when
    VAR is unset or empty; ``$${VAR}`` is a literal ``${VAR}``). ``run_id`` defaults to
    :func:`new_run_id`, ``date`` to today (UTC). Raises :class:`ConfigError` for every problem.
    """
    if (path is None) == (text is None):
        raise TypeError("pass exactly one of path or text")
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError.at(ROOT, f"cannot read {path}: {exc}") from exc
    assert text is not None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError.at(ROOT, f"invalid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError.at(ROOT, f"the top level must be a mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    data, interpolated = interpolate_env(data, os.environ if environ is None else environ)
    try:
        config = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_errors(exc, interpolated)) from None
    config._interpolated = frozenset(interpolated)
    now = dt.datetime.now(dt.UTC)
    return config.rendered(run_id or new_run_id(now), date or now.date())


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with ``a.b.c=value`` overrides applied (values read as YAML)."""
    data = _deep_copy(data)
    errors: list[tuple[str, str]] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            errors.append((f"--set {item}", "malformed override, expected a.b.c=value"))
            continue
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                errors.append((key, f"cannot set: {where} is not a mapping"))
                break
            node = child
        else:
            node[parts[-1]] = _parse_override_value(raw)
    if errors:
        raise ConfigError(errors)
    return data


def _parse_override_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:  # e.g. `*.jsonl` or `{date}/x`: plainly meant as a string
        return raw


def interpolate_env(data: Any, environ: Mapping[str, str]) -> tuple[Any, set[str]]:
    """``data`` with ``${VAR}`` / ``${VAR:-default}`` substituted, and the paths that had any."""
    interpolated: set[str] = set()
    errors: list[tuple[str, str]] = []

    def substitute(value: str, path: str) -> str:
        def one(match: re.Match[str]) -> str:
            escaped, name, default = match.groups()
            if escaped:
                return match.group(0)[1:]
            interpolated.add(path)
            found = environ.get(name)
            if found:
                return found
            if default is not None:
                return default
            if found is None:
                errors.append((path, f"environment variable {name} is not set"))
            return ""

        return _ENV_PATTERN.sub(one, value)

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, (*path, str(k))) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, (*path, str(i))) for i, v in enumerate(node)]
        if isinstance(node, str) and "$" in node:
            return substitute(node, ".".join(path) or ROOT)
        return node

    result = walk(data, ())
    if errors:
        raise ConfigError(errors)
    return result, interpolated


def _pydantic_errors(exc: ValidationError, hidden: set[str]) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or ROOT
        kind = err["type"]
        if kind == "missing":
            message = "field required"
        elif kind == "extra_forbidden":
            message = "unknown key (extra inputs are not permitted)"
        elif kind == "value_error":  # ours: the message names the value where it helps
            message = err["msg"].removeprefix("Value error, ")
        else:
            message = err["msg"]
            value = err.get("input")
            secret = path in hidden or "storage_options" in err["loc"]
            if not secret and isinstance(value, str | int | float | bool) and len(repr(value)) < 80:
                message += f" (got {value!r})"
        out.append((path, message))
    return out


def _check_date(date: str | dt.date | None) -> str:
    if date is None:
        return dt.datetime.now(dt.UTC).date().isoformat()
    if isinstance(date, dt.datetime):
        return date.date().isoformat()
    if isinstance(date, dt.date):
        return date.isoformat()
    try:
        if not _DATE_PATTERN.fullmatch(date):
            raise ValueError
        dt.date.fromisoformat(date)
    except (TypeError, ValueError):
        raise ConfigError.at("date", f"expected YYYY-MM-DD, got {date!r}") from None
    return date


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not _RUN_ID_PATTERN.fullmatch(run_id):
        raise ConfigError.at(
            "run_id", f"expected 1-128 characters from [A-Za-z0-9._-], got {run_id!r}"
        )


def _has_placeholders(uri: str) -> bool:
    return any(name for _, name, _, _ in string.Formatter().parse(uri))


def _get_path(config: BaseModel, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _deep_copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _deep_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deep_copy(v) for v in node]
    return node


# Manifest ---------------------------------------------------------------------------------------


def redacted_dict(config: JobConfig) -> dict[str, Any]:
    """The config as JSON-ready data with secrets masked as ``"***"``.

    Masked: every leaf under any ``storage_options`` (keys kept, nested mappings walked) and
    every value that came from ``${...}`` interpolation.
    """
    hidden = config.interpolated_paths

    def walk(node: Any, path: tuple[str, ...], under_options: bool) -> Any:
        if ".".join(path) in hidden:
            return MASK
        if isinstance(node, dict):
            return {
                k: walk(v, (*path, k), under_options or k == "storage_options")
                for k, v in node.items()
            }
        if under_options:
            return MASK
        if isinstance(node, list):
            return [walk(v, (*path, str(i)), under_options) for i, v in enumerate(node)]
        return node

    return walk(config.model_dump(mode="json"), (), False)


# Files and preflight ----------------------------------------------------------------------------


def list_files(uri: str, fmt: str | None, storage_options: Mapping[str, Any]) -> list[str]:
    """Sorted, fully qualified files matched by ``uri`` (a glob, a directory or a file)."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    fs.invalidate_cache()
    if _glob.has_magic(path):
        found = [p for p, info in fs.glob(path, detail=True).items() if info["type"] == "file"]
    elif fs.isdir(path):
        suffixes = tuple(s for s, f in _FORMAT_BY_SUFFIX if fmt is None or f == fmt)
        found = [
            p
            for p in fs.find(path)
            if p.lower().endswith(suffixes)
            and not any(part.startswith(("_", ".")) for part in _relative_parts(p, path))
        ]
    elif fs.isfile(path):
        found = [path]
    else:
        found = []
    return sorted(_qualify(fs, p) for p in found)


def _relative_parts(path: str, root: str) -> list[str]:
    return path[len(root.rstrip("/")) :].strip("/").split("/")


def _qualify(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def _exists(uri: str, storage_options: Mapping[str, Any]) -> bool:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    fs.invalidate_cache()
    return bool(fs.exists(path))


def preflight(config: JobConfig) -> None:
    """Cheap I/O checks before a job starts; raises :class:`ConfigError` naming each bad field.

    Checks that ``input.uri`` matches at least one file and that ``model.checkpoint`` (and
    ``toxicity.checkpoint`` when scoring is on and it is set) exist. The checks run in parallel in
    daemon threads and the whole preflight waits at most ``run.preflight_timeout_s`` seconds: a
    check still running then (an unreachable or silent endpoint; s3fs/botocore would otherwise
    retry and wait up to its 60 s read timeout per attempt) is reported as failed and left to
    finish in the background. No per-filesystem timeouts are changed.
    """
    checks: dict[str, Callable[[], str | None]] = {}
    inp = config.input

    def input_check() -> str | None:
        if not config.input_files():
            return f"no files match {inp.uri}"
        return None

    checks["input.uri"] = input_check
    checks["model.checkpoint"] = _exists_check(
        config.model.checkpoint, config.model.storage_options
    )
    tox = config.toxicity
    if tox.enabled and tox.checkpoint is not None:
        checks["toxicity.checkpoint"] = _exists_check(tox.checkpoint, tox.storage_options)
    errors = list(_run_with_deadline(checks, config.run.preflight_timeout_s))
    if errors:
        raise ConfigError(errors)


def _exists_check(uri: str, storage_options: Mapping[str, Any]) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if _exists(uri, storage_options) else f"not found: {uri}"

    return check


def _run_with_deadline(
    checks: Mapping[str, Callable[[], str | None]], timeout_s: float
) -> Iterator[tuple[str, str]]:
    results: dict[str, str | None] = {}

    def runner(path: str, check: Callable[[], str | None]) -> None:
        try:
            results[path] = check()
        except ConfigError as exc:
            results[path] = "; ".join(m for _, m in exc.errors)
        except Exception as exc:
            results[path] = f"cannot check ({type(exc).__name__}: {exc})"

    threads = {
        path: threading.Thread(
            target=runner, args=(path, check), name=f"preflight:{path}", daemon=True
        )
        for path, check in checks.items()
    }
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + timeout_s
    for path, thread in threads.items():
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            yield path, f"no answer from storage within {timeout_s:g} s (run.preflight_timeout_s)"
        elif results.get(path) is not None:
            yield path, str(results[path])
