"""Request body keys, the OpenAI API's names for request parameters, read into row settings.

Two inputs speak this vocabulary: the body of a request line (a format whose rows carry their
own settings, ``Reader.row_settings``) and an ``input.settings_column`` value of any format.
:func:`body_params` checks and reads the honoured keys (``max_tokens`` /
``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``response_format``,
the penalties, ``min_tokens``, ``top_k``, ``n``, ``logprobs`` / ``top_logprobs``);
:func:`check_unsupported` refuses the keys that would change the answer in a way rg-batch cannot
honour; :func:`settings_values` turns the parameters into the row's settings
(:data:`pipeline.request.ROW_SETTINGS` struct values), which travel to the engine request.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from pipeline.request import ROW_SETTINGS_TYPE

CHAT = "chat"  # /v1/chat/completions: logprobs is true/false with top_logprobs
COMPLETIONS = "completions"  # /v1/completions: logprobs is a count
SETTINGS = "settings"  # a settings_column value: either logprobs spelling
MAX_STOP_STRINGS = 4  # OpenAI's limit

# Body fields that change the answer, with the one value (or values) we can honour.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (1,),
    "stream": (False,),
    "echo": (False,),
    "tools": ((), None),
    "functions": ((), None),
    "tool_choice": ("none", "auto", None),
    "function_call": ("none", None),
    "logit_bias": ({}, None),
    "suffix": (None, ""),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ("text",)),
}


class RequestError(ValueError):
    """A request body (or settings value) that is not valid or not supported (the message says
    why)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_unsupported(body: dict[str, Any]) -> None:
    """Raises RequestError for a body key whose value would change the answer in a way this
    engine cannot honour (tools, logit_bias, streaming, best_of, ...)."""
    for name, allowed in _UNSUPPORTED.items():
        if name not in body:
            continue
        value = body[name]
        if value is None:
            continue  # null is the default of every one of them
        value = tuple(value) if isinstance(value, list) else value
        if value not in allowed:
            raise RequestError(f"body.{name}={json.dumps(body[name])[:60]} is not supported")


def _response_format(value: Any) -> str | None:
    """The constraint (JSON text) of a ``response_format``, None for text; raises RequestError."""
    from model.grammar import Constraint, ConstraintError

    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError("body.response_format must be an object")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_object().to_json()
    if kind != "json_schema":
        raise RequestError(
            f"body.response_format.type must be text, json_object or json_schema, got {kind!r}"
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError("body.response_format.json_schema must be an object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError("body.response_format.json_schema.name must be a non-empty string")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise RequestError("body.response_format.json_schema.schema must be an object")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise RequestError("body.response_format.json_schema.strict must be a boolean")
    constraint = Constraint.json_schema(schema)
    try:
        constraint.check()
    except ConstraintError as err:
        raise RequestError(f"body.response_format.json_schema.schema: {err}") from None
    return constraint.to_json()


def _int_range(name: str) -> tuple[int, int]:
    """The values the integer field ``name`` of the row settings column can hold."""
    bits = ROW_SETTINGS_TYPE.field(name).type.bit_width
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def body_params(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """The honoured parameters of ``body`` (CHAT, COMPLETIONS or SETTINGS spelling), each
    checked against its range; raises RequestError naming the bad key."""
    out: dict[str, Any] = {}
    names = ("max_completion_tokens", "max_tokens") if endpoint != COMPLETIONS else ("max_tokens",)
    most = _int_range("max_new_tokens")[1]
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or not 1 <= value <= most:
            raise RequestError(f"body.{name} must be an integer >= 1 and <= {most}, got {value!r}")
        out.setdefault("max_tokens", value)
    for name, low, high, low_open in (("temperature", 0, 2, False), ("top_p", 0, 1, True)):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or value > high or value < low or (low_open and value == low):
            bounds = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
            raise RequestError(f"body.{name} must be a number in {bounds}, got {value!r}")
        out[name] = float(value)
    seed = body.get("seed")
    if seed is not None:
        low, high = _int_range("seed")
        if not _is_int(seed) or not low <= seed <= high:
            raise RequestError(f"body.seed must be an integer in [{low}, {high}], got {seed!r}")
        out["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise RequestError("body.stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise RequestError(f"body.stop holds {len(stops)} strings, at most {MAX_STOP_STRINGS}")
        kept = tuple(dict.fromkeys(s for s in stops if s))
        if kept:
            out["stop"] = kept
    constraint = _response_format(body.get("response_format"))
    if constraint is not None:
        out["constraint"] = constraint
    out.update(_control_params(body, endpoint))
    return out


MAX_N = 128  # OpenAI's limit (the engine's max_slots may be lower: then an error line)
MAX_TOP_LOGPROBS = 20


def _control_params(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """The penalties, min_tokens, top_k (vLLM's extensions too), n and logprobs of a body."""
    out: dict[str, Any] = {}
    for name, low, high in (
        ("presence_penalty", -2.0, 2.0),
        ("frequency_penalty", -2.0, 2.0),
        ("repetition_penalty", 0.0, math.inf),
    ):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or not low <= value <= high or (name[0] == "r" and value == 0):
            raise RequestError(f"body.{name} must be a number in range, got {value!r}")
        out[name] = float(value)
    for name, low, high in (("min_tokens", 0, None), ("top_k", -1, None), ("n", 1, MAX_N)):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise RequestError(f"body.{name} must be an integer {bounds}, got {value!r}")
        out[name] = max(value, 0)  # top_k -1 (vLLM's off) is 0
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise RequestError(f"body.top_logprobs must be an integer in [0, 20], got {top!r}")
    if isinstance(logprobs, bool):
        if endpoint == COMPLETIONS:
            raise RequestError("body.logprobs must be an integer for /v1/completions")
        if logprobs:
            out["logprobs"] = top or 0
        elif top:
            raise RequestError("body.top_logprobs needs body.logprobs: true")
    elif logprobs is not None:
        if endpoint == CHAT or not _is_int(logprobs) or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            want = "true or false" if endpoint == CHAT else "an integer in [0, 20]"
            raise RequestError(f"body.logprobs must be {want}, got {logprobs!r}")
        out["logprobs"] = logprobs
    elif top:
        raise RequestError("body.top_logprobs needs body.logprobs: true")
    return out


def settings_values(params: Mapping[str, Any], *, chat: bool) -> dict[str, Any]:
    """The row settings (ROW_SETTINGS struct values) of :func:`body_params`' parameters; a
    chat request also stops at the end of its turn."""
    stop = params.get("stop")
    return {
        "max_new_tokens": params.get("max_tokens"),
        "temperature": params.get("temperature"),
        "top_p": params.get("top_p"),
        "seed": params.get("seed"),
        "stop": list(stop) if stop else None,
        "end_of_turn": True if chat else None,
        "constraint": params.get("constraint"),
        "top_k": params.get("top_k"),
        "min_tokens": params.get("min_tokens"),
        "presence_penalty": params.get("presence_penalty"),
        "frequency_penalty": params.get("frequency_penalty"),
        "repetition_penalty": params.get("repetition_penalty"),
        "logprobs": params.get("logprobs"),
        "n": params.get("n"),
    }


def row_settings_from_body(value: Any) -> dict[str, Any] | None:
    """A row's settings (ROW_SETTINGS struct values) from an object with body keys (a dict, or
    its JSON text); None keeps the job's. Raises RequestError. ``logprobs`` may be chat's
    (true with ``top_logprobs``) or completions' (a count)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise RequestError(f"not a JSON object: {err}") from None
    if not isinstance(value, dict):
        raise RequestError(f"must be an object of request body keys, got {type(value).__name__}")
    body = {k: v for k, v in value.items() if v is not None}  # a Parquet struct's nulls: unset
    check_unsupported(body)
    endpoint = COMPLETIONS if _is_int(body.get("logprobs")) else SETTINGS
    return settings_values(body_params(body, endpoint), chat=False)
