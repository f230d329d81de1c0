"""Loading a job config: YAML -> ``--set`` overrides -> ``${VAR}`` -> validation -> rendering.

YAML anchors and aliases (``&opts`` ... ``*opts``) are allowed, but the parser shares an aliased
node where the steps after it copy it out, so a document is measured as if every alias were
expanded before anything copies it (:func:`check_expanded_size`): past
:data:`MAX_EXPANDED_VALUES` values, :data:`MAX_EXPANDED_CHARS` characters of text or
:data:`MAX_DEPTH` levels, or with an alias inside itself, it is refused (a "billion laughs"
document never reaches memory).

Also the run id (:func:`new_run_id`), the translation of pydantic errors into
:class:`~pipeline.config.schema.ConfigError` lines, and the redacted dump written to the manifest
(:func:`redacted_dict`).
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.schema import ROOT, ConfigError, JobConfig
from pipeline.secrets import MASK, mask_text

MAX_EXPANDED_VALUES = 100_000
"""Most values (mappings, lists, scalars, keys) a config may hold with its aliases expanded."""
MAX_EXPANDED_CHARS = 16 << 20
"""Most characters of text (strings and keys) a config may hold with its aliases expanded."""
MAX_DEPTH = 64
"""Most levels of nesting in a config."""
_ENV_PATTERN = re.compile(r"\$(\$)?\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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
    except RecursionError:
        raise ConfigError.at(ROOT, f"nested more than {MAX_DEPTH} levels deep") from None
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
    check_plan(config)
    now = dt.datetime.now(dt.UTC)
    return config.rendered(run_id or new_run_id(now), date or now.date())


def check_plan(config: JobConfig) -> None:
    """The checks that need the plan's declarations (ConfigError): a passthrough column may not
    take the name of a column the pipeline writes. The plan imports the stages (and JAX), so it
    is imported only here, when a config is loaded."""
    from pipeline.plan import check_passthrough

    check_passthrough(config)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with ``a.b.c=value`` overrides applied (values read as YAML); ``data``
    and each value are measured first (:func:`check_expanded_size`)."""
    check_expanded_size(data, ROOT)
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
            node[parts[-1]] = parse_override_value(raw, f"--set {key.strip()}")
    if errors:
        raise ConfigError(errors)
    return data


def parse_override_value(raw: str, where: str) -> Any:
    """A ``--set`` value read as YAML (text that is not YAML stays a string), measured as
    :func:`check_expanded_size` does; ConfigError at ``where`` when it is too large."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:  # e.g. `*.jsonl` or `{date}/x`: plainly meant as a string
        return raw
    except RecursionError:
        raise ConfigError.at(where, f"nested more than {MAX_DEPTH} levels deep") from None
    check_expanded_size(value, where)
    return value


def check_expanded_size(data: Any, where: str) -> None:
    """Raises ConfigError at ``where`` if ``data``, with every shared node (a YAML alias)
    counted once per reference, holds more than :data:`MAX_EXPANDED_VALUES` values or
    :data:`MAX_EXPANDED_CHARS` characters, nests deeper than :data:`MAX_DEPTH`, or contains
    itself. Each distinct mapping or list is walked once, so this costs what the document
    costs, not what its expansion would."""
    sizes: dict[int, tuple[int, int]] = {}
    walking: set[int] = set()

    def measure(node: Any, depth: int) -> tuple[int, int]:
        if not isinstance(node, dict | list):
            return 1, len(node) if isinstance(node, str) else 0
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in walking:
            raise ConfigError.at(where, "a YAML alias refers to a node that contains it")
        if depth >= MAX_DEPTH:
            raise ConfigError.at(where, f"nested more than {MAX_DEPTH} levels deep")
        walking.add(key)
        values, chars = 1, 0
        children = [x for kv in node.items() for x in kv] if isinstance(node, dict) else node
        for child in children:
            more_values, more_chars = measure(child, depth + 1)
            values, chars = values + more_values, chars + more_chars
            if values > MAX_EXPANDED_VALUES or chars > MAX_EXPANDED_CHARS:
                subject = "the document" if where == ROOT else "the value"
                raise ConfigError.at(
                    where,
                    f"with its YAML aliases (*name) expanded, {subject} holds more than "
                    f"{MAX_EXPANDED_VALUES:,} values or {MAX_EXPANDED_CHARS >> 20} MiB of text; "
                    "a job config needs far less: write the values out, or alias less",
                )
        walking.discard(key)
        sizes[key] = values, chars
        return values, chars

    measure(data, 0)


def interpolate_env(data: Any, environ: Mapping[str, str]) -> tuple[Any, set[str]]:
    """``data`` with ``${VAR}`` / ``${VAR:-default}`` substituted, and the paths that had any;
    ``data`` is measured first (:func:`check_expanded_size`)."""
    check_expanded_size(data, ROOT)
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
            nearest = _nearest_field(err["loc"])
            if nearest:
                message += f"; did you mean {nearest!r}?"
        elif kind == "value_error":  # ours: the message names the value where it helps
            message = err["msg"].removeprefix("Value error, ")
        else:
            message = err["msg"]
            value = err.get("input")
            secret = path in hidden or "storage_options" in err["loc"]
            if not secret and isinstance(value, str | int | float | bool) and len(repr(value)) < 80:
                message += f" (got {mask_text(repr(value))})"
        out.append((path, message))
    return out


def _nearest_field(loc: Sequence[Any], model: type[BaseModel] = JobConfig) -> str | None:
    """The field name closest to the unknown key at ``loc`` among its section's fields, if any is
    close enough (``difflib``'s ratio of at least 0.6), else None."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    matches = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return matches[0] if matches else None


def _deep_copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _deep_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deep_copy(v) for v in node]
    return node


# Manifest ---------------------------------------------------------------------------------------


def redacted_dict(config: JobConfig) -> dict[str, Any]:
    """The config as JSON-ready data with secrets masked as ``"***"``.

    Masked: every leaf under any ``storage_options`` (keys kept, nested mappings walked), every
    value that came from ``${...}`` interpolation, and the userinfo and query string of every
    URI in any other string (:func:`pipeline.secrets.mask_text`: ``s3://***@bucket/x?sig=***``).
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
        if isinstance(node, str):
            return mask_text(node)
        return node

    return walk(config.model_dump(mode="json"), (), False)
