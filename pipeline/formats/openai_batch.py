"""OpenAI batch files: request lines in, response lines out (``input/output.format: openai_batch``).

The format is the one OpenAI's Batch API and ``vllm run-batch`` read and write. A request line::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_tokens": 64, "temperature": 0.7}}

(``url: /v1/completions`` with ``body.prompt`` for plain completions). A response line::

    {"id": "batch_req_...", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "req_...", "body": <chat.completion |
                  text_completion object, usage filled in>},
     "error": null,
     "rgbatch": {"row_id": ..., "toxicity": {label: score}, "toxic": ..., ...}}

Reading (:class:`OpenAIBatchReader`): the line rules of :mod:`pipeline.formats.jsonl`; every
non-blank line is one row. A valid request becomes a ``generate`` row whose ``prompt`` is the text
to continue (chat messages rendered with Gemma's chat markers by :func:`render_chat`, so the prompt
stage must not wrap them again: the reader says its prompts are ready; a completions ``prompt`` as
is), the request's ``custom_id`` and endpoint in :data:`REQ_CUSTOM_ID` / :data:`REQ_ENDPOINT`, and
the honoured body parameters as the row's settings (:data:`pipeline.request.ROW_SETTINGS`). A line
that is not a valid, supported
request is still a row, with ``error`` / ``error_kind`` set (``invalid_request``, or the reader's
``invalid_json`` / ``invalid_utf8`` / ``row_too_large``), and becomes an error line.

Ids: a row's ``id`` is its ``custom_id``. A line without a usable custom_id (missing, blank, not
a string) and every repeat of a custom_id already seen earlier in the same file get the reader's
derived id (hash of file, line number and line bytes) and an ``invalid_custom_id`` error, so ids
stay unique within a file whatever the file holds (Ray Data's resume and the exactly-once check
need that). Such rows, and every other row without a custom_id (a line that is no JSON object, a
file that could not be read), are never written as response lines: the writer sends them to the
error file, ``errors/part-*.jsonl`` (:meth:`OpenAIBatchWriter.error_rows`,
:func:`error_file_line`), as OpenAI's batch error file holds them; they still count as rows out of
their input file. The set of custom_ids seen lives in the read task, one file at a time. Repeats across
files are not errors; the reader records each custom_id in the run's id ledger, so the manifest
counts them (``ids_repeated``), as it does for ``input.id_column``.

Integer settings are checked against the type of their column in the row settings struct
(``max_tokens`` 1 to 2^31-1, ``seed`` any 64-bit integer); a value past it is an
``invalid_request`` line naming the field, and a value that still does not fit its column makes
only its own row an error (:meth:`RequestRows.flush`), never the batch.

Generation (the row's settings, applied by the model stage under the rules of
:mod:`pipeline.request`): ``max_tokens`` (or ``max_completion_tokens``) becomes the row's
``max_new_tokens``, capped at ``generation.max_new_tokens``; ``temperature`` and ``top_p`` replace
the job's for that row (``generation.top_k`` still applies); ``seed`` replaces the row's derived
seed; ``stop`` strings end generation and cut the text (``completion_tokens`` counts the tokens up
to the stop); chat requests also stop at Gemma's ``<end_of_turn>``. ``response_format`` ``{"type":
"json_object"}`` or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
constrains the output (structured output, :mod:`model.grammar`; every schema is enforced as if
``strict`` were true); a schema that does not compile makes the line an error line.

Also honoured: ``n`` (choices 0..n-1 from one prefill, usage counting the prompt once),
``logprobs`` / ``top_logprobs`` (OpenAI's chat and completions shapes; raw log-softmax, see
docs/guide.md), ``presence_penalty`` / ``frequency_penalty``, and vLLM's ``repetition_penalty``,
``min_tokens`` and ``top_k``. The same body keys set a corpus row's settings from
``input.settings_column`` (:func:`row_settings_from_body`).

Unsupported parameters that would change the answer are errors, never silently ignored:
``best_of`` other than 1, ``stream: true``, ``echo``, tools and functions, a
``response_format`` other than text, json_object or json_schema, a non-empty ``logit_bias``,
``suffix``. Other body fields (``model``, ``user``, ``metadata``, ``store``, ``stream_options``,
...) are ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from model.tokenizer import END_OF_TURN, START_OF_TURN
from pipeline import columns as S
from pipeline.formats import jsonl
from pipeline.formats.base import (
    KeyedBatch,
    Problems,
    Reader,
    ReadSpec,
    Writer,
    is_unreadable,
)
from pipeline.formats.rows import derive_id, resume_key
from pipeline.request import ROW_SETTINGS, ROW_SETTINGS_TYPE
from pipeline.request_body import (
    CHAT,
    COMPLETIONS,
    RequestError,
    body_params,
    check_unsupported,
    settings_values,
)
from pipeline.secrets import mask_uri

if TYPE_CHECKING:
    from pipeline.config import JobConfig

FORMAT = "openai_batch"
REQUEST_PREFIX = "req_"  # the request columns start with it; passthrough columns may not
REQ_CUSTOM_ID = "req_custom_id"  # str | null: the line's custom_id as given
REQ_ENDPOINT = "req_endpoint"  # "chat" | "completions" | null (the line is no valid request)
ENDPOINTS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS}
INVALID_REQUEST = "invalid_request"  # the error kind of a line that is no valid, supported request
INVALID_CUSTOM_ID = "invalid_custom_id"  # the error kind of a line without a usable custom_id
ERRORS_DIR = "errors"  # the error file's directory in the run directory, as OpenAI's batches

REQUEST_SCHEMA = pa.schema(
    [
        pa.field(REQ_CUSTOM_ID, pa.string()),
        pa.field(REQ_ENDPOINT, pa.string()),
        pa.field(ROW_SETTINGS, ROW_SETTINGS_TYPE),
    ]
)
"""The columns the reader adds after ``READ_SCHEMA``."""

_SYSTEM_ROLES = ("system", "developer")
_GEMMA_ROLES = {"user": "user", "assistant": "model"}


@dataclasses.dataclass(frozen=True)
class Request:
    """One parsed request: the prompt to continue and the honoured body parameters."""

    endpoint: str  # CHAT | COMPLETIONS
    prompt: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    constraint: str | None = None  # response_format as a model.grammar.Constraint's JSON text
    top_k: int | None = None
    min_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logprobs: int | None = None  # None: off; k: the top k alternatives too
    n: int | None = None


# ------------------------------------------------------------------------------- parsing


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(f"{where}.content[{k}] is a {kind!r} part; only text parts")
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.content[{k}].text must be a string")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{where}.content must be a string or a list of text parts")


def render_chat(messages: Any) -> str:
    """Gemma's chat format for OpenAI ``messages``, ending where the model's turn begins.

    Gemma has no system role: leading system / developer messages are joined with blank lines
    and put before the first user turn's text. Then user and assistant messages must alternate,
    starting with a user message (roles user -> ``user``, assistant -> ``model``). A single user
    message renders exactly as :meth:`model.tokenizer.Tokenizer.chat_prompt`.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("body.messages must be a non-empty list")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for k, message in enumerate(messages):
        where = f"body.messages[{k}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object")
        role = message.get("role")
        if message.get("tool_calls") or message.get("function_call"):
            raise RequestError(f"{where} holds tool calls, which are not supported")
        if role in _SYSTEM_ROLES:
            if turns:
                raise RequestError(f"{where}: a {role} message must come before the others")
            system.append(_text_of(message.get("content"), where))
            continue
        if role not in _GEMMA_ROLES:
            raise RequestError(f"{where}.role {role!r} is not supported (system, user, assistant)")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise RequestError(
                f"{where}: roles must alternate user / assistant starting with user, "
                f"expected {expected}, got {role}"
            )
        turns.append((_GEMMA_ROLES[role], _text_of(message.get("content"), where)))
    if not turns:
        raise RequestError("body.messages holds no user message")
    if system:
        turns[0] = ("user", "\n\n".join([*system, turns[0][1]]))
    parts = [f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n" for role, text in turns]
    return "".join(parts) + f"{START_OF_TURN}model\n"


def _completion_prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("body.prompt must be a string (or a list of one string)")
    return prompt


def parse_request(line: dict[str, Any]) -> Request:
    """The request of a parsed line (its ``custom_id`` is checked apart); raises RequestError."""
    method = line.get("method")
    if method != "POST":
        raise RequestError(f"method must be 'POST', got {method!r}")
    url = line.get("url")
    endpoint = ENDPOINTS.get(url) if isinstance(url, str) else None
    if endpoint is None:
        raise RequestError(f"url {url!r} is not supported; expected one of {list(ENDPOINTS)}")
    body = line.get("body")
    if not isinstance(body, dict):
        raise RequestError("body must be an object")
    check_unsupported(body)
    if endpoint == CHAT:
        if "messages" not in body:
            raise RequestError("body.messages is missing")
        prompt = render_chat(body["messages"])
    else:
        if "prompt" not in body:
            raise RequestError("body.prompt is missing")
        prompt = _completion_prompt(body["prompt"])
    return Request(endpoint, prompt, **body_params(body, endpoint))


def custom_id_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a custom_id, or None."""
    if value is None:
        return "custom_id is missing"
    if not isinstance(value, str):
        return f"custom_id must be a string, got {type(value).__name__}"
    if not value.strip():
        return "custom_id is blank"
    return None


# ------------------------------------------------------------------------------- reading


class RequestRows:
    """Rows of one openai_batch file, in batches; remembers the custom_ids seen in the file.

    The reader hands each non-blank line over (:meth:`add`) with the parsed object, or the
    reason it did not parse, and the line's derived id and row key.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self._seen: set[str] = set()
        self._reset()

    def _reset(self) -> None:
        names = [*S.READ_SCHEMA.names, *REQUEST_SCHEMA.names]
        self._columns: dict[str, list[Any]] = {name: [] for name in names}
        self.id_keys: list[str | None] = []
        self._positions: list[int] = []

    def __len__(self) -> int:
        return len(self._columns[S.ID])

    def add(
        self,
        line: dict[str, Any] | None,
        problem: tuple[str, str] | None,
        *,
        derived_id: str,
        key: str,
        position: int,
    ) -> None:
        """One row: ``line`` is the parsed object, or None with ``problem`` (kind, message)."""
        values: dict[str, Any] = {S.ID: derived_id, S.ROW_KEY: key, S.SOURCE: self.source}
        errors: list[str] = []
        kind, message = problem or (None, None)
        id_key = None
        if line is not None:
            custom_id = line.get("custom_id")
            issue = custom_id_problem(custom_id)
            if issue is None:
                values[REQ_CUSTOM_ID] = custom_id
                id_key = "s:" + custom_id
                if custom_id in self._seen:
                    issue = f"custom_id {custom_id!r} repeats an earlier line of this file"
                else:
                    self._seen.add(custom_id)
                    values[S.ID] = custom_id
            if issue is not None:
                errors.append(issue)
            url = line.get("url")
            values[REQ_ENDPOINT] = ENDPOINTS.get(url) if isinstance(url, str) else None
            try:
                request = parse_request(line)
            except RequestError as err:
                errors.append(str(err))
            else:
                values.update(_request_values(request))
            if errors:
                kind = INVALID_CUSTOM_ID if issue is not None else INVALID_REQUEST
                message = f"line {position + 1}: " + "; ".join(errors)
        values[S.ERROR], values[S.ERROR_KIND] = message, kind
        if values[S.ERROR] is not None:
            values[S.PROMPT] = None
        for name, column in self._columns.items():
            column.append(values.get(name))
        self.id_keys.append(id_key)
        self._positions.append(position)

    def flush(self) -> tuple[pa.Table, list[str | None]]:
        """The rows added since the last flush (a READ_SCHEMA + REQUEST_SCHEMA table), and the
        typed id key of each (``s:<custom_id>``, None without one) for the run's id ledger.

        A row holding a value its column's type cannot take (a setting past the bounds the
        parser checks) becomes an ``invalid_request`` row naming its line and column, so one
        line never fails the batch."""
        schema = pa.schema([*S.READ_SCHEMA, *REQUEST_SCHEMA])
        try:
            arrays = [pa.array(self._columns[f.name], f.type) for f in schema]
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            self._reject_unfit(schema)
            arrays = [pa.array(self._columns[f.name], f.type) for f in schema]
        table = pa.Table.from_arrays(arrays, schema=schema)
        keys = self.id_keys
        self._reset()
        return table, keys

    def _reject_unfit(self, schema: pa.Schema) -> None:
        for i, position in enumerate(self._positions):
            for f in schema:
                try:
                    pa.array([self._columns[f.name][i]], f.type)
                except (pa.ArrowException, OverflowError, TypeError, ValueError) as err:
                    message = f"line {position + 1}: a value of column {f.name!r} does not fit "
                    self._columns[S.ERROR][i] = message + f"{f.type}: {err}"
                    self._columns[S.ERROR_KIND][i] = INVALID_REQUEST
                    self._columns[S.PROMPT][i] = None
                    self._columns[ROW_SETTINGS][i] = None
                    if f.nullable:
                        self._columns[f.name][i] = None
                    break


def _request_values(request: Request) -> dict[str, Any]:
    params = {
        f.name: getattr(request, f.name)
        for f in dataclasses.fields(request)
        if f.name not in ("endpoint", "prompt")
    }
    settings = settings_values(params, chat=request.endpoint == CHAT)
    return {S.PROMPT: request.prompt, REQ_ENDPOINT: request.endpoint, ROW_SETTINGS: settings}


class OpenAIBatchReader(Reader):
    name = FORMAT
    description = (
        "OpenAI Batch API / vllm run-batch request lines (JSONL files; never inferred from the "
        "name: set it; task generate)"
    )
    suffixes = jsonl.JsonlReader.suffixes
    inferred = False
    prompts_ready = True
    row_settings = True
    reserved = (REQUEST_PREFIX + "*",)
    maps_columns = False  # request lines, checked line by line: a bad one is an error line
    error_kinds = (INVALID_REQUEST, INVALID_CUSTOM_ID)
    answered_errors = (
        INVALID_REQUEST,
        INVALID_CUSTOM_ID,
        "invalid_json",
        "invalid_utf8",
        "row_too_large",
        "prompt_too_long",
    )

    def read(self, uri: str, spec: ReadSpec) -> Iterator[KeyedBatch]:
        """One row per non-blank line (see the module docstring)."""
        source = mask_uri(uri)
        rows = RequestRows(source)
        try:
            for position, raw, too_large in jsonl.row_lines(uri, spec):
                if too_large is not None:
                    obj, kind, message = (
                        None,
                        *jsonl.too_large_error(position, too_large, spec.max_row_bytes),
                    )
                else:
                    obj, kind, message = jsonl.parse_line(raw, position)
                rows.add(
                    obj,
                    (kind, message) if obj is None else None,
                    derived_id=derive_id(source, position, raw),
                    key=resume_key(source, position),
                    position=position,
                )
                if len(rows) >= spec.batch_rows:
                    yield rows.flush()
        except Exception as err:
            if len(rows) and is_unreadable(err):
                yield rows.flush()  # the lines read before the damage are kept
            raise
        if len(rows):
            yield rows.flush()

    def columns(self, spec: ReadSpec) -> list[str]:
        return [*S.READ_SCHEMA.names, *REQUEST_SCHEMA.names]

    def schema(self, spec: ReadSpec) -> pa.Schema:
        return pa.schema([*S.READ_SCHEMA, *REQUEST_SCHEMA])

    def check(self, spec: ReadSpec) -> None:
        if spec.id_column is not None or spec.passthrough:
            raise ValueError(
                f"{FORMAT} input takes no id_column (custom_id is the id) or passthrough"
            )

    def records_ids(self, spec: ReadSpec) -> bool:
        return True  # custom_id is the id

    def file_columns(self, uri: str, storage_options: Mapping[str, Any]) -> set[str]:
        return jsonl.sniff_keys(uri, storage_options)

    def config_problems(self, config: JobConfig) -> Problems:
        problems: Problems = []
        inp = config.input
        if config.task != "generate":
            problems.append((("task",), f"input.format {FORMAT} needs task generate"))
        if inp.id_column is not None:
            message = f"not used with input.format {FORMAT}: custom_id is the id"
            problems.append((("input", "id_column"), message))
        if inp.passthrough:
            message = f"not supported with input.format {FORMAT} (the request is the row)"
            problems.append((("input", "passthrough"), message))
        if config.prompts.generate != type(config.prompts).model_fields["generate"].default:
            message = f"not used with input.format {FORMAT}: each request is its own prompt"
            problems.append((("prompts", "generate"), message))
        return problems


# ------------------------------------------------------------------------------- writing

_ERROR_CODES = {
    "invalid_request": (400, "invalid_request"),
    INVALID_CUSTOM_ID: (400, INVALID_CUSTOM_ID),
    "unreadable_file": (400, "unreadable_file"),
    "invalid_json": (400, "invalid_json_line"),
    "invalid_utf8": (400, "invalid_json_line"),
    "row_too_large": (400, "request_too_large"),
    "prompt_too_long": (400, "context_length_exceeded"),
    "missing_text": (400, "invalid_request"),
    "not_a_string": (400, "invalid_request"),
    "empty_text": (400, "invalid_request"),
    "generation": (500, "generation_failed"),
    "toxicity": (500, "toxicity_scoring_failed"),
}


def _digest(run_id: str, row_id: str) -> str:
    return hashlib.sha256(f"{run_id}\n{row_id}".encode()).hexdigest()[:24]


def _extra(row: dict[str, Any]) -> dict[str, Any]:
    """What rg-batch adds to a line: the row id, toxicity scores and decision, errors."""
    scores = {
        name[len(S.TOXICITY_PREFIX) :]: value
        for name, value in row.items()
        if name.startswith(S.TOXICITY_PREFIX) and name != S.TOXICITY_DECISION
    }
    extra = {
        "row_id": row[S.ID],
        "source": row.get(S.SOURCE),
        "toxicity": scores,
        "toxic": row.get(S.TOXIC),
        "toxicity_decision": row.get(S.TOXICITY_DECISION),
        "error_kind": row.get(S.ERROR_KIND),
        "finish_reason": row.get(S.FINISH_REASON),
    }
    if row.get(S.ERROR) is not None:
        extra["error"] = row[S.ERROR]
    return extra


def _chat_logprobs(tokens: list[dict[str, Any]]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [
        {**entry(t["token"], t["logprob"]), "top_logprobs": [entry(a, v) for a, v in t["top"]]}
        for t in tokens
    ]
    return {"content": content, "refusal": None}


def _completion_logprobs(tokens: list[dict[str, Any]]) -> dict[str, Any]:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t["token"])
    return {
        "tokens": [t["token"] for t in tokens],
        "token_logprobs": [t["logprob"] for t in tokens],
        "top_logprobs": [dict(t["top"]) for t in tokens],
        "text_offset": offsets,
    }


def _body(row: dict[str, Any], digest: str) -> dict[str, Any]:
    """The completion object: one choice per sample (the choices column when the row has one:
    n > 1 or logprobs), usage counting the prompt once and every sample's tokens."""
    chat = row[REQ_ENDPOINT] == CHAT
    prompt, completion = int(row[S.PROMPT_TOKENS] or 0), int(row[S.OUTPUT_TOKENS] or 0)
    samples = json.loads(row[S.CHOICES]) if row.get(S.CHOICES) else None
    if samples is None:
        samples = [{"text": row[S.OUTPUT_TEXT], "finish_reason": row[S.FINISH_REASON]}]
    choices = []
    for index, sample in enumerate(samples):
        tokens = sample.get("logprobs")
        logprobs = None
        if tokens is not None:
            logprobs = _chat_logprobs(tokens) if chat else _completion_logprobs(tokens)
        reason = "stop" if sample["finish_reason"] == "loop" else sample["finish_reason"]
        choice: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": logprobs}
        if chat:
            choice["message"] = {"role": "assistant", "content": sample["text"], "refusal": None}
        else:
            choice["text"] = sample["text"]
        choices.append(choice)
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + digest,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(row.get(S.GENERATED_AT) or 0),
        "model": row[S.MODEL] or "",
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def response_line(row: dict[str, Any]) -> dict[str, Any]:
    """The output line of one row (a dict of the row's columns; see the module docstring).

    A row with text and a stop / length finish is a 200 response (a toxicity scoring failure
    under ``annotate`` keeps its text and shows in ``rgbatch``); any other row is an error line:
    ``error: {code, message}`` and a response with status 400 (the request) or 500 (generation or
    scoring failed) whose body is an OpenAI-style error object.
    """
    digest = _digest(row[S.RUN_ID] or "", row[S.ID])
    line: dict[str, Any] = {"id": "batch_req_" + digest, "custom_id": row[REQ_CUSTOM_ID]}
    request_id = "req_" + digest
    ok = row[S.OUTPUT_TEXT] is not None and row[S.FINISH_REASON] in ("stop", "length", "loop")
    if ok and row[REQ_ENDPOINT] in (CHAT, COMPLETIONS):
        line["response"] = {
            "status_code": 200,
            "request_id": request_id,
            "body": _body(row, digest),
        }
        line["error"] = None
    else:
        status, code = _ERROR_CODES.get(row[S.ERROR_KIND] or "", (500, "internal_error"))
        message = row[S.ERROR] or "the request produced no output"
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        if status >= 500:
            error["type"] = "server_error"
        line["response"] = {
            "status_code": status,
            "request_id": request_id,
            "body": {"error": error},
        }
        line["error"] = {"code": code, "message": message}
    line["rgbatch"] = _extra(row)
    return line


def error_file_line(row: dict[str, Any]) -> dict[str, Any]:
    """The error-file line of a row without a usable custom_id (see :meth:`OpenAIBatchWriter.
    error_rows`), in the shape of OpenAI's batch error file: no response, the error, and the line
    and file it came from in the message and ``rgbatch``."""
    digest = _digest(row[S.RUN_ID] or "", row[S.ID])
    code = _ERROR_CODES.get(row[S.ERROR_KIND] or "", (500, "internal_error"))[1]
    message = row[S.ERROR] or "the request has no usable custom_id"
    return {
        "id": "batch_req_" + digest,
        "custom_id": row[REQ_CUSTOM_ID],
        "response": None,
        "error": {"code": code, "message": message},
        "rgbatch": _extra(row),
    }


def _lines(table: pa.Table, encode: Any) -> bytes:
    out = []
    for batch in table.to_batches(max_chunksize=1024):
        for row in batch.to_pylist():
            out.append(json.dumps(encode(row), ensure_ascii=False))
    return ("\n".join(out) + "\n").encode() if out else b""


class OpenAIBatchWriter(Writer):
    name = FORMAT
    description = (
        f"OpenAI batch response lines, .jsonl (needs input.format {FORMAT}); lines without a "
        f"usable custom_id go to {ERRORS_DIR}/"
    )
    extension = "jsonl"
    error_dir = ERRORS_DIR
    requires = (
        S.ID,
        REQ_CUSTOM_ID,
        REQ_ENDPOINT,
        S.PROMPT_TOKENS,
        S.OUTPUT_TEXT,
        S.OUTPUT_TOKENS,
        S.FINISH_REASON,
        S.ERROR,
        S.ERROR_KIND,
        S.MODEL,
        S.RUN_ID,
    )

    def encode(self, table: pa.Table) -> bytes:
        """A part file of response lines (JSONL, UTF-8), one per row of ``table``."""
        return _lines(table, response_line)

    def error_rows(self, table: pa.Table) -> pa.Array:
        """Rows with no usable custom_id: none given (or the line is no JSON object, or its file
        could not be read), one that is not a string or blank, or a repeat within the file."""
        missing = pc.is_null(table.column(REQ_CUSTOM_ID))
        repeat = pc.fill_null(pc.equal(table.column(S.ERROR_KIND), INVALID_CUSTOM_ID), False)
        return pc.or_(missing, repeat).combine_chunks()

    def encode_errors(self, table: pa.Table) -> bytes:
        """An error file part: one :func:`error_file_line` per row of ``table``."""
        return _lines(table, error_file_line)

    def config_problems(self, config: JobConfig) -> Problems:
        if config.input.format == FORMAT:
            return []
        message = f"{FORMAT} output needs input.format {FORMAT} (it answers custom_ids)"
        return [(("output", "format"), message)]
