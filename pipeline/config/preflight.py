"""Listing input files and the preflight checks run before a job starts.

Every check talks to storage, so :func:`preflight` runs them in daemon threads under one deadline
(``run.preflight_timeout_s``) instead of trusting each filesystem's own timeouts.
"""

from __future__ import annotations

import functools
import glob as _glob
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import fsspec

from pipeline import columns, formats
from pipeline.config.schema import PROMPT_PLACEHOLDERS, ConfigError, JobConfig
from pipeline.formats import list_files
from pipeline.formats.base import is_unreadable
from pipeline.secrets import mask_text, mask_uri

__all__ = ["configured_columns", "input_columns", "list_files", "preflight"]


def _exists(uri: str, storage_options: Mapping[str, Any]) -> bool:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    fs.invalidate_cache()
    return bool(fs.exists(path))


def preflight(config: JobConfig) -> None:
    """Cheap I/O checks before a job starts; raises :class:`ConfigError` naming each bad field.

    Checks that ``input.uri`` matches at least one file and that the first one has every
    configured column (``input.id_column``, the task's text / question / prompt column,
    ``input.passthrough``: its Parquet schema, or the keys of its first JSONL lines), that
    ``output.uri`` and ``run.checkpoint_uri`` are not inside the input location (a later run
    would read them as input; local paths compared with ``..`` and symlinks resolved, object
    store keys both as written and normalised) and, on local disk, not a regular file (nor
    below one), and that ``model.checkpoint`` (and ``toxicity.checkpoint`` when
    scoring is on and it is set) exist. The checks run in parallel in daemon threads and the
    whole preflight waits at most ``run.preflight_timeout_s`` seconds: a check still running then
    (an unreachable or silent endpoint; s3fs/botocore would otherwise retry and wait up to its
    60 s read timeout per attempt) is reported as failed and left to finish in the background.
    No per-filesystem timeouts are changed.
    """
    checks: dict[str, _Check] = {}
    checks["input.uri"] = functools.partial(_input_check, config)
    checks["output.uri"] = functools.partial(_output_check, config)
    checks["model.checkpoint"] = _exists_check(
        config.model.checkpoint, config.model.storage_options
    )
    tox = config.toxicity
    if tox.enabled and tox.checkpoint is not None:
        checks["toxicity.checkpoint"] = _exists_check(tox.checkpoint, tox.storage_options)
    errors = list(_run_with_deadline(checks, config.run.preflight_timeout_s))
    if errors:
        raise ConfigError(errors)


_Check = Callable[[], "str | list[tuple[str, str]] | None"]
"""A preflight check: None when fine, else a message (for its own path) or (path, message)s."""


def configured_columns(config: JobConfig) -> list[tuple[str, str]]:
    """(config path, input column) of every column the job reads (none for a format whose rows
    are not read from configured columns)."""
    inp = config.input
    if not formats.reader(inp.format).maps_columns:
        return []
    by_field = {
        columns.TEXT: ("input.text_column", inp.text_column),
        columns.QUESTION: ("input.question_column", inp.question_column),
        columns.PROMPT: ("input.prompt_column", inp.prompt_column),
    }
    needed = [by_field[name] for name in PROMPT_PLACEHOLDERS[config.task]]
    if inp.id_column is not None:
        needed.insert(0, ("input.id_column", inp.id_column))
    needed += [("input.passthrough", name) for name in inp.passthrough]
    return needed


def input_columns(uri: str, fmt: str, storage_options: Mapping[str, Any]) -> set[str]:
    """The columns of an input file (its Parquet schema, the keys of its first JSONL lines...)."""
    return formats.reader(fmt).file_columns(uri, storage_options)


def _input_check(config: JobConfig) -> str | list[tuple[str, str]] | None:
    files = config.input_files()
    if not files:
        return f"no files match {mask_uri(config.input.uri)}"
    needed = configured_columns(config)
    if not needed:
        return None
    first, found = _first_readable(files, config)
    if found is None:
        return f"none of the {len(files)} input files can be read; the first: {first}"
    shown = ", ".join(sorted(found)) or "none"
    return [
        (path, f"column {name!r} is not in {mask_uri(first)} (columns found: {shown})")
        for path, name in needed
        if name not in found
    ] or None


def _first_readable(files: list[str], config: JobConfig) -> tuple[str, set[str] | None]:
    """(file, its columns) of the first input file that can be read; (why the first cannot,
    None) when none can (a corrupt file becomes an ``unreadable_file`` row when read)."""
    first_error = None
    for uri in files:
        try:
            return uri, input_columns(uri, config.input.format, config.input.storage_options)
        except Exception as err:
            if not is_unreadable(err):
                raise
            first_error = first_error or mask_text(f"{mask_uri(uri)}: {type(err).__name__}: {err}")
    return first_error or "", None


def _output_check(config: JobConfig) -> list[tuple[str, str]] | None:
    """``output.uri`` and ``run.checkpoint_uri``: directories a run can write, outside the input."""
    base = _input_base(config.input.uri, config.input.storage_options)
    errors = []
    for path, uri in (
        ("output.uri", config.output.uri),
        ("run.checkpoint_uri", config.run.checkpoint_uri),
    ):
        if uri is None:
            continue
        fs, location = fsspec.core.url_to_fs(uri, **config.output.storage_options)
        if (blocked := _file_in_the_way(fs, location)) is not None:
            what = "it" if blocked == location else mask_uri(blocked)
            message = f"{mask_uri(uri)}: {what} is a file, not a directory (the run writes one)"
            errors.append((path, message))
        elif base is not None and _protocol(fs) == base[0] and _overlaps(fs, location, base[1]):
            errors.append(
                (
                    path,
                    f"{mask_uri(uri)} is inside the input location {mask_uri(config.input.uri)}: a "
                    "later run would read the outputs as input; write somewhere else",
                )
            )
    return errors or None


def _file_in_the_way(fs: fsspec.AbstractFileSystem, location: str) -> str | None:
    """On local disk, ``location`` or the nearest of its parents that exists, when that is not a
    directory (object stores hold ``a`` and ``a/b`` side by side: nothing is in the way)."""
    if _protocol(fs) != "file":
        return None
    path = location
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return None if os.path.isdir(path) else path


def _overlaps(fs: fsspec.AbstractFileSystem, location: str, base: str) -> bool:
    """Whether a listing of ``base`` could reach ``location``: local paths resolved (``..`` and
    symlinks); object store keys as written and normalised (a store keeps ``..`` as a name)."""
    if _protocol(fs) == "file":
        return _within(os.path.realpath(location), os.path.realpath(base))
    forms = {location.rstrip("/"), posixpath.normpath(location)}
    bases = {base.rstrip("/"), posixpath.normpath(base) if base else base}
    return any(_within(form, b) for form in forms for b in bases)


def _input_base(uri: str, storage_options: Mapping[str, Any]) -> tuple[str, str] | None:
    """(protocol, directory) that input files are listed from; None for a single file."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    if _glob.has_magic(path):
        parts = path.split("/")
        fixed = next(i for i, part in enumerate(parts) if _glob.has_magic(part))
        return _protocol(fs), "/".join(parts[:fixed]) or "/"
    if fs.isdir(path):
        return _protocol(fs), path.rstrip("/") or "/"
    return None


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    protocol = fs.protocol
    return protocol if isinstance(protocol, str) else protocol[0]


def _within(path: str, base: str) -> bool:
    path, base = path.rstrip("/"), base.rstrip("/")
    return path == base or path.startswith(base + "/") or base == ""


def _exists_check(uri: str, storage_options: Mapping[str, Any]) -> _Check:
    def check() -> str | None:
        return None if _exists(uri, storage_options) else f"not found: {mask_uri(uri)}"

    return check


def _run_with_deadline(checks: Mapping[str, _Check], timeout_s: float) -> Iterator[tuple[str, str]]:
    results: dict[str, str | list[tuple[str, str]] | None] = {}

    def runner(path: str, check: _Check) -> None:
        try:
            results[path] = check()
        except ConfigError as exc:
            results[path] = "; ".join(m for _, m in exc.errors)
        except Exception as exc:
            results[path] = mask_text(f"cannot check ({type(exc).__name__}: {exc})")

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
        elif isinstance(results.get(path), list):
            yield from results[path]  # type: ignore[misc]
        elif results.get(path) is not None:
            yield path, str(results[path])
