"""Storage: local paths and fsspec URIs, for model/ and pipeline/ alike.

One place for opening a URI as a filesystem (:func:`filesystem`), its Arrow view for Ray Data's
readers, writers and checkpoints (:func:`arrow_filesystem`), and copying remote files to local disk
(:func:`localize`).

Remote checkpoints are copied once into a local cache directory (``$RGBATCH_CACHE_DIR``, default
``~/.cache/rg-batch``) and read from there: Orbax and safetensors want local files, and an actor
that restarts should not download a 5 GB checkpoint twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec

log = logging.getLogger(__name__)

_COMPLETE_MARKER = ".rgbatch-complete"


def is_local(uri: str | os.PathLike[str]) -> bool:
    uri = os.fspath(uri)
    return "://" not in uri or uri.startswith("file://")


def filesystem(
    uri: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path without protocol and trailing slash) for ``uri``."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path.rstrip("/")


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> Any:
    """A pyarrow filesystem over an fsspec one (what Ray Data's writers and checkpoints take)."""
    import pyarrow.fs as pafs
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def cache_dir() -> Path:
    root = os.environ.get("RGBATCH_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "rg-batch"
    )
    return Path(root)


def localize(
    uri: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    cache_root: str | os.PathLike[str] | None = None,
) -> Path:
    """Returns a local path holding ``uri`` (a file or a directory tree).

    Local paths are returned as they are. Remote URIs are copied once into the cache, keyed by the
    URI; a copy that was interrupted is redone, never half-used.
    """
    uri = os.fspath(uri)
    if is_local(uri):
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        return path
    fs, remote_path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    remote_path = remote_path.rstrip("/")
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    root = Path(cache_root) if cache_root is not None else cache_dir()
    target = root / "objects" / f"{key}-{Path(remote_path).name}"
    if (target / _COMPLETE_MARKER).exists() or (target.is_file() and _marker(target).exists()):
        return target
    if not fs.exists(remote_path):
        raise FileNotFoundError(f"no such object or prefix: {uri}")
    root.joinpath("objects").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root / "objects"))
    try:
        log.info("copying %s into the local cache at %s", uri, target)
        if fs.isdir(remote_path):
            dest = staging / "tree"
            fs.get(remote_path + "/", str(dest), recursive=True)
            (dest / _COMPLETE_MARKER).touch()
        else:
            dest = staging / "file"
            fs.get(remote_path, str(dest))
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(dest, target)
        if target.is_file():
            _marker(target).touch()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _marker(file_path: Path) -> Path:
    return file_path.with_name(file_path.name + _COMPLETE_MARKER)
