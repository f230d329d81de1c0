"""The engine's host side on its own: no JAX, slots freed and results built from call outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from model.engine_config import EngineConfig
from model.scheduler import (
    CallOutput,
    GenerationRequest,
    GenerationResult,
    Scheduler,
    merge_inserts,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_scheduler_imports_without_jax() -> None:
    code = "import sys, model.scheduler; assert 'jax' not in sys.modules, 'jax imported'"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def admitted(scheduler: Scheduler, requests: list[GenerationRequest]) -> np.ndarray:
    for key, request in enumerate(requests):
        assert scheduler.submit(key, request) is None
    size = scheduler.admission_size(len(scheduler.free_slots()))
    batch = scheduler.next_batch(size)
    plan = scheduler.plan(batch, scheduler.free_slots()[: len(batch)])
    return plan.slots


def test_results_from_an_insert_and_a_decode_call() -> None:
    ec = EngineConfig(max_slots=4, prefill_batch=3, decode_steps=4)
    scheduler = Scheduler(ec, vocab_size=100, prefix_cache=None, prefix_entry_bytes=1)
    requests = [
        GenerationRequest([5, 6], max_new_tokens=3, stop_ids=(9,)),
        GenerationRequest([7], max_new_tokens=1, stop_ids=()),
        GenerationRequest([8, 8, 8], max_new_tokens=10, stop_ids=(9,)),
    ]
    slots = admitted(scheduler, requests)
    assert list(slots) == [0, 1, 2]
    first = CallOutput(
        tokens=np.array([[11], [12], [13]]),
        emitted=np.ones((3, 1), bool),
        stopped=np.zeros((3, 1), bool),
        slots=slots,
    )
    insert = scheduler.retire(first)
    assert scheduler.free_slots() == [1, 3]  # budget 1 reached at the first token
    # Slot 0 reaches its budget after 2 steps; slot 2 draws its stop id at step 3.
    tokens = np.array([[21, 22, 0, 0], [0, 0, 0, 0], [31, 32, 9, 0], [0, 0, 0, 0]])
    emitted = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
    stopped = np.zeros((4, 4), bool)
    stopped[2, 2] = True
    decode = scheduler.retire(CallOutput(tokens, emitted, stopped))
    assert scheduler.free_slots() == [0, 1, 2, 3] and not scheduler.occupied
    assert scheduler.stats.decode_steps == 3 and scheduler.stats.generated_tokens == 4
    done = dict(scheduler.collect([insert, decode]))
    assert done == {
        0: GenerationResult([11, 21, 22], "length", 2, 3),
        1: GenerationResult([12], "length", 1, 1),
        2: GenerationResult([13, 31, 32], "stop", 3, 3),
    }


def test_consecutive_inserts_retire_as_one() -> None:
    ec = EngineConfig(max_slots=6, prefill_batch=2, decode_steps=2)
    requests = [
        GenerationRequest([5, 6], max_new_tokens=1, stop_ids=()),
        GenerationRequest([7], max_new_tokens=3, stop_ids=(9,)),
        GenerationRequest([8, 8], max_new_tokens=2, stop_ids=(9,), n=2, temperature=1.0),
    ]
    done = []
    for merge in (False, True):
        scheduler = Scheduler(ec, vocab_size=100, prefix_cache=None, prefix_entry_bytes=1)
        for key, request in enumerate(requests):
            assert scheduler.submit(key, request) is None
        outputs = []
        for _ in range(2):
            free = scheduler.free_slots()
            batch = scheduler.next_batch(scheduler.admission_size(len(free)), len(free))
            plan = scheduler.plan(batch, free[: sum(req.n for _, req in batch)])
            for k in range(0, len(plan.slots), 2):
                slots = plan.slots[k : k + 2]
                outputs.append(
                    CallOutput(
                        tokens=(slots[:, None] + 10).astype(np.int32),
                        emitted=(slots != 3)[:, None],  # slot 3 draws its stop id
                        stopped=(slots == 3)[:, None],
                        slots=slots,
                    )
                )
        if merge:
            outputs = merge_inserts(outputs)
            assert len(outputs) == 1
        retired = [scheduler.retire(out) for out in outputs]
        tokens = np.zeros((6, 2), np.int32) + 40
        emitted = np.zeros((6, 2), bool)
        emitted[[1, 2], 0] = True  # request 2's samples reach their budget
        retired.append(scheduler.retire(CallOutput(tokens, emitted, np.zeros((6, 2), bool))))
        done.append((scheduler.free_slots(), dict(scheduler.collect(retired))))
    assert done[0] == done[1]
    free, results = done[1]
    assert free == [0, 1, 2, 3, 4, 5]
    # Request 0 and request 2's samples (the most similar length) go first, to slots 0, 1, 2;
    # request 1 then to slot 3, where it draws its stop id at once.
    assert results[0] == GenerationResult([10], "length", 2, 1)
    assert results[1] == GenerationResult([], "stop", 1, 0)
    assert [s.token_ids for s in results[2].samples] == [[11, 40], [12, 40]]
    assert [s.finish_reason for s in results[2].samples] == ["length", "length"]
