"""A run is a contract: one run id, one configuration, one writer at a time.

``<run dir>/_run.json`` records, when a run starts, everything that decides what its rows hold
(:func:`run_identity`): every config field the schema marks ``IDENTITY`` (the task and its
prompt template, the input location as rendered, its format, the columns read, the longest row
read, the model checkpoint and its content identity, the generation and toxicity settings, the
output format). Rerunning the run id with a config whose identity differs, finished or not, is
refused with the fields that differ: two configurations never share one run directory and
manifest. So a rerun of a run id with another ``--date`` (an ``input.uri`` with ``{date}``) is
refused naming ``input.uri``: a run id stands for one input, and resuming it must not mix in rows
of another; give each date its own run id (the CLI's default run id is the date). Settings that
change speed but not outputs (replicas, slots, batch sizes) are marked ``NOT_IDENTITY``.

``<run dir>/_lease.json`` names the driver working on the run (host, pid, since) and its last
heartbeat. A second driver finds a live lease and is refused, naming the holder; a lease whose
heartbeat stopped more than ``run.lease_timeout_s`` ago belonged to a driver that died, and is
taken over, so a crash never blocks its own resume. A holder on the same host whose process is
gone (its pid no longer runs, or runs a process started at another time) is taken over at once. Object stores have no atomic create: after
writing its lease a driver reads it back a moment later and proceeds only if it is still its
own, so of two drivers starting together at most one goes on. A driver stopped with SIGTERM
(``ray job stop``, a preempted node's shutdown, Kubernetes) removes its lease first, then unwinds:
whatever the unwinding costs, the run resumes at once, not after the timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import signal
import socket
import threading
import time
import uuid
from typing import Any

import fsspec
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from model.storage import content_identity, filesystem
from pipeline.config import ConfigError, JobConfig
from pipeline.rundir import LEASE, RUN_RECORD
from pipeline.secrets import mask_text

log = logging.getLogger(__name__)

LEASE_SETTLE_S = 0.5


class RunRefused(ConfigError):
    """The run id is taken: by another configuration, or by a live driver (exit 2)."""


def identity_mark(field: FieldInfo) -> bool | str:
    """A config field's identity mark (``IDENTITY`` / ``CONTENT_IDENTITY`` / ``NOT_IDENTITY`` of
    :mod:`pipeline.config.schema`); ValueError for a field without one."""
    extra = field.json_schema_extra
    if not isinstance(extra, dict) or "identity" not in extra:
        raise ValueError(f"config field {field!r} is not marked for the run identity")
    return extra["identity"]  # type: ignore[return-value]


def identity_fields(model: type[BaseModel] = JobConfig, prefix: str = "") -> dict[str, bool | str]:
    """Every leaf field of the config schema (dotted path) and its identity mark."""
    marks: dict[str, bool | str] = {}
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            marks.update(identity_fields(kind, f"{prefix}{name}."))
        else:
            marks[prefix + name] = identity_mark(field)
    return marks


def run_identity(config: JobConfig) -> dict[str, Any]:
    """The settings that decide a run's outputs (see the module docstring), by dotted path.

    Every field marked in the schema, with its rendered value (``input.uri`` with the date in
    it), except those the config exempts (:meth:`JobConfig.identity_exempt`); a location marked
    for its content also gets ``<section>.content``. Values that came from ``${...}`` are
    recorded as a digest, and URIs with their credentials masked.
    """
    data = config.model_dump(mode="json")
    exempt = config.identity_exempt()
    identity: dict[str, Any] = {}
    for path, mark in identity_fields().items():
        if mark is False or path in exempt:
            continue
        section, _, name = path.rpartition(".")
        value = data[section][name] if section else data[name]
        identity[path] = _recorded(path, value, config.interpolated_paths)
        if mark == "content" and value is not None:
            options = getattr(config, section).storage_options
            identity[f"{section}.content"] = content_identity(value, options)
    return identity


def _recorded(path: str, value: Any, interpolated: frozenset[str]) -> Any:
    if any(p == path or p.startswith(path + ".") for p in interpolated):
        text = json.dumps(value, sort_keys=True)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:24]
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, list):
        return [mask_text(v) if isinstance(v, str) else v for v in value]
    return value


def check_identity(
    fs: fsspec.AbstractFileSystem, run_dir: str, run_id: str, identity: dict[str, Any]
) -> bool:
    """Raises RunRefused if the run was started with another identity; True if it was recorded."""
    path = posixpath.join(run_dir, RUN_RECORD)
    if not fs.exists(path):
        return False
    recorded = json.loads(fs.cat_file(path)).get("identity", {})
    differ = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
    if differ:
        raise RunRefused(
            [
                (
                    name,
                    mask_text(
                        f"run {run_id} was started with {recorded.get(name)!r}, "
                        f"now {identity.get(name)!r}"
                    ),
                )
                for name in differ
            ]
            + [("run_id", "a run id keeps one configuration: use a new run id (or --force)")]
        )
    return True


def record_identity(fs: fsspec.AbstractFileSystem, run_dir: str, identity: dict[str, Any]) -> None:
    record = {"identity": identity, "recorded_at": time.time()}
    fs.pipe_file(posixpath.join(run_dir, RUN_RECORD), json.dumps(record, indent=2).encode())


class Lease:
    """Holds ``<run dir>/_lease.json`` while a driver works on a run (a context manager)."""

    def __init__(self, run_uri: str, storage_options: dict[str, Any], timeout_s: float) -> None:
        self.fs, run_dir = filesystem(run_uri, storage_options)
        self.path = posixpath.join(run_dir, LEASE)
        self.timeout_s = timeout_s
        self.token = uuid.uuid4().hex
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _process_started(os.getpid()),
            "since": time.time(),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="rgbatch-lease", daemon=True)
        self._released = False
        self._sigterm: tuple[Any, Any] | None = None  # (our handler, the one it replaced)

    def __enter__(self) -> Lease:
        self._refuse_if_held()
        self._write()
        time.sleep(LEASE_SETTLE_S)
        current = self._read()
        if current is None or current.get("token") != self.token:
            self._refuse_if_held(current)
        self._thread.start()
        if threading.current_thread() is threading.main_thread():  # signals reach it only
            self._sigterm = (self._on_sigterm, signal.getsignal(signal.SIGTERM))
            signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        if self._sigterm is not None and signal.getsignal(signal.SIGTERM) == self._sigterm[0]:
            previous = self._sigterm[1]
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """Releases the lease before anything unwinds, then does what the handler it replaced
        did: Ray's driver handler exits; another lease's handler releases that lease in turn; a
        default one exits with 128 + 15; an ignored signal stays ignored."""
        try:
            self.release()
            log.warning("SIGTERM: released the run lease; stopping")
        except Exception:  # the lease then expires after run.lease_timeout_s
            log.warning("could not release the run lease on SIGTERM", exc_info=True)
        assert self._sigterm is not None
        previous = self._sigterm[1]
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if it is still this driver's (idempotent:
        the SIGTERM handler and ``__exit__`` may both call it)."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        self._thread.join(timeout=10)
        current = self._read()
        if current is not None and current.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)

    def check(self) -> None:
        """Raises :class:`RunRefused` if a live driver holds the run (reads only: a lease that
        would be taken over is left for :meth:`__enter__`)."""
        self._refuse_if_held(quiet=True)

    def _refuse_if_held(self, lease: dict[str, Any] | None = None, *, quiet: bool = False) -> None:
        lease = lease if lease is not None else self._read()
        if lease is None or lease.get("token") == self.token:
            return
        age = time.time() - float(lease.get("heartbeat_at", 0))
        holder = lease.get("holder", {})
        if age <= self.timeout_s and not self._died_here(holder):
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("since", 0)))
            raise RunRefused.at(
                "run_id",
                f"the run is in progress on host {holder.get('host')} (pid {holder.get('pid')}, "
                f"since {since}, last heartbeat {age:.0f} s ago); a lease whose heartbeat stops "
                f"for {self.timeout_s:g} s (run.lease_timeout_s) is taken over",
            )
        if quiet:
            return
        log.warning(
            "taking over the lease of %s (pid %s): its process is gone or it sent no heartbeat "
            "for %.0f s",
            holder.get("host"),
            holder.get("pid"),
            age,
        )

    def _died_here(self, holder: dict[str, Any]) -> bool:
        """The holder ran on this host and its process is gone: no need to wait for the timeout."""
        if holder.get("host") != self.holder["host"] or not isinstance(holder.get("pid"), int):
            return False
        started = _process_started(holder["pid"])
        return started is None or started != holder.get("started")

    def _read(self) -> dict[str, Any] | None:
        self.fs.invalidate_cache()
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn write: treat as no lease
            return None

    def _write(self) -> None:
        lease = {"token": self.token, "holder": self.holder, "heartbeat_at": time.time()}
        self.fs.pipe_file(self.path, json.dumps(lease).encode())

    def _beat(self) -> None:
        while not self._stop.wait(max(self.timeout_s / 4, 0.05)):
            try:
                self._write()
            except Exception:  # one missed beat is not fatal; the timeout allows several
                log.warning("could not renew the run lease", exc_info=True)


def release_dead_lease(run_uri: str, storage_options: dict[str, Any], timeout_s: float) -> bool:
    """Removes ``_lease.json`` if its driver is gone (what :class:`Lease` would take over: no
    heartbeat for ``timeout_s``, or its process on this host ended); True when no live driver
    holds the run now. For a finished run, whose driver may have died after ``_SUCCESS``."""
    probe = Lease(run_uri, storage_options, timeout_s)
    lease = probe._read()
    if lease is None:
        return True
    age = time.time() - float(lease.get("heartbeat_at", 0))
    holder = lease.get("holder", {})
    if age <= timeout_s and not probe._died_here(holder):
        return False
    probe.fs.rm_file(probe.path)
    log.info(
        "removed the lease of %s (pid %s): its driver is gone",
        holder.get("host"),
        holder.get("pid"),
    )
    return True


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (None if there is none): a pid reused later differs."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
