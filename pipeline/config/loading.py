"""Loading a job config: YAML -> ``--set`` overrides -> ``${VAR}`` -> validation -> rendering.

Also the run id (:func:`new_run_id`), the translation of pydantic errors into
:class:`~pipeline.config.schema.ConfigError` lines, and the redacted dump written to the manifest
(:func:`redacted_dict`).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config.schema import ROOT, ConfigError, JobConfig
from pipeline.secrets import MASK, mask_text

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
                message += f" (got {mask_text(repr(value))})"
        out.append((path, message))
    return out


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
