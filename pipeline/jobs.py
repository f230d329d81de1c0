"""Batch jobs on a running Ray cluster through the Ray Jobs API: submit, status, logs, stop.

A submitted job runs the same command as the CLI, on the cluster::

    python -m pipeline.cli run <config, relative to the project> --run-id <id> --date <date> \
        [--set ...] --set run.ray_address=auto

in a copy of the project directory: the runtime env's ``working_dir`` is the project directory,
uploaded by Ray minus :data:`UPLOAD_EXCLUDES` (and whatever ``.gitignore`` / ``.rayignore`` leave
out, as Ray always does). ``--date`` is pinned to the date the config was validated with, and
``run.ray_address=auto`` makes the driver attach to the cluster it runs on.

Run ids
    The Ray submission id IS the run id. Submitting a run id the cluster already knows, whatever
    its status, starts nothing and reports that job (``created=False``); a submit that loses a race
    for the same id does the same. ``status`` / ``logs`` / ``stop`` take the run id.

The config file
    must lie inside the project directory and be part of the upload (not under ``out/``,
    ``.fixtures/``, ``data/`` other than ``data/sample/``, nor git-ignored): the job reads it from
    the uploaded copy. Anything else raises :class:`ConfigError` naming ``config`` before the
    cluster is contacted. Keep job configs in ``jobs/`` or ``configs/``. Relative paths in the
    config resolve on the cluster against the uploaded copy (``data/sample/*.jsonl`` works), so a
    relative local ``output.uri`` or ``run.checkpoint_uri`` is refused: it would be written into
    Ray's cached package directory and lost.

Secrets
    Nothing resolved from the environment leaves this machine. The config is validated here (with
    the same ``--set``, run id and date) but uploaded as written, so ``${VAR}`` references are
    resolved by the CLI on the cluster from the cluster's environment; variables missing here are
    assumed to be set there. The runtime env carries no ``env_vars``; the metadata holds only the
    run id, task, date and config file name; ``--set`` overrides go into the entrypoint verbatim
    (shell-quoted, so ``${VAR}`` reaches the config loader, not the shell), and a literal value for
    anything under ``storage_options`` is refused there. Literal credentials written in the config
    file itself are uploaded with it: a warning names their paths (never their values).

Addresses
    ``address`` is the dashboard URL (``http://head:8265``) or any address Ray's job SDK accepts;
    None means ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``. An explicit address wins over ``$RAY_ADDRESS`` /
    ``$RAY_API_SERVER_ADDRESS`` (the SDK alone would let the environment win). The SDK is
    imported lazily; this module never calls ``ray.init``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, JobConfig, load_job_config

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent.parent
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# gitwildmatch patterns, relative to the project directory, that the upload leaves out. Order
# matters: the last matching pattern wins, so data/sample/ is kept while the rest of data/ is not.
UPLOAD_EXCLUDES: tuple[str, ...] = (
    "/.venv",
    "/.git",
    "/.fixtures",
    "/out",
    "/build",
    "/dist",
    "/.pytest_cache",
    "/.ruff_cache",
    "__pycache__",
    "*.egg-info",
    "/data/*",
    "!/data/sample",
)
# Appended to every entrypoint: the driver must attach to the cluster the job runs on.
CLUSTER_OVERRIDE = "run.ray_address=auto"
_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_MISSING_ENV = re.compile(r"environment variable ([A-Za-z_][A-Za-z0-9_]*) is not set")
_CREDENTIAL_KEY = re.compile(r"key|secret|token|password|passwd|credential|auth", re.IGNORECASE)
_ENV_LOCK = threading.Lock()
_upload_log = logging.getLogger(f"{__name__}.upload")
_upload_log.setLevel(logging.WARNING)  # Ray's ignore-file helpers log every ignored file at INFO


class JobsError(RuntimeError):
    """The cluster could not be reached or refused a request."""


class UnknownRunError(JobsError, LookupError):
    """No job with this run id (submission id) on the cluster."""

    def __init__(self, run_id: str, address: str) -> None:
        self.run_id = run_id
        self.address = address
        super().__init__(f"no job with run id {run_id!r} on the Ray cluster at {address}")


@dataclass(frozen=True)
class SubmitResult:
    run_id: str
    submission_id: str  # == run_id
    created: bool  # False: a job with this run id already existed and nothing was submitted
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED


# Public API -------------------------------------------------------------------------------------


def submit(
    config_path: str | Path,
    *,
    address: str | None = None,
    overrides: Sequence[str] = (),
    run_id: str | None = None,
    date: str | None = None,
    wait: bool = False,
    timeout_s: float | None = None,
    project_dir: Path = PROJECT_DIR,
    poll_interval_s: float = 1.0,
) -> SubmitResult:
    """Validates ``config_path`` here, then submits it as run ``run_id`` (default: a new one).

    Raises :class:`ConfigError` for a bad config, a config outside the upload, a literal secret in
    ``overrides`` or a relative output path, before contacting the cluster. A run id the cluster
    already has is not submitted again (``created=False``). With ``wait``, polls until the job
    ends or ``timeout_s`` passes and reports the last status seen (not terminal on a timeout).
    """
    project_dir = Path(project_dir).resolve()
    config = validate(config_path, overrides=overrides, run_id=run_id, date=date)
    relative = _config_in_upload(Path(config_path), project_dir)
    _check_overrides(overrides)
    _check_cluster_paths(config)
    if literal := literal_credentials(config):
        log.warning(
            "%s has literal values at %s: they are uploaded to the cluster with the config; "
            "use ${VAR} references resolved from the cluster's environment",
            relative,
            ", ".join(literal),
        )
    run = config.run_id
    assert run is not None  # load_job_config renders the config
    entrypoint = build_entrypoint(relative, config, overrides)
    metadata = {"run_id": run, "task": config.task, "date": str(config.date), "config": relative}
    address = resolve_address(address)
    client = _client(address)

    created = False
    existing = _find(client, run)
    if existing is None:
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=run,
                runtime_env=runtime_env(project_dir),
                metadata=metadata,
            )
            created = True
        except Exception as exc:  # lost a race for the id, or a real failure
            existing = _find(client, run)
            if existing is None:
                raise JobsError(f"submitting run {run} to {address} failed: {exc}") from exc
    if created:
        log.info("submitted run %s to %s: %s", run, address, entrypoint)
    else:
        log.info("run %s already exists on %s (%s): not submitted again", run, address, existing)
    state = _wait(client, run, address, timeout_s, poll_interval_s) if wait else None
    if state is None:
        state = existing if existing is not None else _status(client, run, address)
    return SubmitResult(run_id=run, submission_id=run, created=created, status=state)


def status(run_id: str, *, address: str | None = None) -> str:
    """The job's status: PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED."""
    address = resolve_address(address)
    return _status(_client(address), run_id, address)


def logs(run_id: str, *, address: str | None = None) -> str:
    """Everything the job's driver (the CLI on the cluster) wrote to stdout and stderr so far."""
    address = resolve_address(address)
    client = _client(address)
    with _translate(run_id, address):
        return str(client.get_job_logs(run_id))


def stop(
    run_id: str,
    *,
    address: str | None = None,
    wait: bool = True,
    timeout_s: float | None = 60.0,
    poll_interval_s: float = 0.5,
) -> str:
    """Asks the job to stop (a no-op for a finished one); returns its final status with ``wait``,
    else the status right after the request."""
    address = resolve_address(address)
    client = _client(address)
    with _translate(run_id, address):
        client.stop_job(run_id)
    if wait:
        return _wait(client, run_id, address, timeout_s, poll_interval_s)
    return _status(client, run_id, address)


# Pieces (public for the CLI and the tests) ------------------------------------------------------


def validate(
    config_path: str | Path,
    *,
    overrides: Sequence[str] = (),
    run_id: str | None = None,
    date: str | None = None,
) -> JobConfig:
    """``load_job_config`` as the job will run it; ``${VAR}``s unset here are left to the cluster.

    No preflight here: inputs and checkpoints are checked by ``run`` on the cluster, which may
    reach storage this machine cannot (a failed preflight there ends the job as FAILED, exit 2,
    with the reason in its logs). Only variables that are unset and have no default are filled in, with a placeholder, for the
    local check; nothing resolved here is sent anywhere.
    """
    try:
        return load_job_config(config_path, overrides=overrides, run_id=run_id, date=date)
    except ConfigError as exc:
        missing = [_MISSING_ENV.fullmatch(message) for _, message in exc.errors]
        if not missing or not all(missing):
            raise
        names = sorted({m.group(1) for m in missing if m is not None})
    log.info("not set here, left to the cluster's environment: %s", ", ".join(names))
    environ = {**os.environ, **{name: f"cluster-env-{name}" for name in names}}
    return load_job_config(
        config_path, overrides=overrides, run_id=run_id, date=date, environ=environ
    )


def build_entrypoint(config_relpath: str, config: JobConfig, overrides: Sequence[str] = ()) -> str:
    """The shell command the job runs: the CLI's ``run`` with this run id, date and overrides."""
    argv = ["python", "-m", "pipeline.cli", "run", config_relpath]
    argv += ["--run-id", str(config.run_id), "--date", str(config.date)]
    for item in (*overrides, CLUSTER_OVERRIDE):
        argv += ["--set", item]
    return shlex.join(argv)


def runtime_env(project_dir: Path = PROJECT_DIR) -> dict[str, Any]:
    """The job's runtime env: the project code as ``working_dir``; no env vars, no secrets."""
    return {"working_dir": str(Path(project_dir).resolve()), "excludes": list(UPLOAD_EXCLUDES)}


def resolve_address(address: str | None) -> str:
    """``address``, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS`` (Ray's own order); a
    :class:`ConfigError` naming ``--address`` if none is set."""
    found = address or next((os.environ[n] for n in _ADDRESS_VARIABLES if os.environ.get(n)), None)
    if not found:
        raise ConfigError.at(
            "--address",
            "no Ray cluster given: pass --address http://<head>:8265 or set RAY_ADDRESS",
        )
    return found


def literal_credentials(config: JobConfig) -> list[str]:
    """Paths under ``storage_options`` whose key looks like a credential and whose value was
    written literally (not a ``${VAR}`` reference)."""
    found: list[str] = []

    def walk(node: Any, path: tuple[str, ...], under: bool) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*path, str(key)), under or key == "storage_options")
        elif under and isinstance(node, str) and node and _CREDENTIAL_KEY.search(path[-1]):
            dotted = ".".join(path)
            if dotted not in config.interpolated_paths:
                found.append(dotted)

    walk(config.model_dump(mode="json"), (), False)
    return found


# Checks before submitting -----------------------------------------------------------------------


def _config_in_upload(config_path: Path, project_dir: Path) -> str:
    """The config's path relative to the project directory, if the upload will carry it."""
    path = config_path.resolve()
    try:
        relative = path.relative_to(project_dir)
    except ValueError:
        raise ConfigError.at(
            "config",
            f"{config_path} is outside the project directory {project_dir}: the job reads its "
            "config from the uploaded project, so put it there (e.g. jobs/)",
        ) from None
    if _left_out_of_upload(project_dir, path):
        raise ConfigError.at(
            "config",
            f"{relative.as_posix()} would not be uploaded to the cluster (excluded: "
            f"{', '.join(UPLOAD_EXCLUDES)}, or by .gitignore/.rayignore): put it in jobs/ or "
            "configs/",
        )
    return relative.as_posix()


def _left_out_of_upload(project_dir: Path, path: Path) -> bool:
    """Whether Ray's working_dir upload of ``project_dir`` skips ``path``: walks the directories
    from the project down to the file as Ray does (its excludes plus each directory's ignore
    files). Best effort: False when this Ray's packaging helpers differ."""
    try:
        from ray._private.runtime_env import packaging

        include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
        checks = [packaging._get_excludes(project_dir, list(UPLOAD_EXCLUDES))]
        parts = path.relative_to(project_dir).parts
        for depth in range(len(parts) + 1):
            node = project_dir.joinpath(*parts[:depth])
            if node.is_dir():
                checks += packaging.get_excludes_from_ignore_files(
                    node, include_gitignore=include_gitignore, logger=_upload_log
                )
            if any(check(node) for check in checks):
                return True
    except (ImportError, AttributeError, TypeError) as exc:
        log.debug("cannot check the upload for %s: %s", path, exc)
    return False


def _check_overrides(overrides: Sequence[str]) -> None:
    """``--set`` items end up in the job's entrypoint, which the cluster shows to anyone who can
    list jobs: values under ``storage_options`` must be ``${VAR}`` references."""
    errors: list[tuple[str, str]] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "storage_options" not in key.strip().split("."):
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if any("${" not in leaf for leaf in _string_leaves(value)):
            errors.append(
                (
                    f"--set {key.strip()}",
                    "a literal value under storage_options would be stored in the job's "
                    "entrypoint on the cluster; write a ${VAR} reference (resolved from the "
                    "cluster's environment) in the config or in the --set value",
                )
            )
    if errors:
        raise ConfigError(errors)


def _string_leaves(value: Any) -> Iterator[str]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _string_leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _string_leaves(item)
    elif isinstance(value, str):
        yield value


def _check_cluster_paths(config: JobConfig) -> None:
    errors = [
        (
            path,
            f"{uri!r} is a relative local path: on the cluster it would be written inside the "
            "job's temporary copy of the project and lost; use an absolute path or a URI",
        )
        for path, uri in (
            ("output.uri", config.output.uri),
            ("run.checkpoint_uri", config.run.checkpoint_uri),
        )
        if uri is not None and "://" not in uri and not uri.startswith("/")
    ]
    if errors:
        raise ConfigError(errors)


# The cluster ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _address_from_argument() -> Iterator[None]:
    """Hides $RAY_ADDRESS / $RAY_API_SERVER_ADDRESS while the SDK resolves the address, which
    it otherwise takes from the environment over the argument."""
    with _ENV_LOCK:
        saved = {name: os.environ.pop(name) for name in _ADDRESS_VARIABLES if name in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        with _address_from_argument():
            return JobSubmissionClient(address)
    except Exception as exc:
        raise JobsError(f"cannot reach the Ray Jobs API at {address}: {exc}") from exc


def _is_not_found(exc: Exception) -> bool:
    text = str(exc)
    return "status code 404" in text or "does not exist" in text


@contextlib.contextmanager
def _translate(run_id: str, address: str) -> Iterator[None]:
    """SDK errors as :class:`UnknownRunError` (404) or :class:`JobsError`."""
    try:
        yield
    except JobsError:
        raise
    except Exception as exc:
        if _is_not_found(exc):
            raise UnknownRunError(run_id, address) from None
        raise JobsError(f"run {run_id} on {address}: {exc}") from exc


def _status_value(info: Any) -> str:
    state = info.status
    return str(getattr(state, "value", state))


def _status(client: Any, run_id: str, address: str) -> str:
    with _translate(run_id, address):
        return _status_value(client.get_job_info(run_id))


def _find(client: Any, run_id: str) -> str | None:
    """The status of the job with submission id ``run_id``, or None if there is none."""
    try:
        return _status_value(client.get_job_info(run_id))
    except Exception as exc:
        if _is_not_found(exc):
            return None
        raise JobsError(f"looking up run {run_id}: {exc}") from exc


def _wait(
    client: Any, run_id: str, address: str, timeout_s: float | None, poll_interval_s: float
) -> str:
    """Polls until a terminal status or ``timeout_s``; returns the last status seen."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state = _status(client, run_id, address)
        if state in TERMINAL_STATUSES:
            return state
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return state
            time.sleep(min(poll_interval_s, left))
        else:
            time.sleep(poll_interval_s)
