"""Batch jobs on a running Ray cluster through the Ray Jobs API: submit, status, logs, stop.

A submitted job runs the same command as the CLI, on the cluster::

    python -m pipeline.cli run <config, relative to the project> --run-id <id> --date <date> \
        [--set ...] --set run.ray_address=auto

in a copy of the project directory: the runtime env's ``working_dir`` is the project directory,
uploaded by Ray minus :data:`UPLOAD_EXCLUDES` (and whatever ``.gitignore`` / ``.rayignore`` leave
out, as Ray always does). ``--date`` is pinned to the date the config was validated with, and
``run.ray_address=auto`` makes the driver attach to the cluster it runs on.

Run ids and attempts
    A run is submitted as one or more attempts: the first one's Ray submission id is the run id,
    later ones add a suffix (``<run id>--a2``, ``--a3``, ...; :func:`submission_id`); every attempt
    runs the CLI with the same ``--run-id``, so a new attempt resumes the run. Submitting a run id
    whose latest attempt FAILED or was STOPPED starts the next attempt; one that is PENDING,
    RUNNING or SUCCEEDED starts nothing and reports that job (``created=False``); a submit that
    loses a race for the same submission id does the same. An attempt is found by listing the
    cluster's jobs: its submission id, and (after the first) ``metadata["run_id"]`` naming the run.
    ``status`` / ``logs`` / ``stop`` take the run id and act on its latest attempt.

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
    (shell-quoted, so ``${VAR}`` reaches the config loader, not the shell), so a ``--set`` item is
    refused (before anything else is checked; the error shows the item masked) when

    - it sets anything under ``storage_options`` to something other than a pure ``${VAR}``
      reference (no default, nothing around it; ``null`` is allowed);
    - it holds a ``${VAR:-default}`` with a non-empty default that may be a credential: the item's
      key or ``VAR`` is named like one (key, secret, token, password, passwd, credential, auth),
      or the default looks like one (:func:`looks_like_credential`: a known token prefix such as
      ``AKIA`` / ``ghp_`` / ``hf_`` / ``sk-``, a PEM block, or a run of 24+ letters, digits and
      ``+=_-`` mixing upper case, lower case and digits);
    - it holds a URI with userinfo (``user:password@``) or a query string / fragment (signed
      URLs), defaults included: pass such a URI whole as ``${VAR}``.

    Literal credentials written in the config file itself (credential-named keys under
    ``storage_options``, URIs with userinfo or a query string) are uploaded with it: a warning
    names their paths (never their values).

Authentication
    Ray turns token authentication on by default for new clusters. A Jobs API call refused for
    a missing or wrong token raises :class:`JobsAuthError`, whose message says what to set
    (``RAY_AUTH_MODE=token`` and the token in ``RAY_AUTH_TOKEN``, a file named by
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``). Addresses and SDK messages in errors and
    logs have their userinfo and query strings masked (:mod:`pipeline.secrets`).

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, JobConfig, load_job_config, parse_override_value
from pipeline.secrets import MASK, mask_text, mask_uri

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent.parent
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
RESUMABLE_STATUSES = frozenset({"FAILED", "STOPPED"})  # a new attempt may follow these
ATTEMPT_SUFFIX = "--a"  # <run id>--a2, --a3, ...
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
# The entrypoint's start when no --python is given: it runs in a shell whose parent is Ray's job
# supervisor, a Python process of the cluster's own environment. The interpreter of that
# environment is found from the ray/_raylet.so the supervisor has loaded (its prefix's
# bin/python: a virtualenv's, a conda env's or the system's), then python3 and python on PATH;
# the first that imports Ray and rg-batch's dependencies runs the CLI. If none does, the job
# ends at once with exit 2 and an "error:" line (status and submit --wait print it).
_NEEDED_MODULES = "ray, jax, flax, pyarrow, pydantic, yaml, sentencepiece"
FIND_PYTHON = (
    "found=; for py in "
    "\"$(sed -n 's#^[^/]*\\(/.*\\)/lib/python[0-9.]*/[a-z]*-packages/ray/_raylet\\.so$#\\1/bin/python#p' "
    '/proc/$PPID/maps 2>/dev/null | head -n 1)" python3 python; do '
    '[ -n "$py" ] && command -v "$py" >/dev/null 2>&1 && '
    f'"$py" -c "import {_NEEDED_MODULES}" >/dev/null 2>&1 && {{ found=$py; break; }}; done; '
    '[ -n "$found" ] || { echo "error: no Python on this node imports '
    f"{_NEEDED_MODULES}"
    " (tried the interpreter Ray runs under, python3 and python): install rg-batch there "
    "(pip install -e . in the environment that runs ray start) or pass --python "
    '/path/to/python to rgbatch submit" >&2; exit 2; }; exec "$found"'
)
# Appended to every entrypoint: the driver must attach to the cluster the job runs on.
CLUSTER_OVERRIDE = "run.ray_address=auto"
_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_MISSING_ENV = re.compile(r"environment variable ([A-Za-z_][A-Za-z0-9_]*) is not set")
_CREDENTIAL_KEY = re.compile(r"key|secret|token|password|passwd|credential|auth", re.IGNORECASE)
_PURE_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")
_DEFAULT_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}")
# Prefixes of well-known token formats (AWS, Google, GitHub, GitLab, Hugging Face, OpenAI, Slack,
# npm, PyPI).
_TOKEN_PREFIXES = (
    "AKIA", "ASIA", "AIza", "ya29.", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_",
    "glpat-", "hf_", "sk-", "xoxb-", "xoxp-", "xapp-", "npm_", "pypi-",
)  # fmt: skip
_RANDOM_RUN = re.compile(r"[A-Za-z0-9+=_\-]{24,}")
_AUTH_ERROR = re.compile(
    r"Authentication (required|failed)|Token authentication is enabled|status code 40[13]\b"
)
_EXCEPTION_LINE = re.compile(
    r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)(\([\w.]*\))?(: .*)?$"
)
_ENV_LOCK = threading.Lock()
_upload_log = logging.getLogger(f"{__name__}.upload")
_upload_log.setLevel(logging.WARNING)  # Ray's ignore-file helpers log every ignored file at INFO


class JobsError(RuntimeError):
    """The cluster could not be reached or refused a request."""


class UnknownRunError(JobsError, LookupError):
    """No job with this run id on the cluster."""

    def __init__(self, run_id: str, address: str) -> None:
        self.run_id = run_id
        self.address = address
        super().__init__(f"no job with run id {run_id!r} on the Ray cluster at {mask_uri(address)}")


class JobsAuthError(JobsError):
    """The cluster refused a request for want of its authentication token; the message says
    what to set."""


@dataclass(frozen=True)
class SubmitResult:
    run_id: str
    submission_id: str  # the run id for attempt 1, else <run id>--a<attempt>
    created: bool  # False: the run's latest attempt is pending, running or succeeded: not submitted
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    attempt: int = 1
    reason: str | None = None  # FAILED / STOPPED (with wait): the error line (failure_reason)


@dataclass(frozen=True)
class RunState:
    """A run's latest attempt on the cluster, and why it ended if it failed or was stopped."""

    run_id: str
    submission_id: str
    status: str
    reason: str | None = None  # FAILED / STOPPED only (failure_reason)


@dataclass(frozen=True)
class _Attempt:
    number: int
    submission_id: str
    status: str


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
    on_progress: Callable[[str], None] | None = None,
    progress_interval_s: float = 10.0,
    python: str | None = None,
) -> SubmitResult:
    """Validates ``config_path`` here, then submits it as run ``run_id`` (default: a new one).

    Raises :class:`ConfigError` for a literal secret in ``overrides``, a bad config, a config
    outside the upload or a relative output path, before contacting the cluster. The run's first
    attempt is submitted under the run id; if its latest attempt FAILED or was STOPPED, the next
    attempt (``<run id>--a<n>``) resumes it; otherwise nothing is submitted (``created=False``).
    With ``wait``, polls until the attempt ends or ``timeout_s`` passes and reports the last
    status seen (not terminal on a timeout), with the reason of a FAILED or STOPPED attempt;
    meanwhile ``on_progress`` gets each new progress line of the driver (its logs are read every
    ``progress_interval_s``). ``python`` is the cluster's interpreter for the job; by default
    the entrypoint finds it (:data:`FIND_PYTHON`).
    """
    _check_overrides(overrides)
    project_dir = Path(project_dir).resolve()
    config = validate(config_path, overrides=overrides, run_id=run_id, date=date)
    relative = _config_in_upload(Path(config_path), project_dir)
    _check_cluster_paths(config, project_dir)
    if literal := literal_credentials(config):
        log.warning(
            "%s has literal values at %s: they are uploaded to the cluster with the config; "
            "use ${VAR} references resolved from the cluster's environment",
            relative,
            ", ".join(literal),
        )
    run = config.run_id
    assert run is not None  # load_job_config renders the config
    entrypoint = build_entrypoint(relative, config, overrides, python)
    metadata = {"run_id": run, "task": config.task, "date": str(config.date), "config": relative}
    address = resolve_address(address)
    client = _client(address)

    latest = _latest(client, run, address)
    created = False
    if latest is None or latest.status in RESUMABLE_STATUSES:
        number = 1 if latest is None else latest.number + 1
        job_id = submission_id(run, number)
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env=runtime_env(project_dir),
                metadata=metadata,
            )
            created = True
            latest = _Attempt(number, job_id, "PENDING")
        except Exception as exc:  # lost a race for the id, or a real failure
            if _is_auth_error(exc):
                raise _auth_error(address, exc) from exc
            raced = _latest(client, run, address)
            if raced is None or raced.submission_id != job_id:
                raise JobsError(
                    mask_text(f"submitting run {run} as {job_id} to {address} failed: {exc}")
                ) from exc
            latest = raced
    if created:
        log.info(
            "submitted run %s as %s to %s: %s",
            run,
            latest.submission_id,
            mask_uri(address),
            mask_text(entrypoint),
        )
    else:
        log.info(
            "run %s is on %s as %s (%s): not submitted again",
            run,
            mask_uri(address),
            latest.submission_id,
            latest.status,
        )
    job_id = latest.submission_id
    watch = None
    if on_progress is not None:
        watch = _ProgressWatch(client, job_id, on_progress, progress_interval_s)
    if wait:
        state = _wait(client, run, job_id, address, timeout_s, poll_interval_s, watch)
    elif created:
        state = _status(client, run, job_id, address)
    else:
        state = latest.status
    reason = None
    if wait and state in RESUMABLE_STATUSES:
        reason = _reason(client, run, _Attempt(latest.number, job_id, state), address)
    return SubmitResult(
        run_id=run,
        submission_id=job_id,
        created=created,
        status=state,
        attempt=latest.number,
        reason=reason,
    )


def status(run_id: str, *, address: str | None = None) -> str:
    """The status of the run's latest attempt: PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED."""
    address = resolve_address(address)
    return _require_latest(_client(address), run_id, address).status


def describe(run_id: str, *, address: str | None = None) -> RunState:
    """The run's latest attempt: its status and, if it FAILED or was STOPPED, the reason."""
    address = resolve_address(address)
    client = _client(address)
    latest = _require_latest(client, run_id, address)
    return RunState(
        run_id, latest.submission_id, latest.status, _reason(client, run_id, latest, address)
    )


def failure_reason(logs: str, message: str | None = None) -> str | None:
    """The line that says why a driver failed, from its logs: the CLI's last ``error: ...`` line,
    else the last exception line of a traceback (``ValueError: ...``), else the first line of
    Ray's job message (e.g. an entrypoint that could not start). None if there is none."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return mask_text(line[len("error: ") :])
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return mask_text(line)
    first = (message or "").strip().splitlines()
    return mask_text(first[0]) if first else None


def progress_lines(logs: str) -> list[str]:
    """The driver's progress lines (``progress: ...``) in its logs, in order."""
    marker = "rgbatch.progress: progress: "
    return [line.split(marker, 1)[1] for line in logs.splitlines() if marker in line]


def logs(run_id: str, *, address: str | None = None) -> str:
    """Everything the driver of the run's latest attempt (the CLI on the cluster) wrote to
    stdout and stderr so far."""
    address = resolve_address(address)
    client = _client(address)
    latest = _require_latest(client, run_id, address)
    with _translate(run_id, address):
        return str(client.get_job_logs(latest.submission_id))


def stop(
    run_id: str,
    *,
    address: str | None = None,
    wait: bool = True,
    timeout_s: float | None = 60.0,
    poll_interval_s: float = 0.5,
) -> str:
    """Asks the run's latest attempt to stop (a no-op for a finished one); returns its final
    status with ``wait``, else the status right after the request."""
    address = resolve_address(address)
    client = _client(address)
    job_id = _require_latest(client, run_id, address).submission_id
    with _translate(run_id, address):
        client.stop_job(job_id)
    if wait:
        return _wait(client, run_id, job_id, address, timeout_s, poll_interval_s)
    return _status(client, run_id, job_id, address)


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


def submission_id(run_id: str, attempt: int) -> str:
    """The Ray submission id of a run's attempt: the run id, then ``<run id>--a<attempt>``."""
    return run_id if attempt == 1 else f"{run_id}{ATTEMPT_SUFFIX}{attempt}"


def build_entrypoint(
    config_relpath: str,
    config: JobConfig,
    overrides: Sequence[str] = (),
    python: str | None = None,
) -> str:
    """The shell command the job runs: the CLI's ``run`` with this run id, date and overrides,
    under ``python`` if given, else under the interpreter found on the cluster
    (:data:`FIND_PYTHON`)."""
    argv = ["-m", "pipeline.cli", "run", config_relpath]
    argv += ["--run-id", str(config.run_id), "--date", str(config.date)]
    for item in (*overrides, CLUSTER_OVERRIDE):
        argv += ["--set", item]
    if python is not None:
        return shlex.join([python, *argv])
    return FIND_PYTHON + " " + shlex.join(argv)


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
    """Paths of values written literally (not from a ``${VAR}`` reference) that may hold a
    secret: under ``storage_options`` with a key that looks like a credential, or anywhere a
    string holding a URI with userinfo or a query string."""
    found: list[str] = []

    def walk(node: Any, path: tuple[str, ...], under: bool) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*path, str(key)), under or key == "storage_options")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, (*path, str(i)), under)
        elif isinstance(node, str) and node:
            dotted = ".".join(path)
            named = under and _CREDENTIAL_KEY.search(path[-1])
            if (named or mask_text(node) != node) and dotted not in config.interpolated_paths:
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


def looks_like_credential(value: str) -> bool:
    """Whether ``value`` looks like a secret: a word starting with a known token prefix
    (``AKIA``, ``ghp_``, ``hf_``, ``sk-``, ...; 16+ characters), a PEM block, or a run of 24+
    characters from letters, digits and ``+=_-`` mixing upper case, lower case and digits."""
    if "-----BEGIN" in value:
        return True
    words = re.split(r"[\s/:@?&#,;'\"()\[\]{}]+", value)
    if any(len(w) >= 16 and w.startswith(_TOKEN_PREFIXES) for w in words):
        return True
    return any(
        re.search(r"[A-Z]", run) and re.search(r"[a-z]", run) and re.search(r"[0-9]", run)
        for run in _RANDOM_RUN.findall(value)
    )


def _check_overrides(overrides: Sequence[str]) -> None:
    """``--set`` items end up in the job's entrypoint, which the cluster shows to anyone who can
    list jobs: refuses literal storage options, credential-like ``${VAR:-default}`` defaults and
    URIs with userinfo or a query string (see the module docstring). Errors show items masked."""
    errors: list[tuple[str, str]] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            continue  # malformed: load_job_config names it
        key = key.strip()
        parts = key.split(".")
        shown = mask_text(_DEFAULT_REFERENCE.sub(_masked_default, raw))
        if "storage_options" in parts and not _pure_references(raw, f"--set {key}"):
            errors.append(
                (
                    f"--set {key}={MASK}",
                    "a literal value under storage_options would be stored in the job's "
                    "entrypoint on the cluster; write a ${VAR} reference (no default, resolved "
                    "from the cluster's environment) in the config or in the --set value",
                )
            )
        elif any(_credential_default(parts, m) for m in _DEFAULT_REFERENCE.finditer(raw)):
            errors.append(
                (
                    f"--set {key}={shown}",
                    "this ${VAR:-default} has a default that may be a credential, and the "
                    "entrypoint is stored on the cluster; write ${VAR} without a default and set "
                    "VAR in the cluster's environment",
                )
            )
        elif mask_text(raw) != raw:
            errors.append(
                (
                    f"--set {key}={shown}",
                    "a URI with userinfo (user:password@) or a query string (a signed URL) "
                    "would be stored in the job's entrypoint on the cluster; pass the whole URI "
                    "as a ${VAR} reference set in the cluster's environment",
                )
            )
    if errors:
        raise ConfigError(errors)


def _pure_references(raw: str, where: str) -> bool:
    value = parse_override_value(raw, where)  # a value too large to expand is refused here
    return all(
        leaf is None or (isinstance(leaf, str) and _PURE_REFERENCE.fullmatch(leaf))
        for leaf in _leaves(value)
    )


def _credential_default(key_parts: Sequence[str], match: re.Match[str]) -> bool:
    name, default = match.groups()
    if not default:
        return False
    named = any(_CREDENTIAL_KEY.search(part) for part in (*key_parts, name))
    return bool(named or looks_like_credential(default))


def _masked_default(match: re.Match[str]) -> str:
    name, default = match.groups()
    return f"${{{name}:-{MASK}}}" if default else match.group(0)


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _check_cluster_paths(config: JobConfig, project_dir: Path | None = None) -> None:
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
    errors += _local_read_paths(config, project_dir)
    if errors:
        raise ConfigError(errors)


def _local_read_paths(config: JobConfig, project_dir: Path | None) -> list[tuple[str, str]]:
    """The paths the job reads that the cluster will not find: relative ones left out of the
    upload (``.fixtures/``, ``out/``, git-ignored files), and absolute ones inside the project
    directory (the cluster reads its uploaded copy, never this working tree)."""
    errors: list[tuple[str, str]] = []
    reads = (
        ("input.uri", config.input.uri),
        ("model.checkpoint", config.model.checkpoint),
        ("toxicity.checkpoint", config.toxicity.checkpoint),
    )
    fix = (
        "put it where every node of the cluster reads it (an absolute path on shared storage, "
        "or a URI such as s3://... or gs://...) and pass that, e.g. --set {path}=s3://bucket/..."
    )
    for path, uri in reads:
        if uri is None or "://" in uri:
            continue
        local = Path(uri)
        if not local.is_absolute():
            if project_dir is None or not _left_out_of_upload(
                project_dir, project_dir / _base(uri)
            ):
                continue  # inside the upload: the cluster reads its copy (data/sample/*.jsonl)
            errors.append(
                (
                    path,
                    f"{uri!r} is a relative path that the upload leaves out (excluded: "
                    f"{', '.join(UPLOAD_EXCLUDES)}, or by .gitignore/.rayignore), so the job "
                    "would not find it on the cluster; " + fix.format(path=path),
                )
            )
        elif project_dir is not None and local.resolve().is_relative_to(project_dir):
            errors.append(
                (
                    path,
                    f"{uri!r} is inside the project directory {project_dir}, which the cluster "
                    "only sees as its uploaded copy; use a path relative to the project if it "
                    "is uploaded (not under .fixtures/ or out/), or " + fix.format(path=path),
                )
            )
    return errors


def _base(uri: str) -> str:
    """The directory part of a path before its first glob character."""
    head = re.split(r"[*?\[]", uri, maxsplit=1)[0]
    return head if head.endswith("/") or head == uri else head.rsplit("/", 1)[0] or "."


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
        if _is_auth_error(exc):
            raise _auth_error(address, exc) from exc
        raise JobsError(mask_text(f"cannot reach the Ray Jobs API at {address}: {exc}")) from exc


def _is_not_found(exc: Exception) -> bool:
    text = str(exc)
    return "status code 404" in text or "does not exist" in text


def _is_auth_error(exc: Exception) -> bool:
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # an older Ray: no token authentication
        AuthenticationError = ()
    return isinstance(exc, AuthenticationError) or bool(_AUTH_ERROR.search(str(exc)))


def _auth_error(address: str, exc: Exception) -> JobsAuthError:
    """What the cluster said (its first line), and what to set."""
    said = str(getattr(exc, "message", None) or exc).strip().splitlines()[0]
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        what = "RAY_AUTH_MODE=token is set, but the token was not found or is not this cluster's"
    else:
        what = "the cluster uses token authentication: set RAY_AUTH_MODE=token"
    hint = (
        f"hint: {what}; the token is read from RAY_AUTH_TOKEN, else the file named by "
        "RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (on the head node, `ray get-auth-token` "
        "prints the cluster's token)"
    )
    return JobsAuthError(
        mask_text(f"the Ray cluster at {address} refused the request: {said}\n{hint}")
    )


@contextlib.contextmanager
def _translate(run_id: str, address: str) -> Iterator[None]:
    """SDK errors as :class:`UnknownRunError` (404), :class:`JobsAuthError` or
    :class:`JobsError`, their addresses and URIs masked."""
    try:
        yield
    except JobsError:
        raise
    except Exception as exc:
        if _is_not_found(exc):
            raise UnknownRunError(run_id, address) from None
        if _is_auth_error(exc):
            raise _auth_error(address, exc) from exc
        raise JobsError(mask_text(f"run {run_id} on {address}: {exc}")) from exc


def _status_value(info: Any) -> str:
    state = info.status
    return str(getattr(state, "value", state))


def _status(client: Any, run_id: str, job_id: str, address: str) -> str:
    with _translate(run_id, address):
        return _status_value(client.get_job_info(job_id))


def _attempt_number(run_id: str, job: Any) -> int | None:
    """Which attempt of ``run_id`` the job is, or None if it is not one."""
    job_id = getattr(job, "submission_id", None)
    if job_id == run_id:
        return 1
    prefix = f"{run_id}{ATTEMPT_SUFFIX}"
    if not job_id or not job_id.startswith(prefix):
        return None
    number = job_id[len(prefix) :]
    if not (number.isdigit() and not number.startswith("0") and int(number) >= 2):
        return None
    metadata = getattr(job, "metadata", None) or {}
    return int(number) if metadata.get("run_id") == run_id else None


def _latest(client: Any, run_id: str, address: str) -> _Attempt | None:
    """The run's attempt with the highest number, from the cluster's job list; None if none."""
    with _translate(run_id, address):
        listed = client.list_jobs()
    attempts = [
        _Attempt(number, job.submission_id, _status_value(job))
        for job in listed
        if (number := _attempt_number(run_id, job)) is not None
    ]
    return max(attempts, key=lambda a: a.number, default=None)


def _require_latest(client: Any, run_id: str, address: str) -> _Attempt:
    latest = _latest(client, run_id, address)
    if latest is None:
        raise UnknownRunError(run_id, address)
    return latest


class _ProgressWatch:
    """Passes each new progress line of a job's driver to ``emit``, reading the logs at most
    every ``interval_s`` (best effort: a failed read is skipped)."""

    def __init__(
        self, client: Any, job_id: str, emit: Callable[[str], None], interval_s: float
    ) -> None:
        self.client, self.job_id, self.emit, self.interval_s = client, job_id, emit, interval_s
        self._seen = 0
        self._last_read = -float("inf")

    def poll(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_read < self.interval_s:
            return
        self._last_read = now
        try:
            lines = progress_lines(str(self.client.get_job_logs(self.job_id)))
        except Exception as exc:
            log.debug("cannot read the logs of %s: %s", self.job_id, exc)
            return
        new, self._seen = lines[self._seen :], len(lines)
        for line in new[-1:]:  # the newest only: one line per read
            self.emit(mask_text(line))


def _reason(client: Any, run_id: str, attempt: _Attempt, address: str) -> str | None:
    """Why a FAILED or STOPPED attempt ended (failure_reason of its logs); None otherwise."""
    if attempt.status not in RESUMABLE_STATUSES:
        return None
    with _translate(run_id, address):
        info = client.get_job_info(attempt.submission_id)
        try:
            text = str(client.get_job_logs(attempt.submission_id))
        except Exception:  # the logs may be gone with the node; the message is still there
            text = ""
    reason = failure_reason(text, getattr(info, "message", None))
    if attempt.status == "STOPPED" and not text.strip():
        return reason or "stopped"
    return reason


def _wait(
    client: Any,
    run_id: str,
    job_id: str,
    address: str,
    timeout_s: float | None,
    poll_interval_s: float,
    watch: _ProgressWatch | None = None,
) -> str:
    """Polls job ``job_id`` until a terminal status or ``timeout_s``; returns the last status.
    ``watch`` is polled alongside (the driver's progress lines)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state = _status(client, run_id, job_id, address)
        if watch is not None:
            watch.poll(final=state in TERMINAL_STATUSES)
        if state in TERMINAL_STATUSES:
            return state
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return state
            time.sleep(min(poll_interval_s, left))
        else:
            time.sleep(poll_interval_s)
