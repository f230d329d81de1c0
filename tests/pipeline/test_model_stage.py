"""The engine worker the model stage drives: batches from several threads share one engine."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from model.engine import Engine, GenerationRequest
from pipeline.model_stage import (
    FAULT_HOOK_ENV,
    EngineStepError,
    EngineWorker,
    fault_hook_from_env,
    is_device_oom,
)
from testkit import faults
from testkit.tiny_model import random_params, tiny_config

CONFIG = tiny_config()


def batch(seed: int, n: int = 30) -> list[GenerationRequest]:
    rng = np.random.default_rng(seed)
    return [
        GenerationRequest(
            rng.integers(2, CONFIG.vocab_size, int(rng.integers(1, 40))).tolist(),
            int(rng.integers(1, 20)),
            stop_ids=(int(rng.integers(2, CONFIG.vocab_size)),),
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def engine():
    return Engine(CONFIG, random_params(CONFIG, 3), max_slots=6, prefill_batch=3, prefill_chunk=16)


def test_concurrent_batches_get_their_own_results(engine) -> None:
    expected = {seed: engine.generate(batch(seed)) for seed in range(4)}
    worker = EngineWorker(engine)
    got: dict[int, list] = {}
    threads = [
        threading.Thread(target=lambda s=seed: got.__setitem__(s, worker.run(batch(s))))
        for seed in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    worker.close()
    assert got == expected


def test_worker_accounts_for_busy_and_idle_time(engine) -> None:
    worker = EngineWorker(engine)
    time.sleep(0.2)  # nothing to do yet: idle
    results = worker.run(batch(11, n=8))
    worker.close()
    assert worker.idle_s >= 0.15
    assert worker.busy_s > 0
    assert worker.busy_s + worker.idle_s <= time.perf_counter() - worker.started
    assert worker.engine_stats.generated_tokens >= sum(r.output_tokens for r in results) - 8


def test_a_failing_engine_fails_the_waiting_batch_and_recovers(engine, monkeypatch) -> None:
    worker = EngineWorker(engine)
    calls = {"n": 0}
    real_step = engine.step

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)
    with pytest.raises(RuntimeError, match="device lost"):
        worker.run(batch(7))
    assert worker.run(batch(8)) == Engine.generate(engine, batch(8))
    worker.close()


def test_a_broken_engine_is_reported_transient_failures_are_not(engine, monkeypatch) -> None:
    broken: list[BaseException] = []
    pending: list[Exception] = []  # the next step raises this, once
    real_step = engine.step

    def step():
        if pending:
            raise pending.pop()
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    worker = EngineWorker(engine, max_failed_steps=2, on_broken=broken.append)
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1024 bytes")
    # transient (1 in a row), a success (resets the count), then 1 and 2 in a row (broken), OOM.
    for failure in (RuntimeError("transient"), None, RuntimeError("again"), RuntimeError("more")):
        if failure is None:
            assert len(worker.run(batch(9, n=2))) == 2
            continue
        pending.append(failure)
        with pytest.raises(EngineStepError, match=str(failure)) as failed:
            worker.run(batch(9, n=2))
        assert failed.value.__cause__ is failure
    assert [str(e) for e in broken] == ["more"]
    pending.append(oom)
    with pytest.raises(EngineStepError, match="RESOURCE_EXHAUSTED"):
        worker.run(batch(9, n=2))
    worker.close()
    assert broken[-1] is oom  # at once, whatever the count
    assert is_device_oom(oom) and not is_device_oom(RuntimeError("device lost"))


def test_fault_hook_runs_before_each_step(engine, monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(FAULT_HOOK_ENV, raising=False)
    assert fault_hook_from_env() is None
    monkeypatch.setenv(FAULT_HOOK_ENV, "testkit.faults:fail_once")
    monkeypatch.setenv(faults.FAULT_STEP_ENV, "2")
    monkeypatch.setenv(faults.FAULT_LOG_ENV, str(tmp_path / "faults.log"))
    hook = fault_hook_from_env()
    assert hook is faults.fail_once
    worker = EngineWorker(engine, fault_hook=hook)
    with pytest.raises(EngineStepError, match="injected transient"):
        worker.run(batch(10, n=12))  # more than one step
    assert worker.run(batch(11, n=2)) == Engine.generate(engine, batch(11, n=2))
    worker.close()
    assert faults.recorded(str(tmp_path / "faults.log")) == [f"transient pid={os.getpid()} step=2"]
