"""A run that cannot be wedged, mixed up or leaked: repeated ids, unparseable lines, preflight of
columns and locations, the error policy, one configuration per run id, one driver at a time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
import pytest
import ray
from pipeline_helpers import (
    check_complete_run,
    corpus_rows,
    job_config,
    job_yaml,
    read_output,
    write_corpus,
)
from pydantic.fields import FieldInfo

import pipeline.rundir
import pipeline.runner
from pipeline import columns as S
from pipeline.cli import main as cli_main
from pipeline.contract import LEASE, Lease, RunRefused, identity_fields, identity_mark
from pipeline.runner import RunFailed, run_job

LOCAL = fsspec.filesystem("file")


def yaml_for(fixtures, tmp_path, **extra) -> str:
    return job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in" / "*.jsonl"),
        output_uri=str(tmp_path / "out"),
        extra=extra,
    )


def crash(*args, **kwargs):
    raise RuntimeError("driver lost after the data was written")


def test_repeated_ids_never_wedge_a_run_or_lose_a_row(
    tmp_path, fixtures, ray_cluster, monkeypatch
) -> None:
    rows = corpus_rows(5)
    for row, row_id in zip(rows, ["a", "b", "a", 42, "42"], strict=True):
        row["id"] = row_id
    write_corpus(LOCAL, str(tmp_path / "in"), rows, "jsonl", files=1)
    text = yaml_for(fixtures, tmp_path)
    # An attempt dies after writing its rows; the rerun resumes and finishes exactly.
    monkeypatch.setattr(pipeline.runner, "collect", crash)
    with pytest.raises(RuntimeError, match="driver lost"):
        run_job(job_config(text, run_id="dup"))
    monkeypatch.undo()
    result = run_job(job_config(text, run_id="dup"))
    table = read_output(LOCAL, str(tmp_path / "out" / "dup"), "parquet")
    assert sorted(table.column(S.ID).to_pylist()) == ["42", "42", "a", "a", "b"]
    assert len(set(table.column(S.ROW_KEY).to_pylist())) == 5
    counts = result.manifest["counts"]
    assert counts["rows"] == 5
    # "a" repeats; 42 and "42" are different ids.
    assert counts["ids_repeated"] == 1 and counts["rows_with_repeated_ids"] == 2
    # Past the one-task size the count is a Ray Data group-by: the same figures.
    monkeypatch.setattr(pipeline.rundir, "SMALL_ID_COUNT", 0)
    run_uri = str(tmp_path / "out" / "dup")
    by_shuffle = pipeline.rundir.count_repeats(run_uri, {}, pafs.LocalFileSystem(), rows=5)
    assert by_shuffle == {"ids_repeated": 1, "rows_with_repeated_ids": 2}


def test_a_line_nested_too_deep_is_an_error_row(tmp_path, fixtures, ray_cluster) -> None:
    (tmp_path / "in").mkdir()
    good = [json.dumps(r) for r in corpus_rows(3)]
    (tmp_path / "in" / "x.jsonl").write_text("\n".join([*good, "[" * 60_000]) + "\n")
    result = run_job(job_config(yaml_for(fixtures, tmp_path), run_id="deep"))
    assert result.status == "succeeded"
    assert result.manifest["counts"]["rows"] == 4
    assert result.manifest["counts"]["error_kinds"] == {"invalid_json": 1}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("input.text_column=txt", "input.text_column: column 'txt' is not in"),
        ("input.id_column=doc_id", "input.id_column: column 'doc_id' is not in"),
        ("input.passthrough=[title,titel]", "input.passthrough: column 'titel' is not in"),
    ],
)
def test_preflight_names_missing_columns(tmp_path, fixtures, capsys, override, message) -> None:
    write_corpus(LOCAL, str(tmp_path / "in"), corpus_rows(3), "jsonl", files=1)
    config = tmp_path / "job.yaml"
    config.write_text(yaml_for(fixtures, tmp_path))
    assert cli_main(["run", str(config), "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "columns found: id, prompt, question, text, title" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["output.uri", "run.checkpoint_uri"])
def test_preflight_refuses_outputs_inside_the_input(tmp_path, fixtures, capsys, where) -> None:
    write_corpus(LOCAL, str(tmp_path / "in"), corpus_rows(3), "jsonl", files=1)
    config = tmp_path / "job.yaml"
    config.write_text(yaml_for(fixtures, tmp_path))
    inside = tmp_path / "in" / "results"
    assert cli_main(["run", str(config), "--set", f"{where}={inside}"]) == 2
    assert f"{where}: {inside} is inside the input location" in capsys.readouterr().err
    assert not inside.exists() and not (tmp_path / "out").exists()


def test_too_many_error_rows_fail_the_run(tmp_path, fixtures, ray_cluster) -> None:
    rows = corpus_rows(6)
    for row in rows[:4]:
        row["text"] = None
    write_corpus(LOCAL, str(tmp_path / "in"), rows, "jsonl", files=1)
    config = job_config(yaml_for(fixtures, tmp_path), run_id="errors")
    with pytest.raises(RunFailed, match=r"4 of 6 rows are errors \(67%\).*missing_text 4"):
        run_job(config)
    run_dir = tmp_path / "out" / "errors"
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert manifest["status"] == "failed" and "missing_text 4" in manifest["error"]
    assert not (run_dir / "_SUCCESS").exists()
    # A failed run still has its report, marked failed, and `rgbatch report` rebuilds it.
    page = (run_dir / "report.html").read_text()
    assert 'class="badge bad">failed<' in page and manifest["report"]["status"] == "written"
    (run_dir / "report.html").unlink()
    assert cli_main(["report", str(run_dir)]) == 0
    assert 'class="badge bad">failed<' in (run_dir / "report.html").read_text()
    # A looser policy, under a new run id, accepts the same rows.
    loose = job_config(
        yaml_for(fixtures, tmp_path, run={"max_error_fraction": 0.8}), run_id="errors-ok"
    )
    assert run_job(loose).status == "succeeded"


def test_a_run_id_keeps_one_configuration(tmp_path, fixtures, ray_cluster, monkeypatch) -> None:
    write_corpus(LOCAL, str(tmp_path / "in"), corpus_rows(4), "jsonl", files=1)
    base = yaml_for(fixtures, tmp_path)
    assert run_job(job_config(base, run_id="one")).status == "succeeded"
    hotter = yaml_for(fixtures, tmp_path, generation={"temperature": 0.7})
    with pytest.raises(RunRefused) as refused:
        run_job(job_config(hotter, run_id="one"))
    assert [path for path, _ in refused.value.errors] == ["generation.temperature", "run_id"]
    assert "started with 0.0, now 0.7" in str(refused.value)

    # An unfinished run too: the output format cannot change under it.
    monkeypatch.setattr(pipeline.runner, "collect", crash)
    with pytest.raises(RuntimeError):
        run_job(job_config(base, run_id="two"))
    monkeypatch.undo()
    as_jsonl = yaml_for(fixtures, tmp_path, output={"format": "jsonl"})
    with pytest.raises(RunRefused, match=r"output\.format"):
        run_job(job_config(as_jsonl, run_id="two"))
    assert run_job(job_config(base, run_id="two")).status == "succeeded"


def test_one_driver_at_a_time_and_a_dead_drivers_lease_is_taken_over(
    tmp_path, fixtures, ray_cluster
) -> None:
    write_corpus(LOCAL, str(tmp_path / "in"), corpus_rows(3), "jsonl", files=1)
    text = yaml_for(fixtures, tmp_path, run={"lease_timeout_s": 30})
    run_dir = tmp_path / "out" / "leased"
    run_dir.mkdir(parents=True)
    holder = {"host": "cron-box", "pid": 4242, "since": time.time() - 60}
    lease = {"token": "someone-else", "holder": holder, "heartbeat_at": time.time()}
    (run_dir / LEASE).write_text(json.dumps(lease))
    with pytest.raises(RunRefused, match=r"in progress on host cron-box \(pid 4242"):
        run_job(job_config(text, run_id="leased"))
    assert not (run_dir / "_SUCCESS").exists()

    # A driver on this host that was killed a moment ago: its fresh lease is taken over at once.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    here = {"host": socket.gethostname(), "pid": int(gone.stdout), "since": time.time()}
    (run_dir / LEASE).write_text(json.dumps({**lease, "holder": here}))
    assert run_job(job_config(text, run_id="leased")).status == "succeeded"
    assert not (run_dir / LEASE).exists()  # released at the end

    # A driver elsewhere that died: taken over once its heartbeat is older than the timeout.
    stale_dir = tmp_path / "out" / "stale"
    stale_dir.mkdir()
    (stale_dir / LEASE).write_text(json.dumps({**lease, "heartbeat_at": time.time() - 31}))
    assert run_job(job_config(text, run_id="stale")).status == "succeeded"
    assert not (stale_dir / LEASE).exists()


@pytest.mark.slow
def test_no_ray_address_means_a_ray_of_the_runs_own(tmp_path, fixtures) -> None:
    """A stale /tmp/ray/ray_current_cluster (left by an earlier `ray start --head`) is not joined."""
    write_corpus(LOCAL, str(tmp_path / "in"), corpus_rows(3), "jsonl", files=1)
    config = tmp_path / "job.yaml"
    config.write_text(yaml_for(fixtures, tmp_path, toxicity={"enabled": False}))
    marker = Path("/tmp/ray/ray_current_cluster")
    saved = marker.read_bytes() if marker.exists() else None
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("127.0.0.1:9")  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "run", str(config), "--run-id", "own"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        if saved is None:
            marker.unlink(missing_ok=True)
        else:
            marker.write_bytes(saved)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "own" / "_SUCCESS").exists()


def test_a_refused_run_exits_2_and_a_failed_one_exits_1(tmp_path, fixtures, monkeypatch) -> None:
    write_corpus(LOCAL, str(tmp_path / "in"), corpus_rows(3), "jsonl", files=1)
    config = tmp_path / "job.yaml"
    config.write_text(yaml_for(fixtures, tmp_path))
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})  # the node's check
    for error, code in ((RunRefused.at("run_id", "held"), 2), (RunFailed("too many errors"), 1)):

        def refuse(config, error=error):
            raise error

        monkeypatch.setattr(pipeline.runner, "run_job", refuse)
        assert cli_main(["run", str(config), "--run-id", "x"]) == code


def test_every_config_field_is_marked_for_the_run_identity() -> None:
    """Walks the schema: each field says whether it decides the outputs, so none is forgotten."""
    marks = identity_fields()
    assert len(marks) > 60 and set(marks.values()) <= {True, False, "content"}
    # A field added without a mark fails loudly instead of being left out of the identity.
    with pytest.raises(ValueError, match="not marked"):
        identity_mark(FieldInfo(default=1))
    decides = {path for path, mark in marks.items() if mark}
    assert {"input.uri", "input.format", "input.max_row_bytes", "output.format"} <= decides
    assert {"model.checkpoint", "toxicity.checkpoint"} <= {
        p for p, m in marks.items() if m == "content"
    }
    assert not decides & {"model.replicas", "generation.max_slots", "run.checkpoint_uri"}


def test_a_rerun_with_another_row_limit_or_date_is_refused(
    tmp_path, fixtures, ray_cluster, monkeypatch, capsys
) -> None:
    """Issue 18 (input.max_row_bytes decides which rows are row_too_large errors) and issue 21
    case 2 (another --date is another input): refused with exit 2, naming the field, and nothing
    of the finished run is touched."""
    for day in ("2026-11-27", "2026-11-28"):
        write_corpus(LOCAL, str(tmp_path / "in" / day), corpus_rows(3), "jsonl", files=1)
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in" / "{date}" / "*.jsonl"),
        output_uri=str(tmp_path / "out"),
        extra={"toxicity": {"enabled": False}},
    )
    assert run_job(job_config(text, run_id="dated")).status == "succeeded"
    run_dir = tmp_path / "out" / "dated"
    before = sorted(p.name for p in run_dir.iterdir())
    identity = json.loads((run_dir / "_run.json").read_text())["identity"]
    assert identity["input.uri"] == str(tmp_path / "in" / "2026-11-27" / "*.jsonl")
    assert identity["input.max_row_bytes"] == 32 << 20

    config = tmp_path / "job.yaml"
    config.write_text(text)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    base = ["run", str(config), "--run-id", "dated", "--date", "2026-11-27"]
    assert cli_main([*base, "--set", "input.max_row_bytes=2048"]) == 2
    err = capsys.readouterr().err
    assert "input.max_row_bytes: run dated was started with 33554432, now 2048" in err
    assert cli_main(["run", str(config), "--run-id", "dated", "--date", "2026-11-28"]) == 2
    err = capsys.readouterr().err
    assert "input.uri: run dated was started with" in err and "2026-11-28" in err
    assert "use a new run id" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before
    # The same date and limit is the same run: already complete.
    assert cli_main(base) == 0


def test_runs_sharing_a_checkpoint_uri_both_finish(tmp_path, fixtures, ray_cluster) -> None:
    """Issue 21 case 3: a fixed run.checkpoint_uri shared by two run ids; each run id has its
    own checkpoint under it, so the second does not take the first's rows as committed."""
    rows = corpus_rows(5)
    write_corpus(LOCAL, str(tmp_path / "in"), rows, "jsonl", files=2)
    shared = tmp_path / "checkpoints"
    text = yaml_for(fixtures, tmp_path, run={"checkpoint_uri": str(shared)})
    for run_id in ("c1", "c2"):
        result = run_job(job_config(text, run_id=run_id))
        assert result.status == "succeeded"
        check_complete_run(LOCAL, str(tmp_path / "out" / run_id), rows)
        assert (shared / run_id).is_dir()
    templated = yaml_for(fixtures, tmp_path, run={"checkpoint_uri": str(shared / "t-{run_id}")})
    assert pipeline.rundir.checkpoint_uri(job_config(templated, run_id="c3")) == str(
        shared / "t-c3"
    )


def test_the_joined_cluster_is_described(ray_cluster) -> None:
    from pipeline.cli import _cluster_line

    cpus = ray.cluster_resources()["CPU"]
    assert _cluster_line() == f"1 node, {cpus:g} CPUs"


_SLOW_TO_UNWIND = """
import sys, time
from pipeline.contract import Lease
with Lease(sys.argv[1], {}, 30.0):
    try:  # "held" is said inside the try, so a SIGTERM right after it still reaches the finally
        print("held", flush=True)
        time.sleep(60)
    finally:  # a driver whose unwinding (executor shutdown, uploads) outlasts the stop grace
        print("unwinding", flush=True)
        time.sleep(60)
"""


def test_sigterm_releases_the_lease_before_the_driver_unwinds(tmp_path) -> None:
    """Ray's job stop sends SIGTERM and SIGKILLs 3 s later: the lease must be gone by then,
    however long the rest of the unwinding takes (no Ray needed: a process holding a lease)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_TO_UNWIND, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        assert (run_dir / LEASE).exists()
        child.send_signal(signal.SIGTERM)
        assert child.stdout.readline().strip() == "unwinding"
        assert child.poll() is None  # still unwinding ...
        assert not (run_dir / LEASE).exists()  # ... with the lease already released
    finally:
        child.kill()
        child.wait()


def test_a_lease_restores_the_sigterm_handler_it_replaced(tmp_path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with Lease(str(tmp_path), {}, 30.0):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    assert not (tmp_path / LEASE).exists()
