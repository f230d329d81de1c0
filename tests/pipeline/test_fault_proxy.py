"""The fault-injecting proxy (tests/fault_proxy.py) on its own, in front of moto's S3 server.

No pipeline run here: these tests check that the proxy is transparent when it injects nothing,
that each fault reaches s3fs as the failure it stands for, that s3fs configured for retries rides
out a mix of faults, and that a seed fixes the fault decisions of a request sequence.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import threading
import time
from typing import Any

import botocore.exceptions
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import s3fs
from fault_proxy import KEYS, FaultProxy, Rule, proxied_options


def _fs(options: dict[str, Any], endpoint: str, **kwargs: Any) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**proxied_options(options, endpoint, **kwargs))


def _no_retries(options: dict[str, Any], endpoint: str, **kwargs: Any) -> s3fs.S3FileSystem:
    """A client that tries once where it can: botocore without retries and s3fs's own retry
    loop set to one attempt. (aiohttp may still resend an idempotent request once when a pooled
    connection dies, so a fault can be injected twice for one call.)"""
    fs = _fs(options, endpoint, max_attempts=0, **kwargs)
    fs.retries = 1
    return fs


def _proxy_threads() -> list[threading.Thread]:
    """The proxy's threads still alive: its accept loop and its connection handlers."""
    return [t for t in threading.enumerate() if t.name.startswith("fault-proxy")]


def _snapshot(fs: s3fs.S3FileSystem, root: str) -> dict[str, Any]:
    fs.invalidate_cache()
    return {
        "find": sorted(p.removeprefix(root) for p in fs.find(root)),
        "ls": sorted(
            (e["name"].removeprefix(root), e["type"], e.get("size"))
            for e in fs.ls(root, detail=True)
        ),
        "info": {
            k: v
            for k, v in fs.info(f"{root}/big.bin").items()
            if k in ("size", "type", "ETag", "ContentType")
        },
        "small": fs.cat_file(f"{root}/dir/a.txt"),
        "range": fs.cat_file(f"{root}/big.bin", start=1000, end=5000),
        "big": fs.cat_file(f"{root}/big.bin"),
        "parquet": pq.read_table(
            f"{root}/t.parquet", filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs))
        ).to_pydict(),
    }


def test_pass_through_is_transparent(s3_bucket, s3_server) -> None:
    bucket, options = s3_bucket
    direct = s3fs.S3FileSystem(**{**options, "skip_instance_cache": True})
    big = bytes(range(256)) * (6 * 2**20 // 256 + 3)  # > 5 MiB: a two-part multipart upload
    table = pa.table({"id": list(range(100)), "text": [f"row {i}" for i in range(100)]})
    with FaultProxy(s3_server, seed=0) as proxy:
        fs = _fs(options, proxy.url)
        for name, client in (("via-proxy", fs), ("direct", direct)):
            root = f"{bucket}/{name}"
            client.pipe_file(f"{root}/dir/a.txt", b"hello\n")
            client.pipe_file(f"{root}/empty", b"")
            with client.open(f"{root}/big.bin", "wb", block_size=5 * 2**20) as f:
                f.write(big)
            arrow = pafs.PyFileSystem(pafs.FSSpecHandler(client))
            pq.write_table(table, f"{root}/t.parquet", filesystem=arrow)
        # Everything written either way reads the same either way.
        views = {
            (name, reader): _snapshot(client, f"{bucket}/{name}")
            for name in ("via-proxy", "direct")
            for reader, client in (("proxy", fs), ("direct", direct))
        }
        assert len({repr(v) for v in views.values()}) == 1
        view = views["via-proxy", "proxy"]
        assert view["big"] == big and view["small"] == b"hello\n"
        assert view["range"] == big[1000:5000]
        assert view["parquet"] == table.to_pydict()
        assert fs.cat_file(f"{bucket}/via-proxy/empty") == b""
        fs.rm_file(f"{bucket}/via-proxy/empty")  # DELETE
        fs.rm(f"{bucket}/via-proxy", recursive=True)
        assert not direct.exists(f"{bucket}/via-proxy/dir/a.txt")
        assert proxy.requests > 10 and proxy.injected() == 0
        assert len(_proxy_threads()) >= 2  # the accept loop, and a pooled keep-alive connection
        assert {d.method for d in proxy.decisions} >= {"GET", "HEAD", "PUT", "POST", "DELETE"}
    assert not _proxy_threads()


def _signed(method: str, url: str) -> dict[str, str]:
    """SigV4 headers (conftest's fake keys) for a request to moto, which answers unsigned
    reads with 403."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method, url, headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    S3SigV4Auth(Credentials("testing", "testing"), "s3", "us-east-1").add_auth(request)
    return dict(request.headers.items())


def test_http_framing_on_one_connection(s3_bucket, s3_server) -> None:
    """Chunked request bodies, Expect: 100-continue, HEAD lengths and keep-alive, by hand."""
    bucket, _ = s3_bucket
    with FaultProxy(s3_server, seed=0) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)

        def start(method: str, key: str, **headers: str) -> None:
            conn.putrequest(method, f"/{bucket}/raw/{key}", skip_accept_encoding=True)
            for name, value in {
                **_signed(method, f"{proxy.url}/{bucket}/raw/{key}"),
                **headers,
            }.items():
                conn.putheader(name, value)

        def answer() -> tuple[int, bytes, http.client.HTTPResponse]:
            resp = conn.getresponse()
            return resp.status, resp.read(), resp

        start("PUT", "chunked", **{"Transfer-Encoding": "chunked"})
        conn.endheaders()
        for piece in (b"hello ", b"chunked ", b"world", b""):
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        assert answer()[0] == 200
        sock = conn.sock
        body = b"x" * 1000
        start("PUT", "expect", **{"Content-Length": str(len(body)), "Expect": "100-continue"})
        conn.endheaders()
        assert conn.sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"  # before the body
        conn.send(body)
        assert answer()[0] == 200
        start("HEAD", "chunked")
        conn.endheaders()
        status, data, resp = answer()
        assert (status, data, resp.getheader("Content-Length")) == (200, b"", "19")
        for key, expected in (("chunked", b"hello chunked world"), ("expect", body)):
            start("GET", key)
            conn.endheaders()
            assert answer()[:2] == (200, expected)
        start("GET", "missing")
        conn.endheaders()
        status, data, _ = answer()
        assert status == 404 and b"NoSuchKey" in data
        assert conn.sock is sock  # one connection throughout
        conn.close()
        assert proxy.requests == 6
    assert not _proxy_threads()


def _failure(call: Any) -> BaseException:
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("the call did not fail")


def _chain(exc: BaseException | None) -> list[type]:
    """The types of an exception and of every exception it was raised from."""
    types = []
    while exc is not None:
        types.append(type(exc))
        exc = exc.__cause__ or exc.__context__
    return types


def test_each_fault_hits_matching_keys_only(s3_bucket, s3_server) -> None:
    bucket, options = s3_bucket
    direct = s3fs.S3FileSystem(**{**options, "skip_instance_cache": True})
    payload = b"0123456789" * 10_000
    for key in ("hit-old", "miss"):
        direct.pipe_file(f"{bucket}/{key}", payload)
    rules = [
        Rule("refuse", 0.0, path=r"/hit-", name="refuse"),
        Rule("cut", 0.0, path=r"/hit-", name="cut"),
        Rule("slowdown", 0.0, path=r"/hit-", name="slowdown"),
        Rule("delay", 0.0, path=r"/hit-", delay_s=1.0, name="delay"),
    ]
    with FaultProxy(s3_server, seed=1, rules=rules) as proxy:
        fs = _no_retries(options, proxy.url)

        def write() -> None:
            fs.pipe_file(f"{bucket}/hit-new", payload)

        def read() -> bytes:
            return fs.cat_file(f"{bucket}/hit-old", start=0, end=len(payload))

        def only(kind: str) -> None:
            proxy.set_rules(
                [
                    Rule(r.kind, float(r.kind == kind), path=r.path, delay_s=r.delay_s, name=r.name)
                    for r in rules
                ]
            )
            proxy.reset_counts()
            if direct.exists(f"{bucket}/hit-new"):
                direct.rm(f"{bucket}/hit-new")
            fs.invalidate_cache()
            direct.invalidate_cache()

        def misses_pass(kind: str) -> None:
            before = proxy.counts()[kind]["injected"]
            fs.pipe_file(f"{bucket}/miss", payload)
            assert fs.cat_file(f"{bucket}/miss", start=0, end=len(payload)) == payload
            assert fs.info(f"{bucket}/miss")["size"] == len(payload)
            assert proxy.counts()[kind]["injected"] == before

        # refuse: the connection is reset before anything is read; nothing reaches moto.
        only("refuse")
        for call in (write, read):
            exc = _failure(call)
            assert isinstance(exc, botocore.exceptions.EndpointConnectionError), repr(exc)
            assert ConnectionResetError in _chain(exc)
        assert not direct.exists(f"{bucket}/hit-new")
        assert proxy.counts()["refuse"]["injected"] >= 2
        misses_pass("refuse")

        # cut: the write reaches moto but its answer is cut short; a read's body is truncated.
        only("cut")
        exc = _failure(write)
        assert isinstance(exc, botocore.exceptions.ConnectionClosedError), repr(exc)
        assert direct.cat_file(f"{bucket}/hit-new") == payload  # it took, unbeknown to the client
        exc = _failure(read)
        assert "payload is not completed" in str(exc).lower(), repr(exc)
        assert proxy.counts()["cut"]["injected"] >= 2
        misses_pass("cut")

        # slowdown: 503 with S3's SlowDown error; nothing reaches moto.
        only("slowdown")
        for call in (write, read):
            exc = _failure(call)
            assert isinstance(exc, OSError) and exc.errno == errno.EBUSY, repr(exc)
            cause = exc.__cause__
            assert isinstance(cause, botocore.exceptions.ClientError), repr(cause)
            assert cause.response["Error"]["Code"] == "SlowDown"
            assert cause.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        exc = _failure(lambda: fs.info(f"{bucket}/hit-old"))  # HEAD: status only, no body
        assert exc.__cause__.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert not direct.exists(f"{bucket}/hit-new")
        assert proxy.counts()["slowdown"]["injected"] >= 3
        misses_pass("slowdown")

        # delay: the request succeeds, late (checked loosely).
        only("delay")
        start = time.monotonic()
        write()
        assert read() == payload
        assert time.monotonic() - start >= 1.5
        assert proxy.counts()["delay"]["injected"] == 2
        start = time.monotonic()
        misses_pass("delay")
        assert time.monotonic() - start < 5
        # ... and past the client's read timeout it is a timeout.
        slow = _no_retries(options, proxy.url, read_timeout=0.3)
        exc = _failure(lambda: slow.cat_file(f"{bucket}/hit-old", start=0, end=10))
        assert isinstance(exc, botocore.exceptions.ReadTimeoutError), repr(exc)

        assert [c["seen"] > 0 for c in proxy.counts().values()] == [True] * 4

        # A rule with a limit injects that many faults, then lets the retry through.
        proxy.set_rules([Rule("slowdown", 1.0, path=r"/hit-", limit=1, name="once")])
        _fs(options, proxy.url).pipe_file(f"{bucket}/hit-new", b"second try")
        assert direct.cat_file(f"{bucket}/hit-new") == b"second try"
        assert proxy.counts()["once"] == {"kind": "slowdown", "seen": 2, "injected": 1}
        assert proxy.injected("slowdown") == 1 + proxy.counts()["slowdown"]["injected"]
    assert not _proxy_threads()


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's standard-mode backoff (rand * 2**attempt s, up to 20 s) scaled down 50 times:
    which errors are retried, how often, and the retry quota stay botocore's own."""
    import botocore.retries.standard as standard

    delay = standard.ExponentialBackoff.delay_amount
    monkeypatch.setattr(
        standard.ExponentialBackoff,
        "delay_amount",
        lambda self, context: delay(self, context) / 50,
    )


MIX = [
    Rule("slowdown", 0.3, path=r"/mix/obj-", name="slowdown"),
    Rule("refuse", 0.2, path=r"/mix/obj-", name="refuse"),
    Rule("cut", 0.1, path=r"/mix/obj-", name="cut"),
]


def _objects(bucket: str, n: int) -> dict[str, bytes]:
    return {f"{bucket}/mix/obj-{i:03d}.bin": f"object {i} ".encode() * (i + 1) for i in range(n)}


def test_retrying_client_survives_a_fault_mix(s3_bucket, s3_server, fast_backoff) -> None:
    """One call at a time, so that the seed fixes every fault (and the test cannot flake)."""
    bucket, options = s3_bucket
    objects = _objects(bucket, 50)
    with FaultProxy(s3_server, seed=12, rules=MIX) as proxy:
        fs = _fs(options, proxy.url, max_attempts=10)
        for path, data in objects.items():
            fs.pipe_file(path, data)  # PUT
        fs.invalidate_cache()
        assert {path: fs.cat_file(path) for path in objects} == objects  # HEAD + GET each
        # Arrow over the same client, as Ray Data's writers and checkpoints use it.
        arrow = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
        tables = {
            f"{bucket}/mix/obj-t{i}.parquet": pa.table({"id": list(range(i * 100, i * 100 + 100))})
            for i in range(5)
        }
        for path, table in tables.items():
            pq.write_table(table, path, filesystem=arrow)
        fs.invalidate_cache()
        for path, table in tables.items():
            assert pq.read_table(path, filesystem=arrow).equals(table)
        counts = proxy.counts()
        with proxy.paused():  # a clean final check through the same proxy
            fs.invalidate_cache()
            assert sorted(fs.find(f"{bucket}/mix")) == sorted([*objects, *tables])
            assert fs.cat(sorted(objects)) == objects
        assert proxy.counts() == counts  # paused: nothing counted, nothing injected
    for kind in ("slowdown", "refuse", "cut"):
        assert counts[kind]["injected"] > 0, counts
    assert counts["slowdown"]["seen"] >= 150  # 50 PUT + 50 HEAD + 50 GET, plus the retries
    assert not _proxy_threads()


def test_concurrent_calls_through_faults(s3_bucket, s3_server, fast_backoff) -> None:
    """s3fs's concurrent puts and gets (ten connections at once) through lighter faults and
    delays: the request order varies, the outcome does not."""
    bucket, options = s3_bucket
    objects = _objects(bucket, 50)
    rules = [
        Rule("slowdown", 0.1, path=r"/mix/obj-", name="slowdown"),
        Rule("refuse", 0.05, path=r"/mix/obj-", name="refuse"),
        Rule("cut", 0.05, path=r"/mix/obj-", name="cut"),
        Rule("delay", 0.1, path=r"/mix/obj-", delay_s=0.2, name="delay"),
    ]
    with FaultProxy(s3_server, seed=3, rules=rules) as proxy:
        fs = _fs(options, proxy.url, max_attempts=10)
        fs.pipe(objects)
        fs.invalidate_cache()
        assert fs.cat(sorted(objects)) == objects
        assert proxy.injected() > 0
    assert not _proxy_threads()


def _decisions(s3_server: str, options: dict[str, Any], bucket: str, seed: int) -> list[tuple]:
    """The fault decisions for one fixed sequence of s3fs calls, made one at a time."""
    rules = [
        Rule("slowdown", 0.25, methods="PUT", path=r"/seq/", name="slowdown"),
        Rule("refuse", 0.25, methods=("GET", "HEAD"), path=r"/seq/", name="refuse"),
        Rule("cut", 0.25, path=r"/seq/", name="cut"),
    ]
    with FaultProxy(s3_server, seed=seed, rules=rules) as proxy:
        fs = _no_retries(options, proxy.url)
        for i in range(12):
            key = f"{bucket}/seq/k{i % 5}"
            with contextlib.suppress(Exception):
                fs.pipe_file(key, b"v" * (i + 1))
            with contextlib.suppress(Exception):
                fs.cat_file(key, start=0, end=1)
        decided = [(d.seq, d.method, d.path, d.kind) for d in proxy.decisions]
    assert not _proxy_threads()
    return decided


def test_seed_fixes_the_fault_sequence(s3_bucket, s3_server) -> None:
    bucket, options = s3_bucket
    first = _decisions(s3_server, options, bucket, seed=5)
    again = _decisions(s3_server, options, bucket, seed=5)
    other = _decisions(s3_server, options, bucket, seed=6)
    assert first == again
    assert {kind for *_, kind in first} == {None, "slowdown", "refuse", "cut"}
    assert [kind for *_, kind in other] != [kind for *_, kind in first]


def test_rules_validate_and_match() -> None:
    rule = Rule("cut", 0.5, methods=("put", "POST"), path=KEYS["kept_parts"], query="partNumber")
    assert rule.methods == frozenset({"PUT", "POST"})
    run = "/bkt/out/2026-11-27/run1"
    assert rule.matches("PUT", f"{run}/part-abc-000001.parquet", "partNumber=1&uploadId=x")
    assert not rule.matches("PUT", f"{run}/rejected/part-abc-000001.parquet", "partNumber=1")
    assert not rule.matches("GET", f"{run}/part-abc-000001.parquet", "partNumber=1")
    assert not rule.matches("PUT", f"{run}/part-abc-000001.parquet", "")
    for name, key in {
        "parts": "rejected/part-a-1.jsonl",
        "rejected": "rejected/part-a-1.jsonl",
        "stats": "_stats/part-a-1.json",
        "inputs": "_inputs/0123.json",
        "ids": "_ids/0123-000000.parquet",
        "checkpoint": "_checkpoint/pending_x.parquet",
        "manifest": "_manifest.json",
        "summary": "_summary.json",
        "report": "report.html",
        "run_record": "_run.json",
        "lease": "_lease.json",
        "success": "_SUCCESS",
    }.items():
        assert Rule("refuse", 1, path=KEYS[name]).matches("PUT", f"{run}/{key}", ""), name
    assert not Rule("refuse", 1, path=KEYS["parts"]).matches("PUT", f"{run}/_stats/part-a.json", "")
    for bad in (
        {"kind": "explode", "rate": 0.1},
        {"kind": "cut", "rate": 1.5},
        {"kind": "cut", "rate": 0.5, "cut_fraction": 1.0},
        {"kind": "delay", "rate": 0.5, "delay_s": -1},
        {"kind": "refuse", "rate": 0.5, "limit": -1},
    ):
        with pytest.raises(ValueError):
            Rule(**bad)
    with pytest.raises(ValueError, match="unique"):
        FaultProxy(
            "http://127.0.0.1:1", seed=0, rules=[Rule("cut", 1), Rule("cut", 1, name="cut#0")]
        )
