"""The engine's host side on its own: no JAX, slots freed and results built from call outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from model.engine_config import EngineConfig
from model.scheduler import CallOutput, GenerationRequest, GenerationResult, Scheduler

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
