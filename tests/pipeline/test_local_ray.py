"""pipeline.local_ray: a local start that Ray's node start-up wait timed out on is tried again;
any other error is raised at once. ``ray.init`` is replaced by a recorder here (the unit needs no
cluster); the real start is what every test starting Ray goes through."""

from __future__ import annotations

from typing import Any

import pytest
import ray

from pipeline import local_ray

TIMEOUT = Exception(
    "The current node timed out during startup. This could happen because some of the raylet "
    "failed to startup or the GCS has become overloaded."
)


class Recorder:
    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes
        self.calls: list[dict[str, Any]] = []
        self.shutdowns = 0

    def init(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder([])
    monkeypatch.setattr(ray, "init", rec.init)
    monkeypatch.setattr(ray, "shutdown", rec.shutdown)
    monkeypatch.setattr(local_ray.time, "sleep", lambda _s: None)
    return rec


def test_a_start_up_timeout_is_tried_again(recorder: Recorder) -> None:
    recorder.outcomes = [TIMEOUT, TIMEOUT, "context"]
    assert local_ray.start_local_ray(4, logging_level=30) == "context"
    assert len(recorder.calls) == 3 and recorder.shutdowns == 2
    assert all(
        call == {"address": "local", "num_cpus": 4, "include_dashboard": False, "logging_level": 30}
        for call in recorder.calls
    )


def test_the_last_attempt_raises(recorder: Recorder) -> None:
    recorder.outcomes = [TIMEOUT, TIMEOUT]
    with pytest.raises(Exception, match="timed out during startup"):
        local_ray.start_local_ray(2, attempts=2)
    assert len(recorder.calls) == 2 and recorder.shutdowns == 1


def test_other_errors_are_raised_at_once(recorder: Recorder) -> None:
    recorder.outcomes = [ValueError("num_cpus must be positive")]
    with pytest.raises(ValueError, match="num_cpus"):
        local_ray.start_local_ray(2)
    assert len(recorder.calls) == 1 and recorder.shutdowns == 0
