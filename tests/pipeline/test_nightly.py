"""Nightly runs: the date names the run; reruns of a finished date do nothing, of an unfinished
date resume; the deployment files run the same command the CLI documents."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import time
from pathlib import Path

import fsspec
import pytest
import yaml
from pipeline_helpers import build_fixtures, corpus_rows, job_yaml, write_corpus

import pipeline.runner
from pipeline.cli import build_parser, resolve_date, resolve_run_id
from pipeline.cli import main as cli_main
from pipeline.config import load_job_config

REPO = Path(__file__).resolve().parents[2]
NIGHTLY = REPO / "jobs" / "nightly-summarize.yaml"
ENV = {
    "RGBATCH_CORPUS_URI": "s3://corpora/news",
    "RGBATCH_MODEL_URI": "s3://models/rg/2b-it",
    "RGBATCH_OUTPUT_URI": "s3://out/nightly",
}
LOCAL_FS = fsspec.filesystem("file")


def test_dates_and_run_ids() -> None:
    today = dt.date(2026, 3, 1)
    assert resolve_date("yesterday", today) == "2026-02-28"
    assert resolve_date("today", today) == "2026-03-01"
    assert resolve_date("2026-01-05") == "2026-01-05"
    assert resolve_date(None) is None
    with pytest.raises(ValueError, match="--date"):
        resolve_date("05/01/2026")
    assert resolve_run_id(None, "2026-01-05") == "2026-01-05"
    assert resolve_run_id("mine", "2026-01-05") == "mine"
    forced = resolve_run_id(None, "2026-01-05", force=True)
    assert forced.startswith("2026-01-05-") and forced != resolve_run_id(None, "2026-01-05", True)
    assert resolve_run_id(None, None) is None


@pytest.mark.slow
def test_nightly_rerun_rules(tmp_path, monkeypatch, capsys) -> None:
    fixtures = build_fixtures(tmp_path / "fixtures")
    write_corpus(LOCAL_FS, str(tmp_path / "in" / "2026-11-26"), corpus_rows(10), "jsonl", files=2)
    config = tmp_path / "nightly.yaml"
    config.write_text(
        job_yaml(
            fixtures,
            task="summarize",
            input_uri=str(tmp_path / "in" / "{date}" / "*.jsonl"),
            output_uri=str(tmp_path / "out"),
            extra={"run": {"num_cpus": 8}},
        )
    )
    run_dir = tmp_path / "out" / "2026-11-26"

    # An attempt that dies after writing its rows but before finishing: the date is unfinished.
    def crash(*args, **kwargs):
        raise RuntimeError("driver lost")

    monkeypatch.setattr(pipeline.runner, "collect", crash)
    assert cli_main(["run", str(config), "--date", "2026-11-26"]) == 1
    first_parts = sorted(p.name for p in run_dir.glob("part-*"))
    assert first_parts and not (run_dir / "_SUCCESS").exists()
    monkeypatch.undo()

    # Rerunning the unfinished date resumes it: every row was committed, nothing is regenerated.
    assert cli_main(["run", str(config), "--date", "2026-11-26"]) == 0
    assert (run_dir / "_SUCCESS").exists()
    assert sorted(p.name for p in run_dir.glob("part-*")) == first_parts

    # Rerunning a finished date is a no-op.
    listing = sorted(p.name for p in run_dir.iterdir())
    capsys.readouterr()
    assert cli_main(["run", str(config), "--date", "2026-11-26"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert sorted(p.name for p in run_dir.iterdir()) == listing

    # Answered from the run directory, with no Ray started: nothing to do, a changed config and
    # a run held by a live driver.
    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init called for an answer the run directory gives")

    monkeypatch.setattr("ray.init", no_ray)
    assert cli_main(["run", str(config), "--date", "2026-11-26"]) == 0
    assert "already complete" in capsys.readouterr().out
    hotter = ["--set", "generation.temperature=0.7"]
    assert cli_main(["run", str(config), "--date", "2026-11-26", *hotter]) == 2
    assert "generation.temperature" in capsys.readouterr().err
    (run_dir / "_SUCCESS").rename(run_dir / "_SUCCESS.kept")
    lease = {
        "token": "other",
        "holder": {"host": "elsewhere", "pid": 1, "since": time.time()},
        "heartbeat_at": time.time(),
    }
    (run_dir / "_lease.json").write_text(json.dumps(lease))
    assert cli_main(["run", str(config), "--date", "2026-11-26"]) == 2
    assert "in progress on host elsewhere" in capsys.readouterr().err
    (run_dir / "_lease.json").unlink()
    (run_dir / "_SUCCESS.kept").rename(run_dir / "_SUCCESS")
    monkeypatch.undo()

    # --force starts a new run id for the same date.
    assert cli_main(["run", str(config), "--date", "2026-11-26", "--force"]) == 0
    forced = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("2026-11-26-")]
    assert len(forced) == 1 and (forced[0] / "_SUCCESS").exists()


def _container_command(spec: dict) -> list[str]:
    return shlex.split(spec["entrypoint"])


def _check_cli_command(argv: list[str]) -> None:
    assert argv[0] == "rgbatch"
    args = build_parser().parse_args(argv[1:])
    assert (REPO / args.config).resolve() == NIGHTLY.resolve()
    assert args.date == "yesterday"


def test_nightly_job_config_is_valid() -> None:
    config = load_job_config(NIGHTLY, environ=ENV, date="2026-11-26", run_id="2026-11-26")
    assert config.input.uri == "s3://corpora/news/2026-11-26/*.jsonl.gz"
    assert config.model.replicas == 4 and config.model.gpus_per_replica == 1


def test_kuberay_files_run_the_cli_and_request_the_configured_gpus() -> None:
    config = load_job_config(NIGHTLY, environ=ENV, date="2026-11-26", run_id="x")
    job = yaml.safe_load((REPO / "jobs" / "kuberay" / "rayjob-nightly-summarize.yaml").read_text())
    cron = yaml.safe_load(
        (REPO / "jobs" / "kuberay" / "raycronjob-nightly-summarize.yaml").read_text()
    )
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert cron["spec"]["jobTemplate"] == job["spec"]
    assert len(cron["spec"]["schedule"].split()) == 5
    _check_cli_command(_container_command(job["spec"]))

    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = 0.0
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        per_pod = float(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
        gpus += group["replicas"] * per_pod
    assert gpus == config.model.replicas * config.model.gpus_per_replica
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_cron_line_submits_the_same_command() -> None:
    lines = [
        line
        for line in (REPO / "jobs" / "cron" / "nightly-summarize.cron").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    assert len(fields[:5]) == 5
    command = shlex.split(fields[5].split("&&", 1)[1].split(">>")[0])
    env, argv = command[0], command[1:]
    assert env.startswith("RAY_ADDRESS=http")
    assert argv[0].endswith("rgbatch") and argv[1] == "submit"
    args = build_parser().parse_args(argv[1:])
    assert (REPO / args.config).resolve() == NIGHTLY.resolve() and args.wait


def test_submitting_a_failed_date_again_resumes_it(monkeypatch, capsys) -> None:
    """`rgbatch submit --date D` of a date whose job failed submits attempt 2 of the same run
    (the same --run-id, so the run resumes); a date whose latest attempt succeeded is left alone."""
    import ray.job_submission
    from test_jobs import FakeClient

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    client = FakeClient("http://head:8265")
    client.known["2026-11-26"] = "FAILED"
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", lambda address: client)
    argv = ["submit", str(NIGHTLY), "--date", "2026-11-26", "--address", "http://head:8265"]

    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "run 2026-11-26: attempt 2 submitted as 2026-11-26--a2 (resumes the run)" in out
    (submitted,) = client.submitted
    command = shlex.split(submitted["entrypoint"])
    assert command[command.index("--run-id") + 1] == "2026-11-26"
    assert command[command.index("--date") + 1] == "2026-11-26"

    client.known["2026-11-26--a2"] = "SUCCEEDED"
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "already on the cluster as 2026-11-26--a2, not resubmitted; status SUCCEEDED" in out
    assert len(client.submitted) == 1
