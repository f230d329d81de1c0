"""Ray Jobs submission (pipeline.jobs): local checks without a cluster, then the real thing against
a Ray head this module starts (``ray start --head --block``) and shuts down by its own pids.

The cluster tests submit from a small copy of the project (pipeline/ + model/ + a jobs/ dir with the
config) in a temp dir, so nothing is written into the repository; inputs, outputs and the tiny
model live in absolute temp paths.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fsspec
import psutil
import pytest
import yaml
from pipeline_helpers import build_fixtures, corpus_rows, job_yaml, read_output, write_corpus

from pipeline import columns as S
from pipeline import jobs
from pipeline.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
LOCAL = fsspec.filesystem("file")
FAKE_FIXTURES = {"checkpoint": "/nowhere/tiny-it", "detoxify": "/nowhere/detox.ckpt"}
DEAD_ADDRESS = "http://127.0.0.1:9"  # nothing listens there


def make_project(root: Path) -> Path:
    """A minimal project: the code the job imports, and a jobs/ dir for configs."""
    project = root / "project"
    for name in ("pipeline", "model"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "jobs").mkdir()
    return project


def write_config(project: Path, text: str, name: str = "job.yaml") -> Path:
    path = project / "jobs" / name
    path.write_text(text)
    return path


# Fakes for the checks that must not (or need not) reach a cluster ------------------------------


class NoCluster(Exception):
    """Raised by the patched SDK client: the code under test tried to contact a cluster."""


@contextlib.contextmanager
def reaches_cluster() -> Iterator[None]:
    """Asserts that the block got past every local check to the (refused) cluster client."""
    with pytest.raises(jobs.JobsError) as info:
        yield
    assert isinstance(info.value.__cause__, NoCluster), info.value


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.job_submission

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise NoCluster(args)

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", refuse)


class FakeClient:
    """Records submissions; get_job_info answers 404 until a job with that id was 'submitted'.
    ``known`` maps submission ids to statuses (a job put there by a test has the metadata a
    submission by pipeline.jobs would have: its run id is the id without an attempt suffix)."""

    def __init__(self, address: str, *, race: bool = False) -> None:
        self.address = address
        self.environ_seen = {name: os.environ.get(name) for name in jobs._ADDRESS_VARIABLES}
        self.submitted: list[dict[str, Any]] = []
        self.known: dict[str, str] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.stopped: list[str] = []
        self.race = race

    def _metadata(self, job_id: str) -> dict[str, str]:
        return self.metadata.get(job_id, {"run_id": job_id.split("--a")[0]})

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        if job_id not in self.known:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return SimpleNamespace(
            submission_id=job_id, status=self.known[job_id], metadata=self._metadata(job_id)
        )

    def list_jobs(self) -> list[SimpleNamespace]:
        return [self.get_job_info(job_id) for job_id in self.known]

    def get_job_logs(self, job_id: str) -> str:
        self.get_job_info(job_id)
        return f"logs of {job_id}\n"

    def stop_job(self, job_id: str) -> bool:
        self.get_job_info(job_id)
        self.stopped.append(job_id)
        self.known[job_id] = "STOPPED"
        return True

    def submit_job(self, **kwargs: Any) -> str:
        if kwargs["submission_id"] in self.known:
            raise RuntimeError("Request failed with status code 400: ... already exists.")
        if self.race:  # another submitter got the id between our lookup and our submit
            self.known[kwargs["submission_id"]] = "RUNNING"
            self.metadata[kwargs["submission_id"]] = kwargs["metadata"]
            raise RuntimeError("Request failed with status code 400: ... already exists.")
        self.submitted.append(kwargs)
        self.known[kwargs["submission_id"]] = "PENDING"
        self.metadata[kwargs["submission_id"]] = kwargs["metadata"]
        return kwargs["submission_id"]


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> list[FakeClient]:
    import ray.job_submission

    made: list[FakeClient] = []

    def factory(address: str) -> FakeClient:
        made.append(FakeClient(address))
        return made[-1]

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", factory)
    return made


@pytest.fixture
def project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "jobs").mkdir(parents=True)
    return project


def tiny_text(tmp_path: Path, **extra: Any) -> str:
    return job_yaml(
        FAKE_FIXTURES,
        task="summarize",
        input_uri=str(tmp_path / "in" / "*.jsonl"),
        output_uri=str(tmp_path / "out"),
        extra=extra or None,
    )


# Local checks (no cluster) ----------------------------------------------------------------------


def test_bad_config_raises_before_contacting_a_cluster(project: Path, no_cluster: None) -> None:
    bad = yaml.safe_load(tiny_text(project))
    bad["generation"]["max_new_tokens"] = 0
    bad["colour"] = "blue"
    path = write_config(project, yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as info:
        jobs.submit(path, address=DEAD_ADDRESS, project_dir=project, run_id="bad-1")
    paths = [p for p, _ in info.value.errors]
    assert "generation.max_new_tokens" in paths and "colour" in paths
    with pytest.raises(ConfigError, match=r"--set generation\.nope"):
        jobs.submit(
            write_config(project, tiny_text(project), "ok.yaml"),
            address=DEAD_ADDRESS,
            project_dir=project,
            overrides=["generation.nope"],
        )


def test_config_must_be_in_the_upload(project: Path, tmp_path: Path, no_cluster: None) -> None:
    text = tiny_text(tmp_path)
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text(text)
    with pytest.raises(ConfigError, match="outside the project directory") as info:
        jobs.submit(outside, address=DEAD_ADDRESS, project_dir=project)
    assert info.value.errors[0][0] == "config"

    (project / ".gitignore").write_text("/scratch/\n")
    for relative in ("out/a/job.yaml", ".fixtures/job.yaml", "data/big/job.yaml", "scratch/j.yaml"):
        path = project / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        with pytest.raises(ConfigError, match="would not be uploaded"):
            jobs.submit(path, address=DEAD_ADDRESS, project_dir=project)

    for relative in ("jobs/job.yaml", "data/sample/job.yaml", "configs/x/job.yaml"):
        path = project / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        with reaches_cluster():
            jobs.submit(path, address=DEAD_ADDRESS, project_dir=project)


def test_relative_outputs_and_literal_secrets_are_refused(
    project: Path, tmp_path: Path, no_cluster: None
) -> None:
    relative = tiny_text(tmp_path).replace(str(tmp_path / "out"), "out/local")
    with pytest.raises(ConfigError, match="relative local path") as info:
        jobs.submit(write_config(project, relative), address=DEAD_ADDRESS, project_dir=project)
    assert info.value.errors[0][0] == "output.uri"

    path = write_config(project, tiny_text(tmp_path), "ok.yaml")
    for item in (
        "output.storage_options.secret=hunter2",
        "input.storage_options={key: AKIA123, secret: '${S}'}",
    ):
        with pytest.raises(ConfigError, match="literal value under storage_options") as info:
            jobs.submit(path, address=DEAD_ADDRESS, project_dir=project, overrides=[item])
        assert "hunter2" not in str(info.value) and "AKIA123" not in str(info.value)
    with reaches_cluster():
        jobs.submit(
            path,
            address=DEAD_ADDRESS,
            project_dir=project,
            overrides=["output.storage_options.secret=${RGBATCH_TEST_SECRET}"],
        )


def test_no_address_is_a_usage_error(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_cluster: None
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="--address"):
        jobs.submit(write_config(project, tiny_text(tmp_path)), project_dir=project)
    with pytest.raises(ConfigError, match="--address"):
        jobs.status("some-run")


def test_entrypoint_and_runtime_env() -> None:
    config = jobs.validate(REPO / "configs" / "local.yaml", run_id="r-1", date="2026-11-27")
    overrides = ["a.b=c d", "x=${V}"]
    entrypoint = jobs.build_entrypoint("configs/local.yaml", config, overrides, python="python")
    cli = [
        *("-m", "pipeline.cli", "run", "configs/local.yaml"),
        *("--run-id", "r-1", "--date", "2026-11-27"),
        *("--set", "a.b=c d", "--set", "x=${V}", "--set", "run.ray_address=auto"),
    ]
    assert shlex.split(entrypoint) == ["python", *cli]
    found = jobs.build_entrypoint("configs/local.yaml", config, overrides)  # no --python
    assert found.startswith(jobs.FIND_PYTHON + " ")
    assert shlex.split(found[len(jobs.FIND_PYTHON) :]) == cli
    env = jobs.runtime_env()
    assert env == {"working_dir": str(REPO), "excludes": list(jobs.UPLOAD_EXCLUDES)}
    assert not jobs._left_out_of_upload(REPO, REPO / "configs" / "local.yaml")
    assert not jobs._left_out_of_upload(REPO, REPO / "data" / "sample" / "part-000.jsonl")
    assert jobs._left_out_of_upload(REPO, REPO / ".fixtures" / "tiny-it")


def test_secrets_stay_on_the_cluster(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_client: list[FakeClient]
) -> None:
    """${VAR}s go to the cluster unresolved; resolved values appear nowhere in the submission;
    variables unset here are left to the cluster."""
    monkeypatch.setenv("RGBATCH_TEST_SECRET", "s3cr3t-value")
    monkeypatch.delenv("RGBATCH_TEST_UNSET", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://from-the-environment:8265")
    text = tiny_text(
        tmp_path,
        output={
            "uri": str(tmp_path / "out") + "/${RGBATCH_TEST_UNSET}",
            "storage_options": {"secret": "${RGBATCH_TEST_SECRET}"},
        },
    )
    path = write_config(project, text)
    result = jobs.submit(
        path,
        address="http://explicit:8265",
        project_dir=project,
        overrides=["input.storage_options.token=${RGBATCH_TEST_SECRET}"],
        run_id="run-secret",
        date="2026-11-27",
    )
    assert result == jobs.SubmitResult("run-secret", "run-secret", True, "PENDING")
    (client,) = fake_client
    assert client.address == "http://explicit:8265"  # the argument wins over $RAY_ADDRESS
    assert client.environ_seen == {"RAY_API_SERVER_ADDRESS": None, "RAY_ADDRESS": None}
    assert os.environ["RAY_ADDRESS"] == "http://from-the-environment:8265"  # restored
    (submitted,) = client.submitted
    assert "s3cr3t-value" not in repr(submitted) and "cluster-env-" not in repr(submitted)
    assert submitted["submission_id"] == "run-secret"
    assert submitted["runtime_env"] == {
        "working_dir": str(project.resolve()),
        "excludes": list(jobs.UPLOAD_EXCLUDES),
    }
    assert submitted["metadata"] == {
        "run_id": "run-secret",
        "task": "summarize",
        "date": "2026-11-27",
        "config": "jobs/job.yaml",
    }
    assert "--set 'input.storage_options.token=${RGBATCH_TEST_SECRET}'" in submitted["entrypoint"]


def test_literal_credentials_in_the_file_are_named_not_shown(
    project: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    fake_client: list[FakeClient],
) -> None:
    monkeypatch.setenv("RGBATCH_TEST_SECRET", "from-env")
    options = {
        "key": "AKIA-LITERAL",
        "secret": "${RGBATCH_TEST_SECRET}",
        "endpoint_url": "http://x",
    }
    path = write_config(project, tiny_text(tmp_path, input={"storage_options": options}))
    config = jobs.validate(path)
    assert jobs.literal_credentials(config) == ["input.storage_options.key"]
    with caplog.at_level(logging.WARNING, logger="pipeline.jobs"):
        jobs.submit(path, address=DEAD_ADDRESS, project_dir=project)
    assert "input.storage_options.key" in caplog.text
    assert "AKIA-LITERAL" not in caplog.text and "from-env" not in caplog.text


def test_submit_is_idempotent_and_survives_a_race(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.job_submission

    path = write_config(project, tiny_text(tmp_path))
    clients: list[FakeClient] = []

    def factory(address: str) -> FakeClient:
        clients.append(FakeClient(address, race=True))
        return clients[-1]

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", factory)
    result = jobs.submit(path, address=DEAD_ADDRESS, project_dir=project, run_id="raced")
    assert result == jobs.SubmitResult("raced", "raced", False, "RUNNING")
    assert clients[0].submitted == []


@pytest.mark.parametrize(
    ("item", "shown"),
    [
        # under storage_options: only a pure ${VAR} reference
        ("output.storage_options.secret=${S:-hunter2}", "output.storage_options.secret=***"),
        ("output.storage_options.secret=pre-${S}", "output.storage_options.secret=***"),
        ("input.storage_options={anon: true}", "input.storage_options=***"),
        # a default that looks like a credential, anywhere
        ("toxicity.checkpoint=${DETOX:-ghp_0123456789abcdefghijKLMNOP}", "${DETOX:-***}"),
        ("model.checkpoint=${CKPT:-/m/AKIAIOSFODNN7EXAMPLE}", "${CKPT:-***}"),
        ("prompts.generate=${API_TOKEN:-hunter2} {prompt}", "${API_TOKEN:-***}"),
        ("run.auth_header=${H:-hunter2}", "${H:-***}"),
        # a URI with userinfo or a query string, anywhere (defaults included)
        ("input.uri=s3://AKIA123:hunter2@bucket/in/*.jsonl", "input.uri=s3://***@bucket/in/"),
        ("input.uri=https://host/in.jsonl?X-Amz-Signature=hunter2", "?X-Amz-Signature=***"),
        ("model.checkpoint=${C:-https://u:hunter2@host/ckpt}", "--set model.checkpoint="),
        ("input.passthrough=[a, 'https://h/x?token=hunter2']", "https://h/x?token=***"),
    ],
)
def test_set_refuses_literal_secrets_everywhere(
    project: Path, tmp_path: Path, no_cluster: None, item: str, shown: str
) -> None:
    path = write_config(project, tiny_text(tmp_path))
    with pytest.raises(ConfigError) as info:
        jobs.submit(path, address=DEAD_ADDRESS, project_dir=project, overrides=[item])
    message = str(info.value)
    assert message.startswith(f"--set {item.partition('=')[0]}")
    assert shown in message and "${" in message
    assert "hunter2" not in message and "AKIA" not in message and "ghp_" not in message


@pytest.mark.parametrize(
    "item",
    [
        "output.storage_options.secret=${RGBATCH_TEST_SECRET}",
        "input.storage_options={key: '${K}', secret: '${S}'}",
        "output.uri=${RGBATCH_TEST_OUT:-/data/out}",
        "model.checkpoint=${RGBATCH_TEST_CKPT:-/models/rg/2b-it}",
        "output.uri=s3://bucket/{date}/out",
        "generation.max_new_tokens=8",
    ],
)
def test_set_accepts_references_and_plain_values(
    project: Path, tmp_path: Path, no_cluster: None, item: str
) -> None:
    path = write_config(project, tiny_text(tmp_path))
    with reaches_cluster():
        jobs.submit(path, address=DEAD_ADDRESS, project_dir=project, overrides=[item])


def fake_cluster(monkeypatch: pytest.MonkeyPatch, known: dict[str, str]) -> FakeClient:
    """One FakeClient, shared by every JobSubmissionClient the code under test makes."""
    import ray.job_submission

    client = FakeClient(DEAD_ADDRESS)
    client.known.update(known)
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", lambda address: client)
    return client


@pytest.mark.parametrize("ended", ["FAILED", "STOPPED"])
def test_a_failed_or_stopped_run_is_resubmitted_as_a_new_attempt(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ended: str
) -> None:
    path = write_config(project, tiny_text(tmp_path))
    client = fake_cluster(monkeypatch, {"2026-11-26": ended, "other": "FAILED"})
    submit = dict(address=DEAD_ADDRESS, project_dir=project, run_id="2026-11-26")
    result = jobs.submit(path, **submit)
    assert result == jobs.SubmitResult("2026-11-26", "2026-11-26--a2", True, "PENDING", 2)
    (second,) = client.submitted
    argv = shlex.split(second["entrypoint"])
    assert argv[argv.index("--run-id") + 1] == "2026-11-26"  # same run id: the run resumes
    assert second["metadata"]["run_id"] == "2026-11-26"

    # status / logs / stop act on the latest attempt
    assert jobs.status("2026-11-26", address=DEAD_ADDRESS) == "PENDING"
    assert jobs.logs("2026-11-26", address=DEAD_ADDRESS) == "logs of 2026-11-26--a2\n"
    client.known["2026-11-26--a2"] = "RUNNING"
    again = jobs.submit(path, **submit)  # running: not duplicated
    assert again == jobs.SubmitResult("2026-11-26", "2026-11-26--a2", False, "RUNNING", 2)
    assert jobs.stop("2026-11-26", address=DEAD_ADDRESS) == "STOPPED"
    assert client.stopped == ["2026-11-26--a2"] and client.known["2026-11-26"] == ended

    third = jobs.submit(path, **submit)
    assert (third.submission_id, third.created, third.attempt) == ("2026-11-26--a3", True, 3)
    client.known["2026-11-26--a3"] = "SUCCEEDED"
    done = jobs.submit(path, **submit)  # succeeded: never again
    assert done == jobs.SubmitResult("2026-11-26", "2026-11-26--a3", False, "SUCCEEDED", 3)
    assert len(client.submitted) == 2


def test_attempts_belong_to_their_run_only(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job named like an attempt but submitted for another run id is not an attempt of this
    run; the run "r--a2" is a run of its own."""
    path = write_config(project, tiny_text(tmp_path))
    client = fake_cluster(monkeypatch, {"r": "FAILED", "r--a5": "RUNNING", "r--a2": "SUCCEEDED"})
    client.metadata["r--a5"] = {"run_id": "someone-else"}
    client.metadata["r--a2"] = {"run_id": "r--a2"}
    assert jobs.status("r", address=DEAD_ADDRESS) == "FAILED"
    assert jobs.status("r--a2", address=DEAD_ADDRESS) == "SUCCEEDED"
    with pytest.raises(jobs.JobsError, match="r--a2"):  # the next attempt's id is taken
        jobs.submit(path, address=DEAD_ADDRESS, project_dir=project, run_id="r")


AUTH_MESSAGE = (
    "Authentication required: Unauthorized: missing or invalid token\n\n"
    "Token authentication is enabled but no authentication token was found"
)


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "JOB", "--run-id", "r1"],
        ["submit", "JOB", "--run-id", "r1", "--wait"],
        ["status", "r1"],
        ["logs", "r1"],
        ["stop", "r1"],
    ],
)
def test_auth_errors_print_a_token_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv: list[str]
) -> None:
    import ray.job_submission
    from ray.exceptions import AuthenticationError

    from pipeline.cli import main as cli_main

    class Refusing(FakeClient):
        def list_jobs(self, *args: Any) -> list[SimpleNamespace]:
            raise AuthenticationError(AUTH_MESSAGE)

        get_job_info = list_jobs  # type: ignore[assignment]

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Refusing)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    argv = [str(REPO / "jobs" / "nightly-summarize.yaml") if a == "JOB" else a for a in argv]
    assert cli_main([*argv, "--address", "http://user:hunter2@head:8265"]) == 1
    err = capsys.readouterr().err
    assert "RAY_AUTH_MODE=token" in err and "RAY_AUTH_TOKEN" in err and "~/.ray/auth_token" in err
    assert "hunter2" not in err and "http://***@head:8265" in err


def test_cluster_unreachable_is_a_jobs_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(jobs.JobsError, match=r"cannot reach the Ray Jobs API at http://127\.0"):
        jobs.status("any", address=DEAD_ADDRESS)


# Against a real Ray head ------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def wait_for_dashboard(
    url: str, head: subprocess.Popen, log_path: Path, timeout_s: float, token: str | None = None
) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{url}/api/version", headers=headers)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited {head.returncode}:\n{log_path.read_text()}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(request, timeout=5) as response,
        ):
            if response.status == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"the dashboard at {url} did not answer in {timeout_s} s")


def shut_down(head: subprocess.Popen) -> None:
    """Stops the head we started, by pid: SIGINT lets `ray start --block` stop its processes;
    then every descendant recorded before (job drivers included) that is still alive is killed."""
    try:
        tree = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        head.send_signal(signal.SIGINT)
    try:  # `ray start --block` often outlives SIGINT by a minute: its tree is killed below
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait(timeout=10)
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(tree, timeout=10)


@contextlib.contextmanager
def head_process(auth: dict[str, str], num_cpus: int = 8) -> Iterator[str]:
    """A Ray head with the dashboard on free local ports and its own temp dir (so ray.init()
    elsewhere never finds it), its RAY_AUTH_* variables set to ``auth``; yields the dashboard
    URL and stops the head by its own pid."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rgj-", dir="/tmp"))  # short: socket paths
    gcs, dashboard, client, agent = free_ports(4)
    bin_dir = Path(sys.executable).parent
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in jobs._ADDRESS_VARIABLES and not k.startswith("RAY_AUTH_")
    }
    # As a user would start it: the venv's `ray`, the venv not on PATH (nor activated), so the
    # job's entrypoint must find the cluster's interpreter itself.
    path = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(p for p in path if p and Path(p).resolve() != bin_dir.resolve())
    env.pop("VIRTUAL_ENV", None)
    env.update(auth)
    log_path = temp_dir / "head.log"
    command = [
        str(bin_dir / "ray"),
        *("start", "--head", "--block", "--disable-usage-stats"),
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--num-cpus={num_cpus}",
        "--include-dashboard=true",
        f"--object-store-memory={300 * 2**20}",
        f"--temp-dir={temp_dir}",
    ]
    with log_path.open("wb") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(url, head, log_path, timeout_s=180, token=auth.get("RAY_AUTH_TOKEN"))
        yield url
    finally:
        shut_down(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    # Ray 2.60 turns token auth on for new clusters, with the token in the shared ~/.ray: this
    # loopback-only test head runs without it rather than touch that file or this process's env.
    with head_process({"RAY_AUTH_MODE": "disabled"}) as url:
        yield url


@pytest.fixture(scope="module")
def cluster_job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("jobs-cluster")
    fixtures = build_fixtures(root / "fixtures")
    project = make_project(root)
    return {"root": root, "fixtures": fixtures, "project": project}


def sdk(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


@pytest.fixture(scope="module")
def tiny_run(ray_head: str, cluster_job: dict[str, Any]) -> dict[str, Any]:
    root, project = cluster_job["root"], cluster_job["project"]
    rows = corpus_rows(12)
    write_corpus(LOCAL, str(root / "in"), rows, "jsonl", files=2)
    text = job_yaml(
        cluster_job["fixtures"],
        task="summarize",
        input_uri=str(root / "in" / "*.jsonl"),
        output_uri=str(root / "out"),
    )
    config = write_config(project, text, "tiny.yaml")
    run_id = f"jobs-tiny-{uuid.uuid4().hex[:8]}"
    result = jobs.submit(
        config,
        address=ray_head,
        project_dir=project,
        run_id=run_id,
        wait=True,
        timeout_s=300,
        overrides=["generation.max_new_tokens=4"],
    )
    return {
        "result": result,
        "config": config,
        "rows": rows,
        "run_dir": root / "out" / run_id,
    }


@pytest.mark.slow
def test_submit_and_wait(ray_head: str, tiny_run: dict[str, Any]) -> None:
    result = tiny_run["result"]
    if result.status != "SUCCEEDED":
        pytest.fail(f"{result}\n{jobs.logs(result.run_id, address=ray_head)[-4000:]}")
    assert result.created and result.submission_id == result.run_id
    run_dir = tiny_run["run_dir"]
    assert (run_dir / "_SUCCESS").exists()
    table = read_output(LOCAL, str(run_dir), "parquet")
    assert sorted(table.column(S.ID).to_pylist()) == sorted(r["id"] for r in tiny_run["rows"])
    assert set(table.column(S.RUN_ID).to_pylist()) == {result.run_id}
    info = sdk(ray_head).get_job_info(result.run_id)
    assert info.metadata == {
        "run_id": result.run_id,
        "task": "summarize",
        "date": info.metadata["date"],
        "config": "jobs/tiny.yaml",
    }
    # The head runs without its venv on PATH: the entrypoint found the venv's interpreter.
    assert info.entrypoint.startswith(jobs.FIND_PYTHON)
    argv = shlex.split(info.entrypoint[len(jobs.FIND_PYTHON) :])
    assert argv[:4] == ["-m", "pipeline.cli", "run", "jobs/tiny.yaml"]
    assert "env_vars" not in (info.runtime_env or {})
    assert jobs.status(result.run_id, address=ray_head) == "SUCCEEDED"


@pytest.mark.slow
def test_resubmitting_a_run_starts_nothing(ray_head: str, tiny_run: dict[str, Any]) -> None:
    run_id = tiny_run["result"].run_id
    before = len(sdk(ray_head).list_jobs())
    again = jobs.submit(
        tiny_run["config"],
        address=ray_head,
        project_dir=tiny_run["config"].parent.parent,
        run_id=run_id,
        wait=True,
        timeout_s=30,
    )
    assert again == jobs.SubmitResult(run_id, run_id, False, "SUCCEEDED")
    assert len(sdk(ray_head).list_jobs()) == before


@pytest.mark.slow
def test_logs_show_the_cli_output(ray_head: str, tiny_run: dict[str, Any]) -> None:
    text = jobs.logs(tiny_run["result"].run_id, address=ray_head)
    assert tiny_run["result"].run_id in text
    assert f"outputs: {tiny_run['run_dir']}" in text


@pytest.mark.slow
def test_unknown_run_id_is_named(ray_head: str) -> None:
    for call in (jobs.status, jobs.logs, jobs.stop):
        with pytest.raises(jobs.UnknownRunError, match="no-such-run"):
            call("no-such-run", address=ray_head)


@pytest.mark.slow
def test_stop_a_running_job(ray_head: str, cluster_job: dict[str, Any]) -> None:
    root, project = cluster_job["root"], cluster_job["project"]
    write_corpus(LOCAL, str(root / "in-long"), corpus_rows(400), "jsonl", files=4)
    text = job_yaml(
        cluster_job["fixtures"],
        task="summarize",
        input_uri=str(root / "in-long" / "*.jsonl"),
        output_uri=str(root / "out-long"),
        extra={"generation": {"max_new_tokens": 256}},
    )
    config = write_config(project, text, "long.yaml")
    run_id = f"jobs-long-{uuid.uuid4().hex[:8]}"
    first = jobs.submit(config, address=ray_head, project_dir=project, run_id=run_id)
    assert first.created and first.status in ("PENDING", "RUNNING")
    second = jobs.submit(config, address=ray_head, project_dir=project, run_id=run_id)
    assert not second.created and second.status in ("PENDING", "RUNNING")

    # Stop once the pipeline itself is under way (the runner has listed its input files).
    deadline = time.monotonic() + 180
    while "input files" not in jobs.logs(run_id, address=ray_head):
        state = jobs.status(run_id, address=ray_head)
        if state not in ("PENDING", "RUNNING") or time.monotonic() > deadline:
            pytest.fail(f"{state}\n{jobs.logs(run_id, address=ray_head)[-4000:]}")
        time.sleep(1)
    assert jobs.status(run_id, address=ray_head) == "RUNNING"
    assert jobs.stop(run_id, address=ray_head, timeout_s=60) == "STOPPED"
    assert jobs.status(run_id, address=ray_head) == "STOPPED"
    assert not (root / "out-long" / run_id / "_SUCCESS").exists()
    # The driver unwound on SIGTERM and released its lease: the stopped run resumes at once as
    # attempt 2 (a lease left behind would refuse it for run.lease_timeout_s).
    assert not (root / "out-long" / run_id / "_lease.json").exists()
    resumed = jobs.submit(config, address=ray_head, project_dir=project, run_id=run_id)
    assert (resumed.submission_id, resumed.created) == (f"{run_id}--a2", True)
    deadline = time.monotonic() + 180
    while "input files" not in jobs.logs(run_id, address=ray_head):
        state = jobs.status(run_id, address=ray_head)
        if state not in ("PENDING", "RUNNING") or time.monotonic() > deadline:
            pytest.fail(f"{state}\n{jobs.logs(run_id, address=ray_head)[-4000:]}")
        time.sleep(1)
    assert jobs.stop(run_id, address=ray_head, timeout_s=60) == "STOPPED"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An HTTP endpoint that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


@pytest.mark.slow
def test_a_failed_run_is_resumed_by_a_new_attempt(
    ray_head: str, cluster_job: dict[str, Any], silent_endpoint: str
) -> None:
    """Attempt 1 fails (its input storage never answers within the 1 s preflight); submitting
    the run again starts attempt 2 of the same run id, which status / logs / stop then follow."""
    root, project = cluster_job["root"], cluster_job["project"]
    options = {"anon": True, "client_kwargs": {"endpoint_url": silent_endpoint}}
    text = job_yaml(
        cluster_job["fixtures"],
        task="summarize",
        input_uri="s3://rgbatch-silent/in/*.jsonl",
        output_uri=str(root / "out-retry"),
        extra={"input": {"storage_options": options}, "run": {"preflight_timeout_s": 1}},
    )
    config = write_config(project, text, "retry.yaml")
    run_id = f"jobs-retry-{uuid.uuid4().hex[:8]}"
    submit = dict(address=ray_head, project_dir=project, run_id=run_id)
    first = jobs.submit(config, **submit, wait=True, timeout_s=180)
    expected = jobs.SubmitResult(run_id, run_id, True, "FAILED", reason=first.reason)
    assert first == expected, jobs.logs(run_id, address=ray_head)
    assert "no answer from storage within 1 s" in jobs.logs(run_id, address=ray_head)
    assert first.reason is not None and "no answer from storage within 1 s" in first.reason

    # Attempt 2 waits up to 300 s for the same storage: it stays RUNNING until stopped.
    patient = ["run.preflight_timeout_s=300"]
    second = jobs.submit(config, **submit, overrides=patient)
    attempt = f"{run_id}--a2"
    assert (second.submission_id, second.created, second.attempt) == (attempt, True, 2)
    info = sdk(ray_head).get_job_info(attempt)
    argv = shlex.split(info.entrypoint)
    assert argv[argv.index("--run-id") + 1] == run_id and info.metadata["run_id"] == run_id

    deadline = time.monotonic() + 180
    while f"Running entrypoint for job {attempt}" not in jobs.logs(run_id, address=ray_head):
        state = jobs.status(run_id, address=ray_head)
        if state not in ("PENDING", "RUNNING") or time.monotonic() > deadline:
            pytest.fail(f"{state}\n{jobs.logs(run_id, address=ray_head)[-4000:]}")
        time.sleep(1)
    assert jobs.status(run_id, address=ray_head) == "RUNNING"
    assert jobs._status_value(sdk(ray_head).get_job_info(run_id)) == "FAILED"
    again = jobs.submit(config, **submit, overrides=patient)  # running: not duplicated
    assert again == jobs.SubmitResult(run_id, attempt, False, "RUNNING", 2)
    assert jobs.stop(run_id, address=ray_head, timeout_s=60) == "STOPPED"
    assert jobs._status_value(sdk(ray_head).get_job_info(attempt)) == "STOPPED"
    assert jobs._status_value(sdk(ray_head).get_job_info(run_id)) == "FAILED"


def run_cli(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *argv],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_a_token_cluster_without_a_token_gets_a_hint(tmp_path: Path) -> None:
    """Against a head with token auth (Ray 2.60's default), a client without RAY_AUTH_MODE=token
    is told how to give the token; with it, the same call reaches the Jobs API."""
    token = uuid.uuid4().hex * 2
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in jobs._ADDRESS_VARIABLES and not k.startswith("RAY_AUTH_")
    }
    base["HOME"] = str(home)
    with head_process(auth, num_cpus=1) as url:
        nightly = str(REPO / "jobs" / "nightly-summarize.yaml")
        for argv in (["status", "r1"], ["submit", nightly, "--run-id", "r1", "--wait"]):
            refused = run_cli([*argv, "--address", url], base)
            assert refused.returncode == 1, refused.stderr
            assert "RAY_AUTH_MODE=token" in refused.stderr, refused.stderr
            assert "RAY_AUTH_TOKEN" in refused.stderr and "~/.ray/auth_token" in refused.stderr
        allowed = run_cli(["status", "r1", "--address", url], {**base, **auth})
        assert allowed.returncode == 2, allowed.stderr
        assert "no job with run id 'r1'" in allowed.stderr
        assert "RAY_AUTH_MODE" not in allowed.stderr


def test_reads_the_cluster_cannot_find_are_refused(
    project: Path, tmp_path: Path, no_cluster: None
) -> None:
    """A relative checkpoint left out of the upload, and an absolute path into the working tree,
    are refused before the cluster is contacted, with the fix; a relative input inside the
    upload is what the cluster reads from its copy, so it passes."""
    (project / ".fixtures" / "tiny-it").mkdir(parents=True)
    base = yaml.safe_load(tiny_text(tmp_path))
    cases = {
        "model.checkpoint": ".fixtures/tiny-it",
        "toxicity.checkpoint": str(project / "detox.ckpt"),
        "input.uri": "out/inputs/*.jsonl",
    }
    for path, value in cases.items():
        config = write_config(project, yaml.safe_dump(base), f"{path}.yaml")
        with pytest.raises(ConfigError) as info:
            jobs.submit(
                config, address=DEAD_ADDRESS, project_dir=project, overrides=[f"{path}={value}"]
            )
        assert [where for where, _ in info.value.errors] == [path]
        message = info.value.errors[0][1]
        assert value in message and "s3://" in message and f"--set {path}=" in message
    (project / "data" / "sample").mkdir(parents=True)
    config = write_config(project, yaml.safe_dump(base), "uploaded.yaml")
    with reaches_cluster():
        jobs.submit(
            config,
            address=DEAD_ADDRESS,
            project_dir=project,
            overrides=["input.uri=data/sample/*.jsonl"],
        )


def test_the_entrypoint_finds_the_interpreter_ray_runs_under(tmp_path: Path) -> None:
    """The entrypoint's shell, started (as Ray's job supervisor starts it) by a Python process
    that has Ray loaded, runs this venv's interpreter with no venv on PATH; with neither that
    nor a usable python on PATH it ends with exit 2 and an error line naming --python."""
    import ray  # noqa: F401  (loads ray/_raylet.so into this process, as in the supervisor)

    probe = jobs.FIND_PYTHON + ' -c "import sys; print(sys.prefix)"'
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    found = subprocess.run(["/bin/sh", "-c", probe], env=bare, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).resolve() == Path(sys.prefix).resolve()
    lost = subprocess.run(
        ["/bin/sh", "-c", probe.replace("/proc/$PPID/maps", "/nonexistent")],
        env={"PATH": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert lost.returncode == 2
    assert jobs.failure_reason(lost.stdout + lost.stderr).startswith("no Python on this node")
    assert "--python" in lost.stderr


def test_failure_reason_is_the_error_line_not_the_traceback() -> None:
    cli_error = "INFO pipeline.runner: starting\nerror: input.uri: no files match '/x/*.jsonl'\n"
    assert jobs.failure_reason(cli_error) == "input.uri: no files match '/x/*.jsonl'"
    traceback = (
        "ERROR rgbatch: run r failed\nTraceback (most recent call last):\n"
        '  File "runner.py", line 3, in run_job\n    raise RunPolicyError(...)\n'
        "pipeline.runner.RunPolicyError: 12 of 100 rows failed (max_error_fraction 0.1)\n"
    )
    assert jobs.failure_reason(traceback) == (
        "pipeline.runner.RunPolicyError: 12 of 100 rows failed (max_error_fraction 0.1)"
    )
    wrapped = "ray.exceptions.RayTaskError(ValueError): bad batch"
    assert jobs.failure_reason(f"noise\n{wrapped}\nINFO done") == wrapped
    message = "Job entrypoint command failed with exit code 127\nmore"
    assert jobs.failure_reason("sh: 1: python: not found", message) == message.splitlines()[0]
    assert jobs.failure_reason("", None) is None
    assert jobs.failure_reason("error: s3://user:pw@bucket/x is missing") == (
        "s3://***@bucket/x is missing"
    )
    lines = "INFO rgbatch.progress: progress: 0 rows\nx\nINFO rgbatch.progress: progress: 5 rows"
    assert jobs.progress_lines(lines) == ["0 rows", "5 rows"]


@pytest.mark.slow
def test_a_failed_run_says_why(ray_head: str, cluster_job: dict[str, Any], capsys) -> None:
    """The job fails on the cluster (its input matches no file there): submit --wait, status
    and the CLI all give the error line and exit 1."""
    from pipeline.cli import main as cli_main

    root, project = cluster_job["root"], cluster_job["project"]
    text = job_yaml(
        cluster_job["fixtures"],
        task="summarize",
        input_uri=str(root / "nowhere" / "*.jsonl"),
        output_uri=str(root / "out-missing"),
    )
    config = write_config(project, text, "missing.yaml")
    run_id = f"jobs-missing-{uuid.uuid4().hex[:8]}"
    result = jobs.submit(
        config, address=ray_head, project_dir=project, run_id=run_id, wait=True, timeout_s=300
    )
    assert result.status == "FAILED"
    assert result.reason is not None and "input.uri" in result.reason, result.reason
    assert "Traceback" not in result.reason
    state = jobs.describe(run_id, address=ray_head)
    assert (state.status, state.reason) == ("FAILED", result.reason)
    capsys.readouterr()
    assert cli_main(["status", run_id, "--address", ray_head]) == 1
    assert capsys.readouterr().out.splitlines() == ["FAILED", f"reason: {result.reason}"]


@pytest.mark.slow
def test_wait_streams_the_progress(ray_head: str, cluster_job: dict[str, Any]) -> None:
    root, project = cluster_job["root"], cluster_job["project"]
    write_corpus(LOCAL, str(root / "in-progress"), corpus_rows(8), "jsonl", files=1)
    text = job_yaml(
        cluster_job["fixtures"],
        task="summarize",
        input_uri=str(root / "in-progress" / "*.jsonl"),
        output_uri=str(root / "out-progress"),
        extra={"run": {"progress_interval_s": 1.0}},
    )
    config = write_config(project, text, "progress.yaml")
    seen: list[str] = []
    result = jobs.submit(
        config,
        address=ray_head,
        project_dir=project,
        run_id=f"jobs-progress-{uuid.uuid4().hex[:8]}",
        wait=True,
        timeout_s=300,
        on_progress=seen.append,
        progress_interval_s=0.5,
    )
    assert result.status == "SUCCEEDED" and result.reason is None
    driver = jobs.progress_lines(jobs.logs(result.run_id, address=ray_head))
    assert len(seen) >= 2 and seen[-1] == driver[-1], (seen, driver)  # it ends with the last
    rest = iter(driver)  # what was passed on is the driver's lines, in order, none twice
    assert all(any(line == later for later in rest) for line in seen), (seen, driver)
    assert "8/~8 rows (100%)" in seen[-1] or "8/8 rows (100%)" in seen[-1], seen
