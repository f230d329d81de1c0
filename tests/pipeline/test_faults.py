"""Faults survived, nothing lost: real jobs on real local Ray clusters, with faults injected.

Each case runs ``python -m pipeline.cli run`` as a subprocess (the tiny model, a few hundred rows,
small part files so that there are many commits), injects one kind of fault, and asserts the
run's promise: exit 0 with ``_SUCCESS``, or exit 1 and then a rerun of the same run id that exits
0; every input row exactly once in the outputs (kept and rejected), rows committed before the
fault not generated again (their part files untouched), and the manifest's counts equal to what
the files hold (:func:`pipeline_helpers.check_complete_run`).

Faults, and how they are injected:

- model actor SIGKILLed twice, then the toxicity actor once (found among the driver's processes);
- a second Ray node holding the model replica (``ray start --resources={"model_node": 1}``)
  SIGKILLed with every process it started; a replacement node joins 10 s later;
- object storage: :class:`fault_proxy.FaultProxy` in front of moto's S3 server refuses
  connections, cuts them mid-transfer, answers 503 SlowDown and delays responses at fixed rates
  and a fixed seed, on reads, part writes, checkpoint writes, the manifest and ``_SUCCESS``;
  the clients retry as configured (botocore standard mode, 10 attempts); a second case turns
  botocore's retries off so that Ray Data's retried I/O errors, as the runner extends them,
  carry the writes;
- the engine raising on a step (``testkit.faults`` through ``RGBATCH_FAULT_HOOK``): once per
  actor (retried, completes), or always as a device out-of-memory (the actor exits, Ray restarts
  it ``model.max_restarts`` times, the run fails, never hangs; the rerun without the fault
  completes);
- the driver SIGKILLed after the data and the manifest are written, before ``_SUCCESS``;
- the local output disk full: a tmpfs of 128 KiB mounted on the output directory (this needs
  root or CAP_SYS_ADMIN; the test is skipped, saying so, where ``mount`` is refused), grown
  after the failure for the rerun.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import psutil
import pyarrow.parquet as pq
import pytest
import s3fs
from fault_proxy import KEYS, FaultProxy, Rule, proxied_options
from pipeline_helpers import (
    check_complete_run,
    committed_keys,
    corpus_rows,
    job_yaml,
    kill_tree,
    part_names,
    run_cli,
    write_corpus,
)

from pipeline import columns as S
from testkit.faults import recorded

LOCAL = fsspec.filesystem("file")
ROWS = 240
RUN_TIMEOUT_S = 300
# Paces the tiny model (0.5 s more per engine step; ROWS rows take ~40 steps, ~20 s) so that a
# fault lands while the model still has rows to generate.
PACED = {"RGBATCH_FAULT_HOOK": "testkit.faults:slow", "RGBATCH_FAULT_DELAY_S": "0.5"}


def job(
    fixtures: dict[str, str],
    root: Path,
    *,
    input_uri: str | None = None,
    output_uri: str | None = None,
    extra: dict[str, Any] | None = None,
    rows: int = ROWS,
) -> tuple[Path, list[dict[str, Any]]]:
    """A summarize job over ``rows`` local JSONL rows (unless ``input_uri`` is given), 8 rows
    per model batch and 8 per part file; returns the config path and the rows."""
    corpus = corpus_rows(rows)
    if input_uri is None:
        write_corpus(LOCAL, str(root / "in"), corpus, "jsonl", files=6)
        input_uri = str(root / "in" / "*.jsonl")
    settings: dict[str, Any] = {
        "generation": {"max_new_tokens": 8, "batch_size": 8, "max_slots": 8},
        "output": {"rows_per_file": 8},
        "run": {"num_cpus": 8},
    }
    for section, values in (extra or {}).items():
        settings.setdefault(section, {}).update(values)
    config = root / "job.yaml"
    config.write_text(
        job_yaml(
            fixtures,
            task="summarize",
            input_uri=input_uri,
            output_uri=output_uri or str(root / "out"),
            extra=settings,
        )
    )
    return config, corpus


def finish(process: subprocess.Popen, timeout_s: float = RUN_TIMEOUT_S) -> int:
    """The run's exit status; a run that does not end in time is killed and fails the test."""
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        pytest.fail(f"the run did not end within {timeout_s} s (a hang)")


def wait_until(
    condition: Callable[[], Any], process: subprocess.Popen, what: str, timeout_s: float = 240
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}")
        time.sleep(0.2)
    kill_tree(process)
    pytest.fail(f"timed out waiting for {what}")


def stage_processes(root_pid: int, stage: str) -> list[psutil.Process]:
    """The live actor processes of a Ray Data stage (``MapBatches(<stage>)``) under ``root_pid``."""
    try:
        family = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for process in family:
        with contextlib.suppress(psutil.Error):
            if f"MapBatches({stage})" in " ".join(process.cmdline()) and process.is_running():
                found.append(process)
    return found


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """The run's part files now (kept and rejected), by name."""
    return {name: (run_dir / name).read_bytes() for name in part_names(LOCAL, str(run_dir))}


def check_untouched(run_dir: Path, before: dict[str, bytes]) -> None:
    """Parts committed before a fault are still there, byte for byte: nothing regenerated them."""
    for name, data in before.items():
        assert (run_dir / name).read_bytes() == data, f"{name} was rewritten"


def committed_parts(run_dir: Path) -> dict[str, bytes]:
    """The parts whose rows the checkpoint has committed (the others may be rolled back)."""
    committed = committed_keys(run_dir / "_checkpoint")
    parts = {}
    for name, data in snapshot(run_dir).items():
        with contextlib.suppress(Exception):  # a part being written
            keys = set(pq.read_table(run_dir / name).column(S.ROW_KEY).to_pylist())
            if keys <= committed:
                parts[name] = data
    return parts


# Retried I/O errors ------------------------------------------------------------------------------


def test_runner_retries_what_s3fs_raises_under_faults() -> None:
    """The messages s3fs / botocore raise under each fault of the proxy (as Ray Data formats
    them) match the runner's retried I/O errors; other errors do not."""
    from ray._common.retry import matches_error

    from pipeline.runner import RETRIED_IO_ERRORS

    faults = [
        "EndpointConnectionError: Could not connect to the endpoint URL: "
        '"http://127.0.0.1:5000/b/out/r1/part-x.parquet"',
        "ConnectionClosedError: Connection was closed before we received a valid response from "
        'endpoint URL: "http://127.0.0.1:5000/b/out/r1/_SUCCESS".',
        "ClientPayloadError: Response payload is not completed: <ContentLengthError: 400>",
        "OSError: [Errno 16] Please reduce your request rate.",
        "ClientError: An error occurred (SlowDown) when calling the PutObject operation",
        "ClientError: An error occurred (503) when calling the HeadObject operation: "
        "Service Unavailable",
        'ReadTimeoutError: Read timeout on endpoint URL: "http://127.0.0.1:5000/b/in/in-000.jsonl"',
        'ConnectTimeoutError: Connect timeout on endpoint URL: "http://127.0.0.1:5000/b"',
    ]
    for text in faults:
        assert any(matches_error(p, text) for p in RETRIED_IO_ERRORS), text
    for text in (
        "FileNotFoundError: b/out/r1/_manifest.json",
        "PermissionError: Access Denied",
        "OSError: [Errno 28] No space left on device",
    ):
        assert not any(matches_error(p, text) for p in RETRIED_IO_ERRORS), text


# 1. Actors killed --------------------------------------------------------------------------------


def model_steps(log: Path, pid: int | None = None) -> int:
    """Engine steps the paced model actors took so far (of one actor process if ``pid``)."""
    return sum(1 for line in recorded(str(log)) if pid is None or line.split()[1] == f"pid={pid}")


@pytest.mark.slow
def test_model_actor_killed_twice_and_toxicity_actor_once(fixtures, tmp_path) -> None:
    config, rows = job(fixtures, tmp_path)
    run_dir = tmp_path / "out" / "r1"
    steps = tmp_path / "steps.log"
    env = {**PACED, "RGBATCH_FAULT_LOG": str(steps)}
    run = run_cli(config, "r1", env=env, log=tmp_path / "run.log")
    kept: dict[str, bytes] = {}
    killed: list[int] = []
    # Each model actor is killed after its 5th step; the toxicity actor once the model has
    # taken 20 steps in all (it has batches to score by then).
    for stage, own_steps, all_steps in (
        ("ModelStage", 5, 0),
        ("ModelStage", 5, 0),
        ("ToxicityStage", 0, 20),
    ):
        actors = wait_until(
            lambda s=stage: [p for p in stage_processes(run.pid, s) if p.pid not in killed],
            run,
            f"a live {stage} actor",
        )
        wait_until(
            lambda p=actors[0].pid, a=own_steps, b=all_steps: (
                model_steps(steps, p) >= a and model_steps(steps) >= b
            ),
            run,
            f"{own_steps or all_steps} model steps",
        )
        kept.update(committed_parts(run_dir))
        actors[0].kill()
        killed.append(actors[0].pid)
    assert finish(run) == 0, (tmp_path / "run.log").read_text()[-4000:]
    check_complete_run(LOCAL, str(run_dir), rows)
    check_untouched(run_dir, kept)
    assert len(killed) == 3
    assert len({line.split()[1] for line in recorded(str(steps))}) == 3  # two restarts


# 2. A node lost ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalCluster:
    """A Ray head and extra nodes on this machine, each a ``ray start --block`` process of ours
    (its node's processes are its descendants), without token auth (loopback only); ``env`` is
    added to the environment the nodes' workers inherit."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rgf-", dir="/tmp"))  # short socket paths
        self.log_dir = root
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "RAY_AUTH_MODE": "disabled"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        ray = str(Path(sys.executable).parent / "ray")
        with (self.log_dir / f"{name}.log").open("ab") as log:
            node = subprocess.Popen(
                [
                    *(ray, "start", "--block", "--disable-usage-stats"),
                    "--node-ip-address=127.0.0.1",
                    f"--object-store-memory={200 * 2**20}",
                    *args,
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.nodes.append(node)
        return node

    def head(self, num_cpus: int) -> None:
        self._start(
            "head",
            "--head",
            f"--port={self.port}",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=false",
            f"--temp-dir={self.temp_dir}",
        )
        self.wait_for_nodes(1)

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float]) -> subprocess.Popen:
        node = self._start(
            name,
            f"--address={self.address}",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
        )
        return node

    def alive_nodes(self) -> int:
        code = (
            f"import ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60
        )
        return int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else 0

    def wait_for_nodes(self, n: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.alive_nodes() >= n:
                return
            time.sleep(1)
        raise RuntimeError(f"{n} Ray nodes did not come up in {timeout_s} s")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            with contextlib.suppress(psutil.Error):
                family = psutil.Process(node.pid).children(recursive=True)
                for process in [psutil.Process(node.pid), *family]:
                    with contextlib.suppress(psutil.Error):
                        process.kill()
                psutil.wait_procs(family, timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node: its ``ray start`` process and every process it started (raylet, workers,
    the actors on it), with no chance to say goodbye."""
    family = psutil.Process(node.pid).children(recursive=True)
    for process in [psutil.Process(node.pid), *family]:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(family, timeout=10)
    node.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    steps = {"RGBATCH_FAULT_LOG": str(tmp_path / "steps.log")}
    cluster = LocalCluster(tmp_path, env={**PACED, **steps})  # what the nodes' workers inherit
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_node_holding_the_model_replica_dies(fixtures, tmp_path, cluster) -> None:
    cluster.head(num_cpus=6)
    model_node = cluster.add_node("node-a", num_cpus=1, resources={"model_node": 1})
    cluster.wait_for_nodes(2)
    config, rows = job(
        fixtures,
        tmp_path,
        extra={
            "model": {"resources_per_replica": {"model_node": 1}},
            "run": {"ray_address": cluster.address, "num_cpus": None},
        },
    )
    run_dir = tmp_path / "out" / "r1"
    env = {"RAY_AUTH_MODE": "disabled"}
    run = run_cli(config, "r1", env=env, log=tmp_path / "run.log")
    wait_until(lambda: model_steps(tmp_path / "steps.log") >= 10, run, "10 model steps")
    assert stage_processes(model_node.pid, "ModelStage"), "the model actor is not on node-a"
    kept = committed_parts(run_dir)
    kill_node(model_node)
    time.sleep(10)
    cluster.add_node("node-b", num_cpus=1, resources={"model_node": 1})
    reruns = 0
    if finish(run) != 0:
        reruns = 1
        assert not (run_dir / "_SUCCESS").exists()
        assert finish(run_cli(config, "r1", env=env, log=tmp_path / "rerun.log")) == 0
    check_complete_run(LOCAL, str(run_dir), rows)
    check_untouched(run_dir, kept)
    assert len({line.split()[1] for line in recorded(str(tmp_path / "steps.log"))}) >= 2
    print(f"node lost: reruns needed {reruns}")


# 3. Object storage faults ------------------------------------------------------------------------

S3_RULES = [
    # Reads of the input, and the checkpoint's reads on resume.
    Rule("refuse", 0.15, methods=("GET", "HEAD"), path=r"/in/in-", name="read-refuse"),
    Rule("cut", 0.15, methods="GET", path=r"/in/in-", name="read-cut"),
    Rule("slowdown", 0.15, methods=("GET", "HEAD"), path=r"/in/in-", name="read-slowdown"),
    # Part writes (kept and rejected) and their summaries.
    Rule("slowdown", 0.08, methods="PUT", path=KEYS["parts"], name="part-slowdown"),
    Rule("refuse", 0.05, methods="PUT", path=KEYS["parts"], name="part-refuse"),
    Rule("cut", 0.05, methods="PUT", path=KEYS["parts"], name="part-cut"),
    Rule("delay", 0.05, methods="PUT", path=KEYS["parts"], delay_s=0.5, name="part-delay"),
    Rule("slowdown", 0.05, methods="PUT", path=KEYS["stats"], name="stats-slowdown"),
    # Ray Data's checkpoint: pending writes, renames (copy + delete), reads.
    Rule("slowdown", 0.08, path=KEYS["checkpoint"], name="checkpoint-slowdown"),
    Rule("cut", 0.05, methods=("PUT", "DELETE"), path=KEYS["checkpoint"], name="checkpoint-cut"),
    Rule("refuse", 0.05, path=KEYS["checkpoint"], name="checkpoint-refuse"),
    # Finalisation: the first write of the manifest and of _SUCCESS is cut (it took, the client
    # never heard), the next answered SlowDown.
    Rule("cut", 1.0, methods="PUT", path=KEYS["manifest"], limit=1, name="manifest-cut"),
    Rule("slowdown", 1.0, methods="PUT", path=KEYS["manifest"], limit=1, name="manifest-503"),
    Rule("cut", 1.0, methods="PUT", path=KEYS["success"], limit=1, name="success-cut"),
    Rule("slowdown", 1.0, methods="PUT", path=KEYS["success"], limit=1, name="success-503"),
]


@pytest.mark.slow
def test_object_storage_faults(fixtures, tmp_path, s3_bucket, s3_server) -> None:
    bucket, options = s3_bucket
    direct = s3fs.S3FileSystem(**{**options, "skip_instance_cache": True})
    with FaultProxy(s3_server, seed=20261130, rules=S3_RULES) as proxy:
        storage = proxied_options(options, proxy.url, max_attempts=10, read_timeout=10)
        rows = corpus_rows(ROWS)
        write_corpus(direct, f"{bucket}/in", rows, "jsonl", files=6)
        config, _ = job(
            fixtures,
            tmp_path,
            input_uri=f"s3://{bucket}/in/*.jsonl",
            output_uri=f"s3://{bucket}/out",
            extra={"input": {"storage_options": storage}, "output": {"storage_options": storage}},
        )
        run = run_cli(config, "r1", log=tmp_path / "run.log")
        status = finish(run)
        counts = proxy.counts()
    log = (tmp_path / "run.log").read_text()
    assert status == 0, log[-4000:]
    check_complete_run(direct, f"{bucket}/out/r1", rows)
    injected = {name: c["injected"] for name, c in counts.items()}
    print(f"S3 faults over {proxy.requests} requests: {json.dumps(counts)}")
    for group in ("read-", "part-", "checkpoint-"):
        assert sum(n for name, n in injected.items() if name.startswith(group)) > 0, injected
    for name in ("manifest-cut", "manifest-503", "success-cut", "success-503"):
        assert injected[name] == 1, injected


@pytest.mark.slow
def test_ray_data_retries_writes_the_storage_client_gave_up_on(
    fixtures, tmp_path, s3_bucket, s3_server
) -> None:
    """With botocore's retries off (one attempt), refused connections on part, summary and
    checkpoint writes reach Ray Data: s3fs does not retry them, and aiohttp resends a request only
    once when its pooled connection drops, so at a rate of 0.5 a quarter of these writes fail
    twice. The runner's extended retried I/O errors carry the run; with Ray's defaults alone it
    fails on an EndpointConnectionError (checked by hand)."""
    bucket, options = s3_bucket
    direct = s3fs.S3FileSystem(**{**options, "skip_instance_cache": True})
    rules = [
        Rule("refuse", 0.5, methods="PUT", path=KEYS["parts"], name="part-refuse"),
        Rule("refuse", 0.5, methods="PUT", path=KEYS["stats"], name="stats-refuse"),
        Rule("refuse", 0.5, methods="PUT", path=KEYS["checkpoint"], name="checkpoint-refuse"),
    ]
    with FaultProxy(s3_server, seed=7, rules=rules) as proxy:
        storage = proxied_options(options, proxy.url, max_attempts=1)
        config, rows = job(
            fixtures,
            tmp_path,
            output_uri=f"s3://{bucket}/out",
            extra={"output": {"storage_options": storage}},
        )
        status = finish(run_cli(config, "r1", log=tmp_path / "run.log"))
        injected = {name: c["injected"] for name, c in proxy.counts().items()}
    assert status == 0, (tmp_path / "run.log").read_text()[-4000:]
    check_complete_run(direct, f"{bucket}/out/r1", rows)
    assert all(n > 0 for n in injected.values()), injected


# 4. The engine failing ---------------------------------------------------------------------------


@pytest.mark.slow
def test_engine_step_failure_is_retried(fixtures, tmp_path) -> None:
    config, rows = job(fixtures, tmp_path)
    faults = tmp_path / "faults.log"
    env = {
        "RGBATCH_FAULT_HOOK": "testkit.faults:fail_once",
        "RGBATCH_FAULT_LOG": str(faults),
        "RGBATCH_FAULT_STEP": "5",
    }
    run = run_cli(config, "r1", env=env, log=tmp_path / "run.log")
    assert finish(run) == 0, (tmp_path / "run.log").read_text()[-4000:]
    check_complete_run(LOCAL, str(tmp_path / "out" / "r1"), rows)
    assert len(recorded(str(faults))) == 1  # one actor, one fault, retried in place


@pytest.mark.slow
def test_engine_out_of_memory_fails_boundedly_then_rerun_completes(fixtures, tmp_path) -> None:
    restarts = 2
    config, rows = job(fixtures, tmp_path, extra={"model": {"max_restarts": restarts}})
    run_dir = tmp_path / "out" / "r1"
    faults = tmp_path / "faults.log"
    env = {"RGBATCH_FAULT_HOOK": "testkit.faults:out_of_memory", "RGBATCH_FAULT_LOG": str(faults)}
    started = time.monotonic()
    run = run_cli(config, "r1", env=env, log=tmp_path / "run.log")
    assert finish(run, timeout_s=240) == 1
    failed_after = time.monotonic() - started
    log = (tmp_path / "run.log").read_text()
    assert "ActorDiedError" in log
    # Each actor process fails its first step and exits: the first one and its restarts.
    pids = {line.split()[1] for line in recorded(str(faults))}
    assert len(pids) == restarts + 1, recorded(str(faults))
    assert not (run_dir / "_SUCCESS").exists()
    assert not (run_dir / "_manifest.json").exists()
    assert not part_names(LOCAL, str(run_dir))  # no row was generated, nothing was written
    # The device is fixed: the same run id completes.
    assert finish(run_cli(config, "r1", log=tmp_path / "rerun.log")) == 0
    check_complete_run(LOCAL, str(run_dir), rows)
    print(f"out of memory: failed after {failed_after:.0f} s")


# 5. The driver killed while finalizing -----------------------------------------------------------

KILL_BEFORE_SUCCESS = """
import os, signal, sys
import pipeline.runner
def killed(fs, run_dir):
    os.kill(os.getpid(), signal.SIGKILL)
pipeline.runner.mark_success = killed
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_driver_killed_before_success(fixtures, tmp_path) -> None:
    config, rows = job(fixtures, tmp_path)
    run_dir = tmp_path / "out" / "r1"
    with (tmp_path / "run.log").open("wb") as log:
        first = subprocess.Popen(
            [sys.executable, "-c", KILL_BEFORE_SUCCESS, "run", str(config), "--run-id", "r1"],
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    status = finish(first)
    kill_tree(first)  # the Ray processes the killed driver left
    assert status == -9
    assert (run_dir / "_manifest.json").exists() and not (run_dir / "_SUCCESS").exists()
    before = snapshot(run_dir)
    stats_before = sorted(p.name for p in (run_dir / "_stats").iterdir())
    assert len(committed_keys(run_dir / "_checkpoint")) == ROWS
    assert finish(run_cli(config, "r1", log=tmp_path / "rerun.log")) == 0
    check_complete_run(LOCAL, str(run_dir), rows)
    assert snapshot(run_dir) == before  # nothing generated or written again
    assert sorted(p.name for p in (run_dir / "_stats").iterdir()) == stats_before


# 6. Disk full ------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Callable[[str], None]]:
    """A tmpfs of ``size`` on ``path``; yields a function that resizes it. Skips the test where
    mounting is not allowed (it needs root or CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        # Filling a disk on purpose needs a small filesystem of our own; without root or
        # CAP_SYS_ADMIN there is no way to make one, and filling the real disk is not an option.
        pytest.skip(
            "disk-full case needs root or CAP_SYS_ADMIN to mount a 128 KiB tmpfs "
            f"(uid {os.getuid()}, mount said: {mount.stderr.strip()})"
        )

    def resize(new_size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_disk_full_fails_clearly_and_rerun_completes(fixtures, tmp_path) -> None:
    out = tmp_path / "out"
    config, rows = job(fixtures, tmp_path)
    run_dir = out / "r1"
    with tmpfs(out, "128k") as resize:
        run = run_cli(config, "r1", log=tmp_path / "run.log")
        assert finish(run) == 1
        log = (tmp_path / "run.log").read_text()
        assert "No space left on device" in log, log[-4000:]
        assert not (run_dir / "_SUCCESS").exists()
        # Nothing half-written counts as done: every committed row is in a part that reads whole.
        committed = committed_keys(run_dir / "_checkpoint")
        readable: set[str] = set()
        for name in part_names(LOCAL, str(run_dir)):
            with contextlib.suppress(Exception):
                readable.update(pq.read_table(run_dir / name).column(S.ROW_KEY).to_pylist())
        assert committed <= readable
        assert len(committed) < ROWS
        before = committed_parts(run_dir)
        resize("64m")
        assert finish(run_cli(config, "r1", log=tmp_path / "rerun.log")) == 0
        check_complete_run(LOCAL, str(run_dir), rows)
        check_untouched(run_dir, before)
        print(f"disk full: {len(committed)} of {ROWS} rows committed before the failure")
