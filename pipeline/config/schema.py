"""The job config schema: the sections, :class:`JobConfig`, allowed values, :class:`ConfigError`.

Each set of allowed values is defined once, as a ``Literal`` (:data:`Task`, :data:`InputFormat`,
...), and the tuples other modules check against (:data:`TASKS`, :data:`INPUT_FORMATS`, ...) are
derived from it with :func:`typing.get_args`; the formats' come from the registry of
:mod:`pipeline.formats`.

The raw vs rendered URIs of :class:`JobConfig` and its record of interpolated values are
described in the :mod:`pipeline.config` docstring.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import string
from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from model import prefix_cache
from model.engine_config import EngineConfig
from pipeline import formats

# Allowed values: one Literal per set, the tuples derived from it ---------------------------------

Task = Literal["summarize", "qa", "generate"]
InputFormat = Literal[formats.input_names()]  # type: ignore[valid-type]
OutputFormat = Literal[formats.output_names()]  # type: ignore[valid-type]
Dtype = Literal["bfloat16", "float32"]
Truncation = Literal["head", "tail", "error"]
ToxicityAction = Literal["annotate", "drop", "redact"]
ToxicityModel = Literal["original", "unbiased", "multilingual", "original-small", "unbiased-small"]

TASKS: tuple[Task, ...] = get_args(Task)
INPUT_FORMATS: tuple[InputFormat, ...] = get_args(InputFormat)
OUTPUT_FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)
DTYPES: tuple[Dtype, ...] = get_args(Dtype)
TRUNCATIONS: tuple[Truncation, ...] = get_args(Truncation)
TOXICITY_ACTIONS: tuple[ToxicityAction, ...] = get_args(ToxicityAction)
TOXICITY_MODELS: tuple[ToxicityModel, ...] = get_args(ToxicityModel)

ROOT = "<root>"  # the path named by errors about the document as a whole

# The run identity (pipeline.contract.run_identity) is read from these marks: every field of
# every section carries one (a test walks the schema), so a new field cannot be forgotten.
IDENTITY = {"identity": True}  # decides what the output rows hold: part of the run identity
CONTENT_IDENTITY = {"identity": "content"}  # a location whose content decides them, too
NOT_IDENTITY = {"identity": False}  # speed, resources, credentials, where the run's files go
URI_FIELDS = ("input.uri", "output.uri", "run.checkpoint_uri")
URI_PLACEHOLDERS = ("date", "run_id")


# Placeholders each prompt template may use; all of them are required.
PROMPT_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "summarize": ("text",),
    "qa": ("text", "question"),
    "generate": ("prompt",),
}
# The placeholder of the document per task: used exactly once (truncation cuts the text there).
DOCUMENT_PLACEHOLDER: dict[str, str] = {"summarize": "text", "qa": "text", "generate": "prompt"}
INT32_MAX = 2**31 - 1


def _fits_int32(value: Any) -> Any:
    """An integer setting that ends up in an int32 array of the engine (a budget, a position,
    a shape) must fit one; anything else (``'auto'``) passes."""
    if isinstance(value, int) and not -INT32_MAX - 1 <= value <= INT32_MAX:
        raise ValueError(f"must fit a 32-bit integer (at most {INT32_MAX:,}), got {value:,}")
    return value


INT32 = AfterValidator(_fits_int32)
"""The bound of every integer setting that reaches an int32 array: ``Annotated[int, INT32]``."""
Int32 = Annotated[int, INT32]
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


infer_format = formats.infer_format


_FOLDER_FILES_LOOKED_AT = 1000  # a folder's format is inferred from (about) this many names


def _infer_folder_format(uri: str) -> InputFormat | None:
    """The format of a local folder's files, when their endings all name the same one (names
    starting with ``_`` or ``.`` skipped, as the listing does); None otherwise. Only local
    folders are looked at: a config check reads no remote storage."""
    path = uri.removeprefix("file://")
    if "://" in path or not os.path.isdir(path):
        return None
    found: set[InputFormat] = set()
    looked = 0
    for root, dirs, files in os.walk(path):
        looked += len(files)
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        found.update(
            fmt
            for name in files
            if not name.startswith(("_", "."))
            and (fmt := infer_format(os.path.join(root, name))) is not None
        )
        if len(found) > 1:
            return None
        if looked >= _FOLDER_FILES_LOOKED_AT:
            break
    return found.pop() if len(found) == 1 else None


class InputSection(_Section):
    uri: str = Field(
        json_schema_extra=IDENTITY,
        min_length=1,
        description=(
            "Input files: a local path, a glob (`data/*.jsonl`, `s3://b/p/**/*.parquet`), a "
            "directory (every file of the format below it) or any fsspec URI. May contain {date} "
            "and {run_id}."
        ),
    )
    format: InputFormat | None = Field(
        json_schema_extra=IDENTITY,
        default=None,
        validate_default=True,
        description="The format of the input files; when omitted, inferred from the URI's "
        "file name ending, or for a local folder from its files' endings when they all name one "
        "format. " + formats.describe("input") + ".",
    )
    id_column: str | None = Field(
        json_schema_extra=IDENTITY,
        default=None,
        description="Column holding a stable row id; when absent the id is a hash of the source "
        'file, the row\'s position in it and its content. Values keep their type (42 and "42" '
        "are different ids); repeated ids are allowed: every row is generated and written, and "
        "the manifest counts them (ids_repeated, rows_with_repeated_ids).",
    )
    settings_column: str | None = Field(
        json_schema_extra=IDENTITY,
        default=None,
        description="Column holding per-row generation settings: an object (JSONL) or struct "
        "(Parquet) with OpenAI request body keys (max_tokens, temperature, top_p, top_k, seed, "
        "stop, n, logprobs, presence_penalty, ...) overriding generation.* for that row; a bad "
        "value makes the row an error (invalid_settings).",
    )
    text_column: str = Field(
        json_schema_extra=IDENTITY,
        default="text",
        description="Column with the document (summarize) or the context (qa).",
    )
    question_column: str = Field(
        json_schema_extra=IDENTITY,
        default="question",
        description="Column with the question (qa). A list of questions gives one output row "
        "per question, id <row id>/q<k> (k from 0), the question in the `question` column.",
    )
    prompt_column: str = Field(
        json_schema_extra=IDENTITY,
        default="prompt",
        description="Column with the prompt (generate).",
    )
    passthrough: list[str] = Field(
        json_schema_extra=IDENTITY,
        default_factory=list,
        description="Input columns copied unchanged to the output rows; a column named like one "
        "the pipeline writes (output_text, generated_at, toxicity_*, ...) is refused.",
    )
    storage_options: dict[str, Any] = Field(
        json_schema_extra=NOT_IDENTITY,
        default_factory=dict,
        description="fsspec storage options for the input filesystem (redacted in the manifest), "
        "e.g. {client_kwargs: {endpoint_url: ...}}; without them the standard environment "
        "applies (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...).",
    )
    max_row_bytes: int = Field(
        json_schema_extra=IDENTITY,
        default=32 << 20,
        ge=1024,
        description="Longest JSONL line read as a row (bytes); a longer line becomes an error "
        "row (row_too_large) and is never held in memory whole.",
    )
    num_blocks: int | None = Field(
        json_schema_extra=NOT_IDENTITY,
        default=None,
        ge=1,
        description="Repartition the input into this many blocks (spreads small inputs over "
        "actors); null keeps the reader's blocks.",
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
        inferred = infer_format(uri) or _infer_folder_format(uri)
        if inferred is None:
            inferable = " or ".join(r.name for r in formats.READERS.values() if r.inferred)
            raise ValueError(
                f"cannot infer the format from {uri!r}; set input.format to {inferable}"
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
        return value


class ModelSection(_Section):
    checkpoint: str = Field(
        json_schema_extra=CONTENT_IDENTITY,
        min_length=1,
        description="RecurrentGemma checkpoint: a Kaggle variant directory (tokenizer.model in "
        "its parent) or a Hugging Face directory; local path or fsspec URI. A remote one is "
        "copied once into $RGBATCH_CACHE_DIR (default ~/.cache/rg-batch), keyed by URI and "
        "content, and read from there.",
    )
    dtype: Dtype = Field(
        json_schema_extra=IDENTITY,
        default="bfloat16",
        description="Dtype of parameters and activations.",
    )
    replicas: int = Field(
        json_schema_extra=NOT_IDENTITY,
        default=1,
        ge=1,
        description="Number of model actors, each holding one model replica.",
    )
    gpus_per_replica: float = Field(
        json_schema_extra=NOT_IDENTITY,
        default=0,
        ge=0,
        description="GPUs per replica; 0 runs the model on CPU.",
    )
    resources_per_replica: dict[str, float] = Field(
        json_schema_extra=NOT_IDENTITY,
        default_factory=dict,
        description='Extra Ray resources per replica, e.g. {"TPU": 4} for one TPU host. CPU and '
        "GPU go in cpus_per_replica / gpus_per_replica.",
    )
    cpus_per_replica: float = Field(
        json_schema_extra=NOT_IDENTITY, default=1, ge=0, description="CPUs per replica."
    )
    storage_options: dict[str, Any] = Field(
        json_schema_extra=NOT_IDENTITY,
        default_factory=dict,
        description="fsspec storage options for reading the checkpoint (redacted in the manifest).",
    )
    chat_template: bool | None = Field(
        json_schema_extra=IDENTITY,
        default=None,
        description="Wrap prompts in the Gemma chat turn format; null means on when the "
        "checkpoint's name ends in -it (instruction-tuned).",
    )
    compilation_cache: bool = Field(
        json_schema_extra=NOT_IDENTITY,
        default=True,
        description="Keep compiled executables on each node's local disk (JAX's persistent "
        "compilation cache, under $RGBATCH_CACHE_DIR/xla): restarted actors and later runs "
        "with the same model and engine shapes skip compilation.",
    )

    tensor_parallel: int | None = Field(
        json_schema_extra=NOT_IDENTITY,
        default=None,
        ge=1,
        description="Devices one replica's weights and slot states are split over. null: the "
        "devices the actor is given (gpus_per_replica, or the TPU chips in "
        "resources_per_replica), else 1. On CPU, N > 1 splits the replica over N host devices "
        "(the sharded path without an accelerator).",
    )
    memory_fraction: float | None = Field(
        json_schema_extra=NOT_IDENTITY,
        default=None,
        gt=0,
        le=1,
        description="Share of each GPU JAX may take in a model actor "
        "(XLA_PYTHON_CLIENT_MEM_FRACTION, set before JAX starts there); null keeps JAX's 75%. "
        "Lower it so a toxicity actor can share the GPU.",
    )
    memory_headroom: float = Field(
        json_schema_extra=NOT_IDENTITY,
        default=0.1,
        ge=0,
        lt=1,
        description="Share of a device's memory the memory plan leaves free (allocator "
        "fragmentation, XLA temporaries it does not model).",
    )
    max_restarts: int = Field(
        json_schema_extra=NOT_IDENTITY,
        default=4,
        ge=-1,
        description="Times Ray restarts a model actor that died (its process or node lost, or a "
        "broken engine that made it exit) before the run fails; -1 restarts it forever (a replica "
        "that can never work then retries forever).",
    )
    batch_retries: int = Field(
        json_schema_extra=NOT_IDENTITY,
        default=2,
        ge=0,
        description="Times a model batch whose engine step raised is retried on the same actor "
        "(the engine is reset in between) before the run fails.",
    )
    max_failed_steps: int = Field(
        json_schema_extra=NOT_IDENTITY,
        default=3,
        ge=1,
        description="Consecutive failed engine steps after which a replica counts as broken and "
        "its actor exits so that Ray replaces it; a device out-of-memory is broken at once.",
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

    @model_validator(mode="after")
    def _parallel_fits_resources(self) -> ModelSection:
        given = self.devices_given
        if self.tensor_parallel is not None and given is not None and self.tensor_parallel != given:
            raise ValueError(
                f"tensor_parallel {self.tensor_parallel} does not match the {given} devices "
                "each replica is given (gpus_per_replica / TPU in resources_per_replica)"
            )
        fractional = self.gpus_per_replica != int(self.gpus_per_replica)
        if fractional and (self.tensor_parallel or 1) > 1:
            raise ValueError("a replica split over devices needs whole GPUs")
        return self

    @property
    def devices_given(self) -> int | None:
        """The accelerators each model actor gets (None: CPU, or a fraction of one GPU)."""
        if self.gpus_per_replica >= 1 and self.gpus_per_replica == int(self.gpus_per_replica):
            return int(self.gpus_per_replica)
        tpu = self.resources_per_replica.get("TPU")
        if tpu:
            return int(tpu)
        return None

    @property
    def replica_devices(self) -> int:
        """``tensor_parallel``, or the devices each replica is given, or 1."""
        return self.tensor_parallel or self.devices_given or 1

    @property
    def use_chat_template(self) -> bool:
        """Whether prompts get the chat format: ``chat_template``, else the ``-it`` suffix."""
        if self.chat_template is not None:
            return self.chat_template
        return self.checkpoint.rstrip("/").endswith("-it")


class StructuredOutputSection(_Section):
    """One of: a JSON schema, any JSON object, a regex, a list of choices."""

    json_schema: dict[str, Any] | None = Field(
        json_schema_extra=IDENTITY,
        default=None,
        description="Every output is JSON valid against this JSON schema (an object; written "
        "as json.dumps writes it: ', ' and ': ', no other whitespace; properties in the "
        "schema's order).",
    )
    json_object: bool = Field(
        json_schema_extra=IDENTITY,
        default=False,
        description="Every output is a JSON object (any keys; OpenAI's json_object).",
    )
    regex: str | None = Field(
        json_schema_extra=IDENTITY,
        default=None,
        description="Every output matches this regular expression as a whole.",
    )
    choice: list[str] | None = Field(
        json_schema_extra=IDENTITY,
        default=None,
        min_length=1,
        description="Every output is exactly one of these strings.",
    )

    @model_validator(mode="after")
    def _one_and_compiles(self) -> StructuredOutputSection:
        from model.grammar import ConstraintError

        given = [
            name for name in type(self).model_fields if getattr(self, name) not in (None, False)
        ]
        if len(given) != 1:
            raise ValueError(
                f"set exactly one of json_schema, json_object, regex, choice (got {given or 'none'})"
            )
        try:
            self.constraint().check()
        except ConstraintError as err:
            error = InitErrorDetails(
                type=PydanticCustomError("value_error", str(err)), loc=(given[0],), input=None
            )
            raise ValidationError.from_exception_data(type(self).__name__, [error]) from None
        return self

    def constraint(self) -> Any:
        """The :class:`model.grammar.Constraint` this section describes."""
        from model.grammar import Constraint

        if self.json_schema is not None:
            return Constraint.json_schema(self.json_schema)
        if self.regex is not None:
            return Constraint.regex(self.regex)
        if self.choice is not None:
            return Constraint.choice(self.choice)
        return Constraint.json_object()


_LOOP_WINDOW = EngineConfig.max_loop_window  # the loop guard's most tokens looked back


class GenerationSection(_Section):
    max_new_tokens: Int32 = Field(
        json_schema_extra=IDENTITY, default=256, ge=1, description="Most tokens generated per row."
    )
    max_prompt_tokens: Int32 = Field(
        json_schema_extra=IDENTITY,
        default=8192,
        ge=8,
        description="Most prompt tokens (template, BOS and chat markers included); longer "
        "prompts are handled by `truncation`.",
    )
    truncation: Truncation = Field(
        json_schema_extra=IDENTITY,
        default="head",
        description="What to do with a prompt over max_prompt_tokens. Only the document text "
        "(the {text} / {prompt} value) is cut, never the template or the question: 'head' "
        "keeps the first tokens of the document text (drops its end), 'tail' keeps its last "
        "tokens (drops its start), 'error' makes the row an error (prompt_too_long). Cut rows "
        "have prompt_truncated set.",
    )
    temperature: float = Field(
        json_schema_extra=IDENTITY,
        default=0.0,
        ge=0,
        description="Sampling temperature; 0 is greedy.",
    )
    top_k: Int32 = Field(
        json_schema_extra=IDENTITY,
        default=0,
        ge=0,
        description="Sample from the k most likely; 0 is off.",
    )
    top_p: float = Field(
        json_schema_extra=IDENTITY,
        default=1.0,
        gt=0,
        le=1,
        description="Nucleus sampling probability mass; 1 is off.",
    )
    seed: int = Field(
        json_schema_extra=IDENTITY,
        default=0,
        description="Base sampling seed; each row's seed derives from it and its id.",
    )
    stop: list[str] = Field(
        json_schema_extra=IDENTITY,
        default_factory=list,
        description="Stop strings (OpenAI `stop`): generation ends when the text ends with one "
        "(the engine stops the row: on the device for the string's plain encoding, on the host "
        "after each decode call for other spellings); the text is cut before it, finish_reason "
        "stop.",
    )
    min_tokens: Int32 = Field(
        json_schema_extra=IDENTITY,
        default=0,
        ge=0,
        description="Tokens generated before EOS, stop ids or stop strings may end a row (vLLM's "
        "min_tokens).",
    )
    presence_penalty: float = Field(
        json_schema_extra=IDENTITY,
        default=0.0,
        ge=-2,
        le=2,
        description="OpenAI presence_penalty: subtracted from the logit of every token generated "
        "so far (the prompt not counted).",
    )
    frequency_penalty: float = Field(
        json_schema_extra=IDENTITY,
        default=0.0,
        ge=-2,
        le=2,
        description="OpenAI frequency_penalty: times how often a token was generated so far, "
        "subtracted from its logit.",
    )
    repetition_penalty: float = Field(
        json_schema_extra=IDENTITY,
        default=1.0,
        gt=0,
        description="HF / vLLM repetition_penalty over prompt and output tokens: a seen "
        "token's logit is divided by it when positive, multiplied when negative; 1 is off.",
    )
    logprobs: int | None = Field(
        json_schema_extra=IDENTITY,
        default=None,
        ge=0,
        le=20,
        description="null: off; k: each output token's log-probability (log-softmax of the "
        "model's raw logits, before temperature and penalties) in output_logprobs and their "
        "mean in mean_logprob, and the k most likely alternatives in choices.",
    )
    n: Int32 = Field(
        json_schema_extra=IDENTITY,
        default=1,
        ge=1,
        description="Samples per row from one prefill; n > 1 keeps one output row per input row "
        "with the samples' texts in output_samples (sample 0 also in output_text).",
    )
    loop_ngram: Int32 = Field(
        json_schema_extra=IDENTITY,
        default=0,
        ge=0,
        description="Loop guard: end a row (finish_reason loop) whose last loop_ngram * "
        "loop_repeats tokens are one loop_ngram-token sequence repeated; 0 is off.",
    )
    loop_repeats: Int32 = Field(
        json_schema_extra=IDENTITY,
        default=8,
        ge=2,
        description="Repeats the loop guard waits for (loop_ngram * loop_repeats <= 64).",
    )
    max_slots: Annotated[int | Literal["auto"], INT32] = Field(
        json_schema_extra=NOT_IDENTITY,
        default=EngineConfig.max_slots,
        description="Sequences decoded at once per replica (engine slots). 'auto': the most "
        "that fit each device's memory (weights, slot states and workspace, per the memory "
        "plan), less model.memory_headroom; accelerators only (CPU reports no memory limit, so "
        "'auto' with CPU replicas is a config error).",
    )
    prefill_batch: Int32 = Field(
        json_schema_extra=NOT_IDENTITY,
        default=EngineConfig.prefill_batch,
        ge=1,
        description="Prompts prefilled together.",
    )
    prefill_chunk: Int32 = Field(
        json_schema_extra=NOT_IDENTITY,
        default=EngineConfig.prefill_chunk,
        ge=1,
        description="Prompt tokens per prefill step (longer prompts are chunked).",
    )
    decode_steps: Int32 = Field(
        json_schema_extra=NOT_IDENTITY,
        default=EngineConfig.decode_steps,
        ge=1,
        description="Most decode steps per host round-trip (a call returns early once "
        "prefill_batch slots are free and prompts are waiting).",
    )
    batch_size: int = Field(
        json_schema_extra=NOT_IDENTITY,
        default=256,
        ge=1,
        description="Rows per batch of the prompt and model stages; qa rows share their "
        "document's prefill only with rows of the same batch.",
    )
    prefix_cache_bytes: int = Field(
        json_schema_extra=NOT_IDENTITY,
        default=prefix_cache.DEFAULT_PREFIX_CACHE_BYTES,
        ge=0,
        description="Host memory (bytes) per replica for the states after shared prompt "
        "prefixes (qa: one per document, reused by every question about it; least recently "
        "used evicted first). Each state is the model's fixed per-sequence size (17.3 MB for 2B "
        "in bfloat16, so the 1 GiB default holds 62 documents); 0 turns reuse off.",
    )

    @field_validator("max_slots")
    @classmethod
    def _slots(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"must be >= 1 or 'auto', got {value}")
        return value

    @model_validator(mode="after")
    def _positions(self) -> GenerationSection:
        """A sequence's positions (prompt, then generated tokens) are int32 in the engine."""
        last = self.max_prompt_tokens + self.max_new_tokens - 1
        if last > INT32_MAX:
            message = (
                f"with max_prompt_tokens {self.max_prompt_tokens:,}, positions would run to "
                f"{last:,}, past the engine's 32-bit positions (at most {INT32_MAX:,})"
            )
            error = InitErrorDetails(
                type=PydanticCustomError("value_error", message),
                loc=("max_new_tokens",),
                input=None,
            )
            raise ValidationError.from_exception_data(type(self).__name__, [error])
        return self

    structured_output: StructuredOutputSection | None = Field(
        json_schema_extra=IDENTITY,
        default=None,
        description="Constrain every row's output (structured output): exactly one of "
        "json_schema (a JSON schema object: outputs are JSON valid against it, written as "
        "json.dumps writes it, properties in the schema's order), json_object (true: any JSON "
        "object), regex (the whole output matches it) or choice (a list of strings: the output "
        "is one of them). Tokens are drawn under the grammar's mask; "
        "an output that ends with finish_reason stop matches it, one cut by max_new_tokens "
        "ends with length (an unfinished prefix). Stop strings do not apply to constrained "
        "rows. An OpenAI request's response_format overrides it for that row.",
    )

    @model_validator(mode="after")
    def _controls(self) -> GenerationSection:
        """The loop guard's window and min_tokens fit the engine and the token limit."""
        problems = []
        if self.loop_ngram * self.loop_repeats > _LOOP_WINDOW:
            problems.append(("loop_ngram", f"loop_ngram * loop_repeats must be <= {_LOOP_WINDOW}"))
        if self.min_tokens > self.max_new_tokens:
            problems.append(("min_tokens", "must be <= max_new_tokens"))
        if problems:
            errors = [
                InitErrorDetails(
                    type=PydanticCustomError("value_error", message), loc=(name,), input=None
                )
                for name, message in problems
            ]
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    prompt_workers: int | None = Field(
        json_schema_extra=NOT_IDENTITY,
        default=None,
        ge=1,
        description="Most prompt-building actors (one CPU each; the pool grows from one as "
        "rows queue up); null lets the pool grow with the cluster.",
    )


def _template_fields(template: str) -> list[tuple[str | None, str, str | None]]:
    return [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)]


class PromptsSection(_Section):
    summarize: str = Field(
        json_schema_extra=IDENTITY,
        default="Summarize the following text.\n\n{text}\n\nSummary:",
        description="Template for summarize (str.format): must use {text} exactly once; write {{ "
        "and }} for literal braces.",
    )
    qa: str = Field(
        json_schema_extra=IDENTITY,
        default="Answer the question using the context.\n\nContext: {text}\n\n"
        "Question: {question}\n\nAnswer:",
        description="Template for qa (str.format): must use {text} (the context) exactly once "
        "and {question}.",
    )
    generate: str = Field(
        json_schema_extra=IDENTITY,
        default="{prompt}",
        description="Template for generate (str.format): must use {prompt} exactly once.",
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
        used: list[str] = []
        for name, spec, conv in fields:
            if name is None:
                continue
            if name not in allowed or spec or conv:
                raise ValueError(
                    f"placeholder {{{name}}} is not allowed; {task} templates use only {shown} "
                    "(plain, without format specs; write {{ and }} for literal braces)"
                )
            used.append(name)
        missing = [p for p in allowed if p not in used]
        if missing:
            raise ValueError(f"template must use {', '.join(f'{{{p}}}' for p in missing)}")
        document = DOCUMENT_PLACEHOLDER[task]
        if used.count(document) > 1:
            raise ValueError(
                f"template must use {{{document}}} exactly once (a document too long is cut "
                f"there), found it {used.count(document)} times"
            )
        return value

    def template(self, task: Task) -> str:
        return getattr(self, task)


class ToxicitySection(_Section):
    enabled: bool = Field(
        json_schema_extra=IDENTITY, default=True, description="Score outputs with detoxify."
    )
    model: ToxicityModel = Field(
        json_schema_extra=IDENTITY, default="original", description="detoxify model type."
    )
    checkpoint: str | None = Field(
        json_schema_extra=CONTENT_IDENTITY,
        default=None,
        description="Local path or URI of a detoxify checkpoint (for clusters without internet); "
        "null downloads the released weights.",
    )
    storage_options: dict[str, Any] = Field(
        json_schema_extra=NOT_IDENTITY,
        default_factory=dict,
        description="fsspec storage options for reading the checkpoint (redacted in the manifest).",
    )
    threshold: float = Field(
        json_schema_extra=IDENTITY,
        default=0.5,
        ge=0,
        le=1,
        description="A row is toxic when any label scores >= threshold.",
    )
    action: ToxicityAction = Field(
        json_schema_extra=IDENTITY,
        default="annotate",
        description="Policy for toxic rows: annotate (keep, flagged), drop (to rejected/ with "
        "scores) or redact (output_text replaced by redaction_text).",
    )
    score_inputs: bool = Field(
        json_schema_extra=IDENTITY,
        default=False,
        description="Also score the input text (input_toxicity_<label>).",
    )
    replicas: int = Field(
        json_schema_extra=NOT_IDENTITY, default=1, ge=1, description="Number of toxicity actors."
    )
    gpus_per_replica: float = Field(
        json_schema_extra=NOT_IDENTITY,
        default=0,
        ge=0,
        description="GPUs per toxicity actor; 0 runs on CPU.",
    )
    cpus_per_replica: float = Field(
        json_schema_extra=NOT_IDENTITY, default=1, ge=0, description="CPUs per toxicity actor."
    )
    batch_size: int = Field(
        json_schema_extra=NOT_IDENTITY, default=64, ge=1, description="Rows per toxicity batch."
    )
    redaction_text: str = Field(
        json_schema_extra=IDENTITY,
        default="[redacted]",
        description="Replacement output text for redacted rows.",
    )

    def identity_exempt(self) -> set[str]:
        """Marked fields that do not decide the rows here: all but ``enabled`` when scoring is
        off, ``redaction_text`` unless the action is redact."""
        if not self.enabled:
            return set(type(self).model_fields) - {"enabled"}
        return set() if self.action == "redact" else {"redaction_text"}


class OutputSection(_Section):
    uri: str = Field(
        json_schema_extra=NOT_IDENTITY,
        min_length=1,
        description="Output directory (local path or fsspec URI); the run writes under "
        "<uri>/<run id>/. May contain {date} and {run_id}.",
    )
    format: OutputFormat = Field(
        json_schema_extra=IDENTITY,
        default=formats.output_names()[0],
        description="Format of the part files. " + formats.describe("output") + ".",
    )
    rows_per_file: int = Field(
        json_schema_extra=NOT_IDENTITY,
        default=1024,
        ge=1,
        description="Rows gathered into one part file (and one resume checkpoint commit): larger "
        "means fewer files and fewer storage requests, smaller means less work redone after a "
        "crash.",
    )
    storage_options: dict[str, Any] = Field(
        json_schema_extra=NOT_IDENTITY,
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
        json_schema_extra=NOT_IDENTITY,
        default=None,
        description="Ray cluster address ('auto', 'ray://...'); null starts a Ray of the run's "
        "own, which never joins a cluster already running on the machine. 'auto' joins the "
        "cluster of this machine (submitted jobs and the nightly config use it).",
    )
    num_cpus: int | None = Field(
        json_schema_extra=NOT_IDENTITY,
        default=None,
        ge=1,
        description="Logical CPUs of the local Ray that `rgbatch run` starts; null gives "
        "max(8, the machine's CPUs), more than the cores so the stages' actor pools leave CPUs "
        "for the read tasks.",
    )
    checkpoint_uri: str | None = Field(
        json_schema_extra=NOT_IDENTITY,
        default=None,
        description="Where Ray Data's resume checkpoint lives; null puts it in the run "
        "directory (<run dir>/_checkpoint, removed once _SUCCESS is written); a location set "
        "here is left in place. May contain {date} and {run_id}.",
    )
    progress_interval_s: float = Field(
        json_schema_extra=NOT_IDENTITY,
        default=10,
        gt=0,
        description="Seconds between progress log lines.",
    )
    metrics_export_port: int | None = Field(
        json_schema_extra=NOT_IDENTITY,
        default=None,
        ge=1,
        le=65535,
        description="Port of the Prometheus endpoint of the local Ray that `rgbatch run` starts "
        "when no ray_address is set (http://<host>:<port>/metrics); null: none. On a cluster "
        "each node exports its own (`ray start --metrics-export-port`).",
    )
    estimate: bool = Field(
        json_schema_extra=NOT_IDENTITY,
        default=True,
        description="Estimate rows and tokens from a sample of the corpus when the run starts "
        "(`rgbatch validate --estimate` prints the same) and record it in the manifest beside "
        "the actual counts.",
    )
    estimate_tokens_per_s: float | None = Field(
        json_schema_extra=NOT_IDENTITY,
        default=None,
        gt=0,
        description="Generated tokens per second per replica (a previous run's "
        "throughput.output_tokens_per_s over its replicas): the run's estimate then includes a "
        "wall time.",
    )
    metrics_linger_s: float = Field(
        json_schema_extra=NOT_IDENTITY,
        default=0,
        ge=0,
        description="Seconds the driver stays up after the run ends, succeeded or failed, so "
        "that Prometheus scrapes its final state (rgbatch_run_state) before it is gone.",
    )
    preflight_timeout_s: float = Field(
        json_schema_extra=NOT_IDENTITY,
        default=60,
        gt=0,
        description="Seconds preflight waits for storage (input listing, checkpoint lookups) "
        "before failing, so an unreachable endpoint fails fast instead of hanging.",
    )

    max_error_fraction: float = Field(
        json_schema_extra=NOT_IDENTITY,
        default=0.5,
        ge=0,
        le=1,
        description="Most rows that may end as error rows, as a fraction of all rows; past it "
        "the run fails (exit 1, no _SUCCESS) and the manifest names the dominant error kinds.",
    )
    resource_wait_s: float = Field(
        json_schema_extra=NOT_IDENTITY,
        default=1200,
        gt=0,
        description="Seconds a run waits for the cluster to have room for one actor of each "
        "stage (a model replica's GPUs / TPU chips and CPUs, a toxicity actor's), an autoscaler "
        "adding nodes included, before it fails naming the request; nothing is written before. "
        "On the local cluster the CLI starts, a request its node can never meet is a config "
        "error at once (exit 2).",
    )
    lease_timeout_s: float = Field(
        json_schema_extra=NOT_IDENTITY,
        default=120,
        gt=0,
        description="Seconds without a heartbeat after which another driver may take over a "
        "run in progress (its driver died); a live driver renews its lease every quarter of it.",
    )

    @field_validator("checkpoint_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return _check_uri_template(value)


class JobConfig(_Section):
    """A whole job. See the :mod:`pipeline.config` docstring for raw vs rendered URIs."""

    task: Task = Field(
        json_schema_extra=IDENTITY,
        description="What each row asks for: summarize (input.text_column), qa (answer "
        "input.question_column about input.text_column) or generate (continue "
        "input.prompt_column).",
    )
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

    @model_validator(mode="wrap")
    @classmethod
    def _formats(cls, data: Any, handler: Any) -> JobConfig:
        """What the input and output formats need of the config, each error at its field."""
        config = handler(data)
        problems = [
            *formats.reader(config.input.format).config_problems(config),
            *formats.writer(config.output.format).config_problems(config),
            *_device_problems(config),
        ]
        errors = [
            InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=None)
            for loc, message in problems
        ]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return config

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

    def identity_exempt(self) -> set[str]:
        """Marked fields that do not decide this job's rows: the other tasks' templates, and
        the toxicity section's as it says (:meth:`ToxicitySection.identity_exempt`)."""
        exempt = {f"prompts.{task}" for task in TASKS if task != self.task}
        return exempt | {f"toxicity.{name}" for name in self.toxicity.identity_exempt()}

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
        return formats.list_files(uri, self.input.format, self.input.storage_options)


def _device_problems(config: JobConfig) -> list[tuple[tuple[str, ...], str]]:
    """Settings the model actors would refuse once started: ``max_slots: auto`` needs a device
    memory limit, which a CPU replica (no GPU, no TPU) does not report."""
    model = config.model
    on_cpu = model.gpus_per_replica == 0 and not model.resources_per_replica.get("TPU")
    if config.generation.max_slots == "auto" and on_cpu:
        message = (
            "'auto' needs an accelerator's memory limit, and the replicas run on CPU "
            "(model.gpus_per_replica 0, no TPU): set a number of slots"
        )
        return [(("generation", "max_slots"), message)]
    return []


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
