"""A model replica split over two (virtual CPU) devices, end to end through the pipeline."""

from __future__ import annotations

import fsspec
import pytest
import ray
from pipeline_helpers import (
    corpus_rows,
    job_config,
    job_yaml,
    read_output,
    write_corpus,
)

from pipeline import columns as S
from pipeline.config import ConfigError
from pipeline.model_stage import actor_env, engine_options, model_stage
from pipeline.runner import run_job
from pipeline.stage import PlanContext
from testkit.ray_local import start_local_ray

LOCAL = fsspec.filesystem("file")


@pytest.mark.slow
def test_a_replica_of_two_devices_writes_what_one_device_writes(tmp_path, fixtures) -> None:
    write_corpus(LOCAL, str(tmp_path / "in"), corpus_rows(12), "jsonl", files=2)
    outputs = {}
    start_local_ray(num_cpus=8)
    try:
        for n in (1, 2):
            text = job_yaml(
                fixtures,
                task="summarize",
                input_uri=str(tmp_path / "in" / "*.jsonl"),
                output_uri=str(tmp_path / "out"),
                extra={"model": {"tensor_parallel": n}, "toxicity": {"enabled": False}},
            )
            result = run_job(job_config(text, run_id=f"tp{n}"))
            assert result.status == "succeeded"
            table = read_output(LOCAL, str(tmp_path / "out" / f"tp{n}"), "parquet")
            outputs[n] = dict(
                zip(
                    table.column(S.ID).to_pylist(),
                    table.column(S.OUTPUT_TEXT).to_pylist(),
                    strict=True,
                )
            )
    finally:
        ray.shutdown()
    assert len(outputs[1]) == 12 and outputs[1] == outputs[2]  # greedy: the same tokens


def test_tensor_parallel_follows_the_devices_a_replica_is_given(tmp_path, fixtures) -> None:
    def cfg(**model):
        text = job_yaml(
            fixtures,
            task="summarize",
            input_uri=str(tmp_path / "in.jsonl"),
            output_uri=str(tmp_path / "out"),
            extra={"model": model},
        )
        return job_config(text, run_id="tp")

    assert cfg(gpus_per_replica=2).model.replica_devices == 2
    assert cfg(resources_per_replica={"TPU": 4}).model.replica_devices == 4
    assert cfg().model.replica_devices == 1
    with pytest.raises(ConfigError, match=r"model: .*tensor_parallel 4 does not match the 2"):
        cfg(gpus_per_replica=2, tensor_parallel=4)
    stage = model_stage(cfg(gpus_per_replica=2, memory_fraction=0.6), PlanContext())
    kwargs = stage.constructor_kwargs
    assert engine_options(kwargs["model"], kwargs["generation"])["tensor_parallel"] == 2
    assert stage.ray_args["num_gpus"] == 2
    assert stage.ray_args["runtime_env"] == {"env_vars": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.6"}}
    cpu = actor_env(cfg(tensor_parallel=2))
    assert "--xla_force_host_platform_device_count=2" in cpu["env_vars"]["XLA_FLAGS"]


def test_doctor_prints_devices_and_whether_the_plan_fits(capsys) -> None:
    from pipeline.cli import main as cli_main

    args = ["doctor", "--preset", "9b", "--device-memory-gb", "16", "--max-slots", "16"]
    assert cli_main(args) == 1
    out = capsys.readouterr().out
    assert "local devices:" in out and "cpu" in out
    assert "9b: 18.41 GB per device at tensor_parallel=1" in out
    assert "fits: NO" in out and "tensor_parallel=2: 9.55 GB per device" in out
    assert cli_main([*args, "--tensor-parallel", "2"]) == 0
    assert "fits: yes" in capsys.readouterr().out
    assert (
        cli_main(
            [
                "doctor",
                "--preset",
                "9b",
                "--device-memory-gb",
                "16",
                "--max-slots",
                "auto",
                "--tensor-parallel",
                "2",
            ]
        )
        == 0
    )
    assert "max_slots auto: " in capsys.readouterr().out
