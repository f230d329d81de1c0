"""Storage: local paths and fsspec URIs, for model/ and pipeline/ alike.

One place for opening a URI as a filesystem (:func:`filesystem`), listing files (:func:`list_files`),
its Arrow view for Ray Data's readers, writers and checkpoints (:func:`arrow_filesystem`), content
identities (:func:`content_identity`) and copying remote files to local disk (:func:`localize`).

Remote checkpoints are copied into a local cache directory (``$RGBATCH_CACHE_DIR``, default
``~/.cache/rg-batch``) and read from there: Orbax and safetensors want local files, and an actor
that restarts should not download a 5 GB checkpoint twice. The cache guarantees:

- Entries are keyed by the URI and the content identity of what it names, from one fresh listing
  per call: a file's ETag when the filesystem reports one, else its size and modification time; for
  a directory tree, a hash over every file's relative path and identity. A re-uploaded object gets
  a new entry; an unchanged one is copied once. An entry holds exactly the files that were listed.
- An entry that exists is complete: a copy is staged in a temporary directory under the cache root
  and renamed into place. A failed copy leaves nothing behind; the staging left by a killed one is
  removed by the next copy of the same entry. A tree that changes while it is copied is an error.
- Processes on one node copy an entry once: the copy holds an ``flock`` on a lock file beside the
  entry, and the others wait for it, then use its entry.
- An object that is gone from storage (not found) is served from the newest entry copied from its
  URI, with a warning; other listing errors are raised. Old entries are never evicted.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)


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

    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def list_files(
    uri: str, suffixes: tuple[str, ...], storage_options: Mapping[str, Any] | None = None
) -> list[str]:
    """Sorted, fully qualified files matched by ``uri``: a glob's matches, a file itself, or the
    files below a directory whose names end in one of ``suffixes`` (case-insensitive), skipping
    anything under a name starting with ``_`` or ``.`` (``_SUCCESS``, ``.staging``). Remote
    paths come back with their protocol (``s3://bucket/key``), local ones as absolute paths."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.invalidate_cache()
    if glob.has_magic(path):
        found = [p for p, info in fs.glob(path, detail=True).items() if info["type"] == "file"]
    elif fs.isdir(path):
        root = path.rstrip("/")
        found = [
            p
            for p in fs.find(path)
            if p.lower().endswith(suffixes)
            and not any(
                part.startswith(("_", ".")) for part in p[len(root) :].strip("/").split("/")
            )
        ]
    elif fs.isfile(path):
        found = [path]
    else:
        found = []
    local = isinstance(fs, LocalFileSystem)
    return sorted(p if local else fs.unstrip_protocol(p) for p in found)


def file_sizes(
    files: list[str], storage_options: Mapping[str, Any] | None = None
) -> list[int] | None:
    """Sizes of ``files`` from one listing per directory (None when a size is unknown)."""
    by_dir: dict[str, dict[str, int]] = {}
    sizes = []
    for uri in files:
        fs, path = filesystem(uri, storage_options)
        parent = posixpath.dirname(path)
        if parent not in by_dir:
            entries = fs.ls(parent, detail=True)
            by_dir[parent] = {e["name"].rstrip("/"): int(e.get("size") or 0) for e in entries}
        size = by_dir[parent].get(path)
        if size is None:
            return None
        sizes.append(size)
    return sizes


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

    Local paths are returned as they are. Remote URIs are copied into the cache under a key made of
    the URI and the listed content identity (see the module docstring); the returned path ends with
    ``-<the object's name>``.
    """
    uri = os.fspath(uri)
    if is_local(uri):
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        return path
    fs, remote_path = filesystem(uri, storage_options)
    objects = (Path(cache_root) if cache_root is not None else cache_dir()) / "objects"
    uri_key, name = _digest(uri.rstrip("/")), Path(remote_path).name
    try:
        listing = _listing(fs, remote_path)
    except FileNotFoundError:
        cached = _newest_entry(objects, uri_key, name)
        if cached is None:
            raise FileNotFoundError(f"no such object or prefix: {uri}") from None
        log.warning("%s is not in storage any more; using its last local copy %s", uri, cached)
        return cached
    target = objects / f"{uri_key}{_digest(_identity(listing))}-{name}"
    if target.exists():
        return target
    objects.mkdir(parents=True, exist_ok=True)
    with _locked(objects / f".{target.name}.lock"):
        if not target.exists():  # else another process copied it while we waited
            _fill(fs, remote_path, listing, target, uri)
    return target


# The cache ----------------------------------------------------------------------------------------

_STAGING = ".staging-"
_FILE = "."  # the listing key of a URI that names one file
# Where fsspec implementations put a modification time (s3fs, local, gcsfs, http, memory).
_MTIME_KEYS = ("LastModified", "mtime", "updated", "last_modified", "modified", "created")


class _Remote(NamedTuple):
    name: str  # the path on the remote filesystem
    info: dict[str, Any]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _listing(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, _Remote]:
    """Every file under ``path`` by relative path (``_FILE`` when ``path`` is a file), listed fresh.

    Raises FileNotFoundError when nothing is there, ValueError for a name that leaves ``path``.
    """
    fs.invalidate_cache(path)  # fsspec instances are shared and cache listings
    found = fs.find(path, detail=True)
    if not found:
        raise FileNotFoundError(path)
    listing: dict[str, _Remote] = {}
    for name, info in found.items():
        rel = posixpath.relpath(name.rstrip("/"), path)
        if rel == _FILE:
            if len(found) > 1:
                raise ValueError(f"{path} is both a file and a directory in its storage")
            return {_FILE: _Remote(name, info or fs.info(name))}  # fsspec's find gives {} here
        if rel == ".." or rel.startswith("../") or posixpath.isabs(rel):
            raise ValueError(f"listing of {path} holds {name!r}, which is not inside it")
        listing[rel] = _Remote(name, info)
    return listing


def content_identity(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """A digest of what ``uri`` holds now, from one fresh listing (ETags, else sizes and mtimes):
    a re-uploaded object gets a new identity without its bytes being read."""
    fs, path = filesystem(uri, storage_options)
    return _digest(_identity(_listing(fs, path)))


def _identity(listing: dict[str, _Remote]) -> str:
    return "\n".join(f"{rel}\t{_file_identity(r.info)}" for rel, r in sorted(listing.items()))


def _file_identity(info: dict[str, Any]) -> str:
    """The ETag if the filesystem reports one, else size and modification time."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag={etag}"
    mtime = next((info[k] for k in _MTIME_KEYS if info.get(k) is not None), None)
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()  # s3fs reports one datetime in two time zones
    return f"size={info.get('size')},mtime={mtime}"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fill(
    fs: fsspec.AbstractFileSystem,
    remote_path: str,
    listing: dict[str, _Remote],
    target: Path,
    uri: str,
) -> None:
    """Copies the listed files into ``target`` through a staging directory; call with the lock."""
    prefix = f"{_STAGING}{target.name}-"
    for leftover in target.parent.iterdir():
        if leftover.name.startswith(prefix):  # a copy of this entry that was killed half-way
            log.info("removing %s, left by an interrupted copy", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        log.info("copying %s into the local cache at %s", uri, target)
        dest = staging / "copy"
        locals_ = [dest if rel == _FILE else dest / rel for rel in listing]
        for local in locals_:
            local.parent.mkdir(parents=True, exist_ok=True)
        # Both as lists: fsspec copies exactly these, without listing again or expanding globs.
        fs.get([r.name for r in listing.values()], [str(p) for p in locals_])
        if _identity(_listing(fs, remote_path)) != _identity(listing):
            raise RuntimeError(f"{uri} changed while it was being copied; try again")
        os.utime(dest)  # entries of one URI are ordered by when they were filled
        if target.exists():
            log.info("another process filled %s first; discarding this copy", target)
            return
        try:
            os.replace(dest, target)
        except OSError:
            if not target.exists():
                raise
            log.info("another process filled %s first; discarding this copy", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _newest_entry(objects: Path, uri_key: str, name: str) -> Path | None:
    """The most recently filled entry of the URI whose key is ``uri_key``."""
    if not objects.is_dir():
        return None
    entries = []
    for path in objects.iterdir():
        identity, _, rest = path.name.removeprefix(uri_key).partition("-")
        if path.name.startswith(uri_key) and len(identity) == len(uri_key) and rest == name:
            entries.append(path)
    return max(entries, key=lambda p: p.stat().st_mtime, default=None)
