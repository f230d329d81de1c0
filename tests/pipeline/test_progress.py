"""Progress: the bar's text, row counting, and the reporter on and off a terminal."""

from __future__ import annotations

import io
import logging

import pytest
import ray

from pipeline.progress import InputTotal, ProgressCounter, ProgressReporter, format_progress
from testkit.ray_local import local_ray


def test_format_with_and_without_a_total() -> None:
    line = format_progress(rows=50, total=200, tokens=3000, elapsed=10.0)
    assert "50/200 rows (25%)" in line and "300 tok/s" in line and "ETA 0:00:30" in line
    assert "[######------------------]" in line
    assert format_progress(0, 10, 0, 1.0).endswith("ETA ?")
    assert format_progress(7, None, 70, 7.0) == "7 rows | 10 tok/s | 0:00:07 elapsed"
    assert "50/~200 rows" in format_progress(50, 200, 0, 1.0, estimated=True)
    assert format_progress(0, 10, 0, 1.0, phase="compiling").endswith("ETA ? | compiling")
    assert "compiling" not in format_progress(1, 10, 5, 1.0, phase="compiling")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def ray_local():
    with local_ray(num_cpus=2):
        yield


def test_the_line_names_the_start_up_phase_of_the_slowest_replica(ray_local) -> None:
    counter = ProgressCounter.remote()
    terminal = FakeTerminal()
    with ProgressReporter(counter, 4, stream=terminal):
        pass
    assert terminal.getvalue().rstrip().endswith("| starting actors")
    for name in ("loading the model", "loading the model", "compiling", "compiling"):
        counter.phase.remote(name)  # two replicas; both compiling now
    counter.phase.remote("generating")  # one is ready
    assert ray.get(counter.current_phase.remote()) == "compiling"
    counter.phase.remote("generating")
    assert ray.get(counter.current_phase.remote()) == "generating"
    counter.phase.remote("loading the model")  # a replica restarted
    assert ray.get(counter.current_phase.remote()) == "loading the model"
    ray.get(counter.add.remote(4, 40))
    with ProgressReporter(counter, 4, stream=terminal):
        pass
    last = terminal.getvalue().rstrip().rsplit("\r", 1)[-1]
    assert "4/4 rows (100%)" in last and last.endswith("ETA 0:00:00")  # no phase once rows flow


def test_reporter_redraws_on_a_terminal_and_logs_otherwise(ray_local, caplog) -> None:
    counter = ProgressCounter.remote()
    ray.get(counter.add.remote(3, 30))
    terminal = FakeTerminal()
    with ProgressReporter(counter, 6, stream=terminal):
        ray.get(counter.add.remote(3, 30))
    assert terminal.getvalue().startswith("\r") and "6/6 rows (100%)" in terminal.getvalue()

    caplog.set_level(logging.INFO, logger="rgbatch.progress")
    with ProgressReporter(counter, None, interval_s=0.1, stream=io.StringIO()):
        pass
    assert any("progress: 6 rows" in r.getMessage() for r in caplog.records)

    # A JSONL corpus: the total is estimated from the bytes of the files read so far.
    ray.get(counter.file_read.remote(6, 600))
    with ProgressReporter(counter, InputTotal(bytes_total=1200), stream=terminal) as reporter:
        pass
    assert "6/~12 rows (50%)" in terminal.getvalue()
    assert reporter.samples[0] == (0.0, 0, 0) and reporter.samples[-1][1:] == (6, 60)
