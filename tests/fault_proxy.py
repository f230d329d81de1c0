"""A fault-injecting HTTP/1.1 reverse proxy for tests against an S3 stand-in (moto's server).

:class:`FaultProxy` listens on 127.0.0.1 (a free port) and forwards every request to an upstream
endpoint, one upstream keep-alive connection per client connection. Clients use the proxy's URL
as their S3 endpoint (``client_kwargs={"endpoint_url": proxy.url}``; see :func:`proxied_options`).
Each request is matched against a list of :class:`Rule`; a matching rule injects its fault with
its rate, drawn from one ``random.Random(seed)``:

``refuse``
    The request line and headers are read, then the connection is reset (RST) without reading
    the body or answering: the client sees a connection error. Nothing reaches the upstream.
``cut``
    The request is forwarded (its effect on the upstream happens), then only part of the response
    goes back before the connection is closed: ``cut_fraction`` of the body after complete
    headers, or, for a response without a body (PUT, DELETE, HEAD), part of the headers. The
    client sees an incomplete read or a dropped connection, and never learns that the write took.
``slowdown``
    The body is read and the proxy answers ``503 SlowDown`` with S3's XML error body (no body for
    HEAD, as S3 does). Nothing reaches the upstream.
``delay``
    The body is read, the proxy waits ``delay_s`` seconds, then forwards. A delay longer than the
    client's read timeout is seen as a timeout (and the request still runs on the upstream).

Rules are tried in order; for each rule that matches a request (and has not reached its
``limit``) one number is drawn, and the first rule whose draw falls under its rate fires (one fault
per request at most; later rules' rates apply to what earlier ones let through). The decisions are
therefore fixed for a given seed and a given sequence of requests, retries included: one client
making one call at a time gets the same faults on every run. Concurrent clients (several threads,
s3fs's concurrent transfers, Ray tasks) send requests in an order that varies from run to run, so
there only the rates, not which request gets which fault, are reproducible.

Matching: ``methods`` (one or several HTTP methods, any when None), ``path``: a regex searched in
the URL-decoded path, which with path-style addressing (what botocore uses for an IP endpoint) is
``/<bucket>/<key>``, and ``query``: a regex searched in the raw query string (``uploadId=``,
``partNumber=``, ``list-type=2``...). A listing is ``GET /<bucket>?list-type=2&prefix=...``: its
path holds no key, so key rules do not match listings. :data:`KEYS` has patterns for what a run
writes.

Counters (:meth:`FaultProxy.counts`, :meth:`FaultProxy.injected`) and the per-request decision log
(:attr:`FaultProxy.decisions`) are readable at any time. :meth:`FaultProxy.set_rules` replaces the
rules (and optionally the seed) at runtime; :meth:`FaultProxy.pause` / :meth:`FaultProxy.resume`
(or ``with proxy.paused():``) stop injecting without drawing numbers, e.g. to let a final
verification pass through. Stopping (leaving the ``with`` block) closes every client connection,
interrupts delays and joins every thread the proxy started.

    rules = [Rule("slowdown", 0.3, methods="PUT", path=KEYS["parts"]),
             Rule("cut", 1.0, methods="PUT", path=KEYS["success"], limit=1)]
    with FaultProxy(s3_server, seed=7, rules=rules) as proxy:   # or: url = proxy.start() ... stop()
        fs = s3fs.S3FileSystem(**proxied_options(storage_options, proxy.url))
        ...
        assert proxy.injected("slowdown") > 0
        with proxy.paused():
            ...  # verify without faults
"""

from __future__ import annotations

import contextlib
import http.client
import random
import re
import socket
import struct
import threading
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

KINDS = ("refuse", "cut", "slowdown", "delay")

# Regexes (for Rule.path) for the keys a run writes under <output uri>/<run id>/. Parts are
# ``part-<write uuid>-<task>.<ext>`` in the run directory, and under rejected/ with the same name;
# _stats/ holds ``part-...json`` summaries, so the part patterns name the extensions.
KEYS = {
    "parts": r"/part-[^/]*\.(parquet|jsonl)$",  # kept and rejected parts
    "kept_parts": r"(?<!/rejected)/part-[^/]*\.(parquet|jsonl)$",
    "rejected": r"/rejected/part-[^/]*$",
    "stats": r"/_stats/[^/]+$",
    "inputs": r"/_inputs/[^/]+$",
    "ids": r"/_ids/[^/]+$",
    "checkpoint": r"/_checkpoint/",
    "manifest": r"/_manifest\.json$",
    "summary": r"/_summary\.json$",
    "report": r"/report\.html$",
    "run_record": r"/_run\.json$",
    "lease": r"/_lease\.json$",
    "success": r"/_SUCCESS$",
}

SLOWDOWN_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    "<Resource>{resource}</Resource><RequestId>{request_id}</RequestId>"
    "<HostId>fault-proxy</HostId></Error>"
)

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the proxy recomputes.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
    }
)
_MAX_CHUNK_LINE = 65536


@dataclass(frozen=True)
class Rule:
    """Inject ``kind`` into ``rate`` (0..1) of the requests that match.

    ``methods``: "PUT", ("PUT", "POST") or None (any); ``path``: regex searched in the decoded
    path ``/<bucket>/<key>``; ``query``: regex searched in the raw query string. ``delay_s`` is
    the wait of a ``delay``; ``cut_fraction`` the share of a ``cut`` response that is sent.
    ``limit`` caps the faults the rule injects (e.g. 1: only the first matching request that
    draws under the rate); a rule at its limit still counts what it sees but draws nothing.
    ``name`` keys the counters (default ``<kind>#<index in the rule list>``).
    """

    kind: str
    rate: float
    methods: str | Iterable[str] | None = None
    path: str | None = None
    query: str | None = None
    delay_s: float = 1.0
    cut_fraction: float = 0.5
    limit: int | None = None
    name: str | None = None
    _path_re: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)
    _query_re: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}: one of {KINDS}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be within 0..1, got {self.rate}")
        if not 0.0 <= self.cut_fraction < 1.0:
            raise ValueError(f"cut_fraction must be within [0, 1), got {self.cut_fraction}")
        if self.delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {self.delay_s}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        methods = self.methods
        if methods is not None:
            methods = frozenset(
                m.upper() for m in ((methods,) if isinstance(methods, str) else methods)
            )
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "_path_re", re.compile(self.path) if self.path else None)
        object.__setattr__(self, "_query_re", re.compile(self.query) if self.query else None)

    def matches(self, method: str, path: str, query: str) -> bool:
        if self.methods is not None and method.upper() not in self.methods:
            return False
        if self._path_re is not None and not self._path_re.search(path):
            return False
        return self._query_re is None or bool(self._query_re.search(query))


class Decision(NamedTuple):
    """One request as the proxy saw it: its order, method, decoded path, query, and the rule
    that fired (None when it was forwarded untouched)."""

    seq: int
    method: str
    path: str
    query: str
    rule: str | None
    kind: str | None


class FaultProxy:
    """A threaded fault-injecting reverse proxy on 127.0.0.1 (see the module docstring).

    ``upstream_url``: the endpoint to forward to (``http://host:port``); ``seed``: the seed of the
    fault draws; ``rules``: the initial rules. ``upstream_timeout`` bounds each upstream request,
    ``idle_timeout`` how long an idle client keep-alive connection is kept. Every request is
    appended to :attr:`decisions` (a few hundred bytes each: mind very long runs). Thread-safe:
    rules, pause and counters may be changed and read from any thread while clients run.
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        seed: int,
        rules: Iterable[Rule] = (),
        upstream_timeout: float = 60.0,
        idle_timeout: float = 120.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream_url!r}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.upstream_timeout = upstream_timeout
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._paused = False
        self._rules: list[tuple[str, Rule]] = []
        self._rng = random.Random(seed)
        self._counts: dict[str, dict[str, Any]] = {}
        self._decisions: list[Decision] = []
        self._seq = 0
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.set_rules(rules)

    # Lifecycle -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        """Starts listening on a free port; returns the URL to use as the S3 endpoint."""
        if self._server is not None:
            raise RuntimeError("the proxy is already running")
        self._stop.clear()
        server = _Server(("127.0.0.1", 0), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy"
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stops accepting, drops every open connection, waits for every handler thread."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stop.set()  # wakes delays
        server.shutdown()  # the accept loop
        if thread is not None:
            thread.join()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:  # unblocks handlers waiting on idle keep-alive connections
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        server.server_close()  # joins the handler threads (block_on_close)
        self._server = self._thread = None

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Rules and counters --------------------------------------------------------------------------

    def set_rules(self, rules: Iterable[Rule], *, seed: int | None = None) -> None:
        """Replaces the rules (counters of names still present are kept); reseeds when given."""
        named = [(rule.name or f"{rule.kind}#{i}", rule) for i, rule in enumerate(rules)]
        names = [name for name, _ in named]
        if len(set(names)) != len(names):
            raise ValueError(f"rule names must be unique: {names}")
        with self._lock:
            self._rules = named
            for name, rule in named:
                self._counts.setdefault(name, {"kind": rule.kind, "seen": 0, "injected": 0})
            if seed is not None:
                self._rng = random.Random(seed)

    def pause(self) -> None:
        """Forward everything untouched (no numbers drawn, rules not counted) until resume()."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def counts(self) -> dict[str, dict[str, Any]]:
        """{rule name: {"kind", "seen" (matching requests), "injected"}} (a copy)."""
        with self._lock:
            return {name: dict(c) for name, c in self._counts.items()}

    def injected(self, kind: str | None = None) -> int:
        """Faults injected so far, of one kind or of all."""
        with self._lock:
            return sum(
                c["injected"] for c in self._counts.values() if kind is None or c["kind"] == kind
            )

    @property
    def requests(self) -> int:
        """Requests seen so far (every request whose headers were read)."""
        with self._lock:
            return self._seq

    @property
    def decisions(self) -> list[Decision]:
        with self._lock:
            return list(self._decisions)

    def reset_counts(self) -> None:
        """Zeroes the counters and clears the decision log (rules and random state unchanged)."""
        with self._lock:
            for c in self._counts.values():
                c["seen"] = c["injected"] = 0
            self._decisions.clear()
            self._seq = 0

    def _decide(self, method: str, path: str, query: str) -> Rule | None:
        with self._lock:
            fired: tuple[str, Rule] | None = None
            if not self._paused:
                for name, rule in self._rules:
                    if not rule.matches(method, path, query):
                        continue
                    counts = self._counts[name]
                    counts["seen"] += 1
                    if rule.limit is not None and counts["injected"] >= rule.limit:
                        continue
                    if self._rng.random() < rule.rate:
                        counts["injected"] += 1
                        fired = (name, rule)
                        break
            self._decisions.append(
                Decision(
                    self._seq,
                    method,
                    path,
                    query,
                    fired[0] if fired else None,
                    fired[1].kind if fired else None,
                )
            )
            self._seq += 1
            return fired[1] if fired else None

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            if not add:
                self._connections.discard(sock)
                return
            self._connections.add(sock)
            if self._stop.is_set():  # accepted while stopping: stop() may have missed it
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def proxied_options(
    storage_options: dict[str, Any],
    endpoint_url: str,
    *,
    max_attempts: int = 10,
    retry_mode: str = "standard",
    connect_timeout: float = 5,
    read_timeout: float = 15,
) -> dict[str, Any]:
    """``storage_options`` (s3fs) pointed at ``endpoint_url``, with botocore's retries set and
    s3fs's instance cache skipped (so that each test gets its own client and retry quota)."""
    options = dict(storage_options)
    options["client_kwargs"] = {
        **storage_options.get("client_kwargs", {}),
        "endpoint_url": endpoint_url,
    }
    config = dict(storage_options.get("config_kwargs", {}))
    config.setdefault("retries", {"max_attempts": max_attempts, "mode": retry_mode})
    config.setdefault("connect_timeout", connect_timeout)
    config.setdefault("read_timeout", read_timeout)
    options["config_kwargs"] = config
    options["skip_instance_cache"] = True
    return options


# Server side ---------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # tracked, and joined by server_close()
    block_on_close = True
    allow_reuse_address = True
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not self.proxy._stop.is_set():
            super().handle_error(request, client_address)


class _Drop(Exception):
    """The client connection is unusable (closed, reset, malformed): end it quietly."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        threading.current_thread().name = "fault-proxy-connection"
        self.timeout = self.server.proxy.idle_timeout
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError):
                super().finish()
        finally:
            if self._upstream is not None:
                self._upstream.close()
            self.server.proxy._track(self.connection, False)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (_Drop, OSError):
            self.close_connection = True

    def handle_expect_100(self) -> bool:
        return True  # deferred: "100 Continue" goes out when (and if) the body is read

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = do_GET

    # One request ---------------------------------------------------------------------------------

    def _proxy(self) -> None:
        proxy = self.server.proxy
        split = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(split.path)
        rule = proxy._decide(self.command, path, split.query)
        kind = rule.kind if rule else None
        if kind == "refuse":
            self._reset()
            return
        body = self._read_body()
        if kind == "slowdown":
            self._send(*_slowdown(self.command, path))
            return
        if kind == "delay" and proxy._stop.wait(rule.delay_s):
            raise _Drop("stopping")
        status, reason, headers, data = self._forward(body)
        raw = self._response_bytes(status, reason, headers, data)
        if kind == "cut":
            head_len = len(raw) - len(data)
            if data:
                cut = head_len + int(len(data) * rule.cut_fraction)
            else:
                cut = max(1, int(head_len * rule.cut_fraction)) if rule.cut_fraction else 0
            self._write(raw[: min(cut, len(raw) - 1)])
            self.close_connection = True
            return
        self._write(raw)

    def _read_body(self) -> bytes:
        if "100-continue" in self.headers.get("Expect", "").lower():
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            n = int(length)
        except ValueError as exc:
            raise _Drop(f"bad Content-Length {length!r}") from exc
        data = self.rfile.read(n)
        if len(data) != n:
            raise _Drop("client closed mid-body")
        return data

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            line = self.rfile.readline(_MAX_CHUNK_LINE)
            if not line.endswith(b"\n"):
                raise _Drop("bad chunk header")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(_MAX_CHUNK_LINE) not in (b"\r\n", b"\n", b""):
                    pass  # HTTP trailers: dropped (the body is forwarded with Content-Length)
                return b"".join(parts)
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                raise _Drop("client closed mid-chunk")
            parts.append(chunk)
            self.rfile.readline(_MAX_CHUNK_LINE)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        had_length = (
            "Content-Length" in self.headers
            or "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        )
        for attempt in range(2):
            reused = self._upstream is not None
            if self._upstream is None:
                host, port = self.server.proxy.upstream
                self._upstream = http.client.HTTPConnection(
                    host, port, timeout=self.server.proxy.upstream_timeout
                )
            conn = self._upstream
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    if key.lower() not in _HOP:
                        conn.putheader(key, value)
                if body or had_length:
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionError) as exc:
                conn.close()
                self._upstream = None
                if reused and attempt == 0:
                    continue  # a stale keep-alive connection: once more on a fresh one
                return _bad_gateway(exc)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._upstream = None
                return _bad_gateway(exc)
            if resp.will_close:
                conn.close()
                self._upstream = None
            return resp.status, resp.reason, resp.getheaders(), data
        raise AssertionError("unreachable")

    def _response_bytes(
        self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes
    ) -> bytes:
        no_body = self.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        lines = [f"HTTP/1.1 {status} {reason}"]
        length = None
        for key, value in headers:
            low = key.lower()
            if low == "content-length":
                length = value
            if low not in _HOP:
                lines.append(f"{key}: {value}")
        if not no_body:
            lines.append(f"Content-Length: {len(data)}")
        elif length is not None:
            lines.append(f"Content-Length: {length}")
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + (b"" if no_body else data)

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
        self._write(self._response_bytes(status, reason, headers, data))

    def _write(self, raw: bytes) -> None:
        try:
            self.wfile.write(raw)
            self.wfile.flush()
        except OSError as exc:
            raise _Drop("client went away") from exc

    def _reset(self) -> None:
        """Closes the client connection with a TCP reset, leaving the request unanswered."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


def _slowdown(method: str, path: str) -> tuple[int, str, list[tuple[str, str]], bytes]:
    request_id = uuid.uuid4().hex[:16].upper()
    headers = [("x-amz-request-id", request_id), ("Content-Type", "application/xml")]
    body = SLOWDOWN_XML.format(resource=_xml_escape(path), request_id=request_id).encode()
    return 503, "Slow Down", headers, b"" if method == "HEAD" else body


def _bad_gateway(exc: BaseException) -> tuple[int, str, list[tuple[str, str]], bytes]:
    body = f"fault proxy: upstream failed: {type(exc).__name__}: {exc}".encode()
    return 502, "Bad Gateway", [("Content-Type", "text/plain")], body


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
