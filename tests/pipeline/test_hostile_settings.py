"""Settings a hostile (or careless) user gives, refused before any work or survived (issue 21).

Each case shows the bad setting named (in the exit-2 message, or the failure), that nothing was
written for the refused run, and that a corrected rerun of the same run id finishes:

- case 4: a GPU request the local node cannot meet is exit 2 (the CLI's own cluster); on any
  other cluster the run waits ``run.resource_wait_s`` for room, then fails naming the request;
- case 7: an output inside the input reached through ``..`` or a symlink (local), or ``..`` in
  object-store keys, is refused;
- case 8: a template with ``{text}`` twice, and integers past int32, are config errors;
- case 9: a "billion laughs" YAML document is refused before anything expands it;
- case 10: a URI password holding ``?``, a space or ``"`` is masked whole;
- an ``output.uri`` that is a regular file (or below one) is exit 2 before Ray starts;
- a driver SIGKILLed between ``_SUCCESS`` and removing its checkpoint: the next run of the run
  id removes the ``_checkpoint/`` and the dead driver's ``_lease.json`` it left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import ray
import yaml
from pipeline_helpers import (
    check_complete_run,
    corpus_rows,
    job_config,
    job_yaml,
    kill_tree,
    write_corpus,
)

from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, load_job_config
from pipeline.contract import LEASE
from pipeline.resources import ResourcesUnavailable, check_node_fits
from pipeline.runner import run_job
from pipeline.secrets import mask_text, mask_uri

LOCAL = fsspec.filesystem("file")
ROWS = 6


def corpus(tmp_path: Path) -> list[dict]:
    rows = corpus_rows(ROWS)
    write_corpus(LOCAL, str(tmp_path / "in"), rows, "jsonl", files=2)
    return rows


def job_file(fixtures, tmp_path: Path, **extra) -> Path:
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in" / "*.jsonl"),
        output_uri=str(tmp_path / "out"),
        extra={"toxicity": {"enabled": False}, **extra},
    )
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI must refuse before it starts Ray: starting it fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a config that should have been refused")

    monkeypatch.setattr(ray, "init", refuse)


def rerun_finishes(path: Path, tmp_path: Path, run_id: str, rows: list[dict]) -> None:
    """The corrected config, under the same run id, runs to _SUCCESS with every row once."""
    result = run_job(job_config(path.read_text(), run_id=run_id))
    assert result.status == "succeeded"
    check_complete_run(LOCAL, str(tmp_path / "out" / run_id), rows)


# Case 4: an impossible resource request ---------------------------------------------------------


def test_case4_impossible_gpu_request_local_exit2(fixtures, tmp_path) -> None:
    """``rgbatch run`` on a machine without a GPU (none visible), starting its own cluster."""
    rows = corpus(tmp_path)
    path = job_file(fixtures, tmp_path)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    args = [sys.executable, "-m", "pipeline.cli", "run", str(path), "--run-id", "gpu"]
    started = time.monotonic()
    with subprocess.Popen(
        [*args, "--set", "model.gpus_per_replica=1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as refused:
        try:
            output, _ = refused.communicate(timeout=300)
        finally:
            kill_tree(refused)
    took = time.monotonic() - started
    assert refused.returncode == 2, output[-3000:]
    assert "model.gpus_per_replica: each model actor asks for 1 GPU" in output
    assert "has 0" in output and "set 0 to run on CPU" in output
    assert not (tmp_path / "out").exists()  # nothing written: no run directory, no _run.json
    print(f"impossible GPU request refused in {took:.1f} s (Ray start included)")
    # The corrected config, same run id: the CLI runs it to the end.
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_complete_run(LOCAL, str(tmp_path / "out" / "gpu"), rows)


def test_case4_node_check_names_each_setting(fixtures, tmp_path) -> None:
    """Each stage alone, then one actor of each stage together, against one node's resources."""
    corpus(tmp_path)
    text = job_file(fixtures, tmp_path).read_text()
    node = {"CPU": 8.0, "GPU": 1.0, "memory": 1e10}
    check_node_fits(load_job_config(text=text, overrides=["model.gpus_per_replica=1"]), node)
    tpu = load_job_config(text=text, overrides=["model.resources_per_replica={TPU: 4}"])
    with pytest.raises(ConfigError, match=r"model\.resources_per_replica\.TPU: each model actor"):
        check_node_fits(tpu, node)
    cpus = load_job_config(text=text, overrides=["model.cpus_per_replica=12"])
    with pytest.raises(ConfigError, match=r"model\.cpus_per_replica: each model actor asks for 12"):
        check_node_fits(cpus, node)
    # Each fits alone; the model replica and the toxicity actor cannot hold the GPU together.
    both = load_job_config(
        text=text,
        overrides=[
            "model.gpus_per_replica=1",
            "toxicity.enabled=true",
            f"toxicity.checkpoint={fixtures['detoxify']}",
            "toxicity.gpus_per_replica=1",
        ],
    )
    with pytest.raises(ConfigError) as refused:
        check_node_fits(both, node)
    assert refused.value.errors[0][0] == "model.gpus_per_replica"
    assert "needs 2 GPU at once (model 1, toxicity 1)" in refused.value.errors[0][1]


def test_case4_impossible_request_on_a_cluster_waits_then_fails(
    fixtures, tmp_path, ray_cluster
) -> None:
    """A cluster the driver joined (here: a local one, with no TPU): the run waits
    ``run.resource_wait_s`` for room, then fails naming the request; it wrote nothing."""
    rows = corpus(tmp_path)
    path = job_file(fixtures, tmp_path)
    text = path.read_text()
    config = job_config(
        text,
        run_id="tpu",
        overrides=["model.resources_per_replica={TPU: 4}", "run.resource_wait_s=3"],
    )
    started = time.monotonic()
    with pytest.raises(ResourcesUnavailable) as failed:
        run_job(config)
    waited = time.monotonic() - started
    message = str(failed.value)
    assert "after waiting 3 s (run.resource_wait_s)" in message
    assert "model.resources_per_replica.TPU: each model actor asks for 4 TPU" in message
    assert "no node of the cluster has that many (the most: 0)" in message
    assert 3 <= waited < 30
    assert not (tmp_path / "out").exists()
    # The request met (no TPU asked), same run id: it finishes.
    rerun_finishes(path, tmp_path, "tpu", rows)
    print(f"impossible request failed after {waited:.1f} s (limit 3 s)")


# Case 7: output inside the input, reached through ".." or a symlink --------------------------


def test_case7_output_inside_input_through_dotdot_or_symlink_exit2(
    fixtures, tmp_path, capsys, ray_cluster, no_ray, monkeypatch
) -> None:
    rows = corpus(tmp_path)
    (tmp_path / "in" / "x").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "in")
    path = job_file(fixtures, tmp_path)
    sneaky = {
        "output.uri": f"{tmp_path}/in/x/../loop/out",
        "run.checkpoint_uri": f"{tmp_path}/link/ckpt",
    }
    for where, uri in sneaky.items():
        for command in (["validate"], ["run", "--run-id", "loop"]):
            assert cli_main([*command, str(path), "--set", f"{where}={uri}"]) == 2
            assert f"{where}: {uri} is inside the input location" in capsys.readouterr().err
    assert cli_main(["run", str(path), "--set", f"output.uri={tmp_path}/link/out"]) == 2
    assert "output.uri" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == [
        "in-000.jsonl",
        "in-001.jsonl",
        "x",
    ]
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    rerun_finishes(path, tmp_path, "loop", rows)


def test_case7_object_store_keys_compared_as_written_and_normalised(tmp_path, capsys) -> None:
    """An object store keeps ``..`` as part of a key: both forms are compared."""
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/hostile-case7/in/a.jsonl", b'{"id": "1", "text": "x"}\n')
    fs.mkdir("/hostile-case7/ckpt")
    base = {
        "task": "summarize",
        "input": {"uri": "memory://hostile-case7/in/*.jsonl"},
        "model": {"checkpoint": "memory://hostile-case7/ckpt"},
        "toxicity": {"enabled": False},
    }
    for uri in (
        "memory://hostile-case7/in/x/../../out",  # the keys live under in/x/.. as written
        "memory://hostile-case7/other/../in/out",  # normalised, it is in/out
    ):
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump({**base, "output": {"uri": uri}}))
        assert cli_main(["validate", str(config)]) == 2
        assert f"output.uri: {uri} is inside the input location" in capsys.readouterr().err
    fs.rm("/hostile-case7", recursive=True)


# Case 8: settings that validated, then failed in an actor ------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "prompts.summarize=Summarize {text}, then again {text}",
            "prompts.summarize: template must use {text} exactly once",
        ),
        (
            "generation.max_new_tokens=2147483648",
            "generation.max_new_tokens: must fit a 32-bit integer (at most 2,147,483,647), "
            "got 2,147,483,648",
        ),
        ("generation.top_k=4294967296", "generation.top_k: must fit a 32-bit integer"),
        ("generation.max_slots=2147483648", "generation.max_slots: must fit a 32-bit integer"),
        ("generation.prefill_chunk=2147483648", "generation.prefill_chunk: must fit a 32-bit"),
        ("generation.max_new_tokens=2147483647", "generation.max_new_tokens: with max_prompt"),
    ],
)
def test_case8_late_failing_settings_are_config_errors(
    fixtures, tmp_path, capsys, no_ray, override, message
) -> None:
    corpus(tmp_path)
    path = job_file(fixtures, tmp_path)
    assert cli_main(["validate", str(path), "--set", override]) == 2
    assert message in capsys.readouterr().err
    assert cli_main(["run", str(path), "--run-id", "late", "--set", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no _run.json: the run id is still free


def test_case8_corrected_rerun_of_the_refused_run_id_finishes(
    fixtures, tmp_path, capsys, ray_cluster
) -> None:
    rows = corpus(tmp_path)
    path = job_file(fixtures, tmp_path)
    for override in (
        "prompts.summarize=Summarize {text} / {text}",
        "generation.max_new_tokens=2147483648",
    ):
        assert cli_main(["run", str(path), "--run-id", "late", "--set", override]) == 2
    assert not (tmp_path / "out").exists()
    rerun_finishes(path, tmp_path, "late", rows)


# Case 9: YAML aliases expanded before validation ----------------------------------------------


def billion_laughs(levels: int = 9) -> str:
    lines = ['lol0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_case9_yaml_alias_bomb_refused_before_copying(
    fixtures, tmp_path, capsys, ray_cluster, no_ray, monkeypatch
) -> None:
    rows = corpus(tmp_path)
    path = job_file(fixtures, tmp_path)
    good = path.read_text()
    # 9**10 (3.5 billion) strings once expanded, 11 lines of YAML.
    path.write_text(good + billion_laughs())
    started = time.monotonic()
    assert cli_main(["validate", str(path)]) == 2
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert "<root>: with its YAML aliases (*name) expanded, the document holds more than" in err
    assert took < 10, f"refusing took {took:.1f} s"
    assert cli_main(["run", str(path), "--run-id", "laughs"]) == 2
    # The same bomb in a --set value (10**6 values), and an alias inside itself.
    levels = ["&l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 6)]
    path.write_text(good)
    assert cli_main(["run", str(path), "--set", f"input.passthrough=[{', '.join(levels)}]"]) == 2
    assert "--set input.passthrough: with its YAML aliases" in capsys.readouterr().err
    path.write_text(good + "loop: &loop [*loop]\n")
    assert cli_main(["run", str(path), "--run-id", "laughs"]) == 2
    assert "<root>: a YAML alias refers to a node that contains it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # Aliases a config uses for what they are for still work: one storage_options block twice.
    data = yaml.safe_load(good)
    data["input"]["storage_options"] = {"auto_mkdir": True}
    text = yaml.safe_dump(data).replace("storage_options:\n", "storage_options: &opts\n", 1)
    text = text.replace("output:\n", "output:\n  storage_options: *opts\n", 1)
    assert "*opts" in text
    path.write_text(text)
    monkeypatch.undo()
    config = load_job_config(path, run_id="laughs")
    assert config.output.storage_options == {"auto_mkdir": True}
    rerun_finishes(path, tmp_path, "laughs", rows)


# Case 10: a URI password with "?", a space or a quote ------------------------------------------

PASSWORDS = ("Pa55?w0rd", "Pa55 w0rd", 'Pa55"w0rd', "Pa55#w/0rd?")


@pytest.mark.parametrize("password", PASSWORDS)
def test_case10_password_with_question_mark_space_or_quote_masked(password: str) -> None:
    uri = f"https://alice:{password}@host.example.com/x.jsonl?sig=s1gn"
    assert mask_uri(uri) == "https://***@host.example.com/x.jsonl?sig=***"
    text = mask_text(f"GET {uri} failed; and 's3://k:{password}@bucket/key'.")
    assert (
        text
        == "GET https://***@host.example.com/x.jsonl?sig=*** failed; and 's3://***@bucket/key'."
    )
    assert mask_text(json.dumps({"uri": uri})) == json.dumps({"uri": mask_uri(uri)})
    assert mask_uri(mask_uri(uri)) == mask_uri(uri)  # idempotent


@pytest.mark.parametrize("password", PASSWORDS)
def test_case10_cli_output_and_errors_have_no_password(
    fixtures, tmp_path, capsys, password
) -> None:
    corpus(tmp_path)
    path = job_file(fixtures, tmp_path)
    output = f"https://alice:{password}@storage.example.com/out"
    assert cli_main(["validate", str(path), "--set", f"output.uri={output}"]) == 0
    assert "https://***@storage.example.com/out" in capsys.readouterr().out
    # exit 2 messages: a preflight error naming the URI, and a type error quoting the value
    bad_input = f"memory://alice:{password}@corpora/none/*.jsonl"
    override = ["--set", f"input.uri={bad_input}", "--set", "input.format=jsonl"]
    assert cli_main(["validate", str(path), *override]) == 2
    err = capsys.readouterr().err
    assert "input.uri: no files match memory://***@corpora/none/*.jsonl" in err
    assert cli_main(["validate", str(path), "--set", f"run.num_cpus={output}"]) == 2
    err += capsys.readouterr().err
    assert "run.num_cpus" in err
    for piece in ("alice", "Pa55", "w0rd"):
        assert piece not in err


# Smaller: an output.uri that is a file; a kill after _SUCCESS ----------------------------------


def test_output_uri_that_is_a_file_exit2_before_ray(
    fixtures, tmp_path, capsys, ray_cluster, no_ray, monkeypatch
) -> None:
    rows = corpus(tmp_path)
    path = job_file(fixtures, tmp_path)
    (tmp_path / "out").write_text("not a directory\n")
    assert cli_main(["run", str(path), "--run-id", "file"]) == 2
    assert f"output.uri: {tmp_path}/out: it is a file, not a directory" in capsys.readouterr().err
    below = f"{tmp_path}/out/deeper"
    assert cli_main(["run", str(path), "--run-id", "file", "--set", f"output.uri={below}"]) == 2
    assert f"{below}: {tmp_path}/out is a file" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "not a directory\n"
    (tmp_path / "out").unlink()
    monkeypatch.undo()
    rerun_finishes(path, tmp_path, "file", rows)


KILL_AFTER_SUCCESS = """
import os, signal, sys
import pipeline.runner
def killed(fs, config, run_dir):
    os.kill(os.getpid(), signal.SIGKILL)
pipeline.runner.drop_checkpoint = killed  # the removal after _SUCCESS
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_driver_killed_after_success_leaves_nothing_behind(fixtures, tmp_path) -> None:
    rows = corpus(tmp_path)
    path = job_file(fixtures, tmp_path)
    run_dir = tmp_path / "out" / "kill"
    with (tmp_path / "run.log").open("wb") as log:
        first = subprocess.Popen(
            [sys.executable, "-c", KILL_AFTER_SUCCESS, "run", str(path), "--run-id", "kill"],
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        status = first.wait(timeout=600)
    finally:
        kill_tree(first)  # the Ray processes the killed driver left
    assert status == -9, (tmp_path / "run.log").read_text()[-3000:]
    assert (run_dir / "_SUCCESS").exists()
    assert (run_dir / "_checkpoint").is_dir() and (run_dir / LEASE).exists()
    parts = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("part-*")}
    # The next run of the run id: complete, nothing generated again, the leftovers gone.
    result = run_job(job_config(path.read_text(), run_id="kill"))
    assert result.status == "already_complete"
    assert not (run_dir / "_checkpoint").exists() and not (run_dir / LEASE).exists()
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.glob("part-*")} == parts
    check_complete_run(LOCAL, str(run_dir), rows)


def test_a_live_drivers_lease_on_a_finished_run_is_left_alone(tmp_path) -> None:
    """Only a dead driver's lease (and then the checkpoint) is removed from a finished run."""
    from pipeline.contract import release_dead_lease

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    live = {
        "token": "t",
        "holder": {"host": "elsewhere", "pid": 1, "since": time.time()},
        "heartbeat_at": time.time(),
    }
    (run_dir / LEASE).write_text(json.dumps(live))
    assert not release_dead_lease(str(run_dir), {}, timeout_s=60)
    assert (run_dir / LEASE).exists()
    (run_dir / LEASE).write_text(json.dumps({**live, "heartbeat_at": time.time() - 61}))
    assert release_dead_lease(str(run_dir), {}, timeout_s=60)
    assert not (run_dir / LEASE).exists()
