"""model.storage.localize against a moto S3 server: content-keyed, atomically filled cache."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

from model.storage import localize

SLOW_COPY_S = 1.0  # how long each patched download sleeps, so that two processes overlap


def _count_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every file s3fs downloads (its per-file primitive), in this process."""
    import s3fs

    calls: list[str] = []
    original = s3fs.S3FileSystem._get_file

    async def counting(self: Any, rpath: str, lpath: str, **kwargs: Any) -> Any:
        if _is_data_file(rpath):
            calls.append(rpath)
        return await original(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", counting)
    return calls


def _is_data_file(rpath: str) -> bool:
    """Every object in these tests has a suffix; s3fs also calls _get_file for directories."""
    return "." in rpath.rstrip("/").rsplit("/", 1)[-1]


def _put(options: dict[str, Any], path: str, data: bytes) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    fs.pipe(path, data)
    fs.invalidate_cache()


def _entries(cache: Path) -> list[Path]:
    objects = cache / "objects"
    return sorted(p for p in objects.iterdir() if not p.name.startswith("."))


def test_changed_file_gets_a_new_entry_and_unchanged_reuses_it(
    s3_bucket: tuple[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, options = s3_bucket
    downloads = _count_downloads(monkeypatch)
    uri = f"s3://{bucket}/models/weights.bin"
    cache = tmp_path / "cache"

    _put(options, f"{bucket}/models/weights.bin", b"version one")
    first = localize(uri, storage_options=options, cache_root=cache)
    assert first.read_bytes() == b"version one" and first.name.endswith("-weights.bin")
    assert localize(uri, storage_options=options, cache_root=cache) == first
    assert len(downloads) == 1  # the unchanged object came from the cache

    _put(options, f"{bucket}/models/weights.bin", b"version two!")  # re-uploaded, same URI
    second = localize(uri, storage_options=options, cache_root=cache)
    assert second != first
    assert second.read_bytes() == b"version two!"
    assert first.read_bytes() == b"version one"  # a reader of the old entry is not disturbed
    assert len(downloads) == 2
    assert localize(uri, storage_options=options, cache_root=cache) == second
    assert len(downloads) == 2


def test_changed_file_in_a_tree_gets_a_new_entry(
    s3_bucket: tuple[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, options = s3_bucket
    downloads = _count_downloads(monkeypatch)
    cache = tmp_path / "cache"
    _put(options, f"{bucket}/tree/config.json", b"{}")
    _put(options, f"{bucket}/tree/shards/a.bin", b"aaaa")
    uri = f"s3://{bucket}/tree/"

    first = localize(uri, storage_options=options, cache_root=cache)
    assert (first / "shards" / "a.bin").read_bytes() == b"aaaa"
    assert localize(uri.rstrip("/"), storage_options=options, cache_root=cache) == first
    assert len(downloads) == 2

    _put(options, f"{bucket}/tree/shards/a.bin", b"bbbb")  # same size, new content
    second = localize(uri, storage_options=options, cache_root=cache)
    assert second != first
    assert (second / "shards" / "a.bin").read_bytes() == b"bbbb"
    assert (second / "config.json").read_bytes() == b"{}"
    assert sorted(p.name for p in second.rglob("*")) == ["a.bin", "config.json", "shards"]

    _put(options, f"{bucket}/tree/extra.txt", b"new file")  # a file added to the tree
    third = localize(uri, storage_options=options, cache_root=cache)
    assert third not in (first, second) and (third / "extra.txt").read_bytes() == b"new file"
    assert len(_entries(cache)) == 3


def test_deleted_remote_is_served_from_its_last_copy(
    s3_bucket: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    import s3fs

    bucket, options = s3_bucket
    cache = tmp_path / "cache"
    uri = f"s3://{bucket}/gone.bin"
    _put(options, f"{bucket}/gone.bin", b"one")
    localize(uri, storage_options=options, cache_root=cache)
    _put(options, f"{bucket}/gone.bin", b"two")
    latest = localize(uri, storage_options=options, cache_root=cache)
    s3fs.S3FileSystem(**options).rm(f"{bucket}/gone.bin")
    assert localize(uri, storage_options=options, cache_root=cache) == latest
    assert latest.read_bytes() == b"two"
    with pytest.raises(FileNotFoundError, match="never"):
        localize(f"s3://{bucket}/never.bin", storage_options=options, cache_root=cache)


def test_failed_copy_leaves_nothing_behind(
    s3_bucket: tuple[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    bucket, options = s3_bucket
    cache = tmp_path / "cache"
    _put(options, f"{bucket}/t/a.bin", b"a")
    _put(options, f"{bucket}/t/b.bin", b"b")
    original = s3fs.S3FileSystem._get_file

    async def fail_on_b(self: Any, rpath: str, lpath: str, **kwargs: Any) -> Any:
        if rpath.endswith("b.bin"):
            raise ConnectionError("connection reset")
        return await original(self, rpath, lpath, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(s3fs.S3FileSystem, "_get_file", fail_on_b)
        with pytest.raises(ConnectionError):
            localize(f"s3://{bucket}/t", storage_options=options, cache_root=cache)
    assert _entries(cache) == []
    assert not [p for p in (cache / "objects").iterdir() if p.name.startswith(".staging")]
    tree = localize(f"s3://{bucket}/t", storage_options=options, cache_root=cache)
    assert (tree / "b.bin").read_bytes() == b"b"


def test_leftover_staging_of_a_killed_copy_is_removed(
    s3_bucket: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    import shutil

    bucket, options = s3_bucket
    cache = tmp_path / "cache"
    _put(options, f"{bucket}/w.bin", b"w")
    target = localize(f"s3://{bucket}/w.bin", storage_options=options, cache_root=cache)
    target.unlink()  # as if never copied, with a copy that died half-way left behind
    leftover = target.parent / f".staging-{target.name}-killed"
    leftover.mkdir()
    (leftover / "file").write_bytes(b"half")
    again = localize(f"s3://{bucket}/w.bin", storage_options=options, cache_root=cache)
    assert again == target and again.read_bytes() == b"w"
    assert not leftover.exists()
    shutil.rmtree(cache)


# Two processes on one node ------------------------------------------------------------------------


def _localize_in_child(
    uri: str,
    options: dict[str, Any],
    cache: str,
    env: dict[str, str],
    barrier: Any,
    results: Any,
) -> None:
    """Child process: waits for its sibling, then localizes ``uri`` with a slow, counted copy."""
    os.environ.update(env)
    import asyncio

    import s3fs

    downloads: list[str] = []
    original = s3fs.S3FileSystem._get_file

    async def slow(self: Any, rpath: str, lpath: str, **kwargs: Any) -> Any:
        if _is_data_file(rpath):
            downloads.append(rpath)
            await asyncio.sleep(SLOW_COPY_S)
        return await original(self, rpath, lpath, **kwargs)

    s3fs.S3FileSystem._get_file = slow
    try:
        barrier.wait(timeout=60)
        path = localize(uri, storage_options=options, cache_root=cache)
        payload: Any = (
            {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
            if path.is_dir()
            else path.read_bytes()
        )
        results.put((str(path), len(downloads), payload))
    except BaseException as exc:
        results.put(("error", 0, repr(exc)))
        raise


def _run_two(uri: str, options: dict[str, Any], cache: Path) -> list[tuple[str, int, Any]]:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    children = [
        ctx.Process(
            target=_localize_in_child, args=(uri, options, str(cache), env, barrier, results)
        )
        for _ in range(2)
    ]
    for child in children:
        child.start()
    try:
        got = [results.get(timeout=120) for _ in children]
    finally:
        for child in children:
            child.join(timeout=30)
    return got


@pytest.mark.parametrize("kind", ["file", "tree"])
def test_two_processes_copy_once(
    kind: str, s3_bucket: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    bucket, options = s3_bucket
    cache = tmp_path / "cache"
    if kind == "file":
        _put(options, f"{bucket}/big.bin", b"x" * 100_000)
        uri, expected, files = f"s3://{bucket}/big.bin", b"x" * 100_000, 1
    else:
        _put(options, f"{bucket}/d/one.bin", b"1" * 1000)
        _put(options, f"{bucket}/d/sub/two.bin", b"2" * 1000)
        uri, files = f"s3://{bucket}/d", 2
        expected = {"one.bin": b"1" * 1000, "sub/two.bin": b"2" * 1000}
    start = time.perf_counter()
    got = _run_two(uri, options, cache)
    assert all(path != "error" for path, _, _ in got), got
    assert got[0][0] == got[1][0]  # both use the one entry
    assert sorted(n for _, n, _ in got) == [0, files]  # one copied, the other waited for it
    assert [payload for _, _, payload in got] == [expected, expected]
    assert len(_entries(cache)) == 1
    assert not [p for p in (cache / "objects").iterdir() if p.name.startswith(".staging")]
    assert time.perf_counter() - start < 60
