"""Engine faults for the fault tests, run through the model stage's test hook.

A test names one of these in ``RGBATCH_FAULT_HOOK`` (``testkit.faults:<name>``) in the
environment of the run it starts; every model actor then calls it with the step number before
each engine step. ``RGBATCH_FAULT_LOG`` (a file path) receives one line per injected fault, so the
test can count them across actor processes and restarts. ``RGBATCH_FAULT_STEP`` sets the step at
which ``fail_once`` raises (default 3); ``RGBATCH_FAULT_DELAY_S`` the pause of ``slow`` (default
0.1 s), which paces the tiny model so that a fault lands mid-run.
"""

from __future__ import annotations

import os
import time

FAULT_LOG_ENV = "RGBATCH_FAULT_LOG"
FAULT_STEP_ENV = "RGBATCH_FAULT_STEP"
FAULT_DELAY_ENV = "RGBATCH_FAULT_DELAY_S"


class InjectedEngineError(RuntimeError):
    """What the hooks raise: it stands for an error from the device or the runtime."""


def _record(kind: str, step: int) -> None:
    path = os.environ.get(FAULT_LOG_ENV)
    if path:
        with open(path, "a") as log:
            log.write(f"{kind} pid={os.getpid()} step={step}\n")


def fail_once(step: int) -> None:
    """One transient failure per actor process, at step ``$RGBATCH_FAULT_STEP``."""
    if step == int(os.environ.get(FAULT_STEP_ENV, "3")):
        _record("transient", step)
        raise InjectedEngineError(f"injected transient engine failure at step {step}")


def slow(step: int) -> None:
    """No fault: every step takes ``$RGBATCH_FAULT_DELAY_S`` longer, as a larger model would (and
    is logged as ``step``, so that a test can time a fault by the model's progress)."""
    _record("step", step)
    time.sleep(float(os.environ.get(FAULT_DELAY_ENV, "0.1")))


def out_of_memory(step: int) -> None:
    """Every step fails as XLA reports a device out-of-memory: the replica never works."""
    _record("oom", step)
    raise InjectedEngineError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17238048 bytes (injected)"
    )


def recorded(path: str) -> list[str]:
    """The faults injected so far (the lines of the log), [] when there were none."""
    try:
        with open(path) as log:
            return log.read().splitlines()
    except FileNotFoundError:
        return []
