"""Listing input files and the preflight checks run before a job starts.

Every check talks to storage, so :func:`preflight` runs them in daemon threads under one deadline
(``run.preflight_timeout_s``) instead of trusting each filesystem's own timeouts.
"""

from __future__ import annotations

import glob as _glob
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config.schema import FORMAT_BY_SUFFIX, ConfigError, JobConfig


def list_files(uri: str, fmt: str | None, storage_options: Mapping[str, Any]) -> list[str]:
    """Sorted, fully qualified files matched by ``uri`` (a glob, a directory or a file)."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    fs.invalidate_cache()
    if _glob.has_magic(path):
        found = [p for p, info in fs.glob(path, detail=True).items() if info["type"] == "file"]
    elif fs.isdir(path):
        suffixes = tuple(s for s, f in FORMAT_BY_SUFFIX if fmt is None or f == fmt)
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
