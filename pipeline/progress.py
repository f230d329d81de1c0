"""Run progress: rows done / total, generated tokens/s and ETA, and the run's throughput samples.

The model stage reports each finished batch to a small counter actor; the driver polls it. On a
terminal the line is redrawn in place (a live bar); otherwise a log line is written every
``run.progress_interval_s`` seconds. The total comes from metadata, never from a scan of the
corpus: Parquet footers hold row counts; a JSONL corpus' rows are estimated from its bytes, at the
rows per byte of the files read so far (read tasks report each file they finish).

Until the first rows are done the line names the start-up phase: "starting actors" until a model
replica reports one, then the phase of the replica furthest behind ("loading the model",
"compiling"), so a line at 0% says what it waits for.

Every poll also records a sample (seconds since start, rows, output tokens); the report's
"throughput over time" chart is drawn from them, so it covers the whole run. Samples are thinned
(every other one dropped, the period doubled) past :data:`MAX_SAMPLES`: memory stays bounded on a
run of any length.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

import ray

from pipeline import formats
from pipeline.formats.base import is_unreadable
from pipeline.secrets import mask_uri

log = logging.getLogger("rgbatch.progress")

MAX_SAMPLES = 512
# What the run waits for before its first rows, in order; the model stage reports the last three.
START_PHASES = ("starting actors", "loading the model", "compiling", "generating")
SAMPLE_PERIOD_S = 1.0


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Rows and generated tokens finished so far in this attempt; rows and bytes of files read."""

    def __init__(self) -> None:
        self.rows = 0
        self.tokens = 0
        self.file_rows = 0
        self.file_bytes = 0
        self.phases: list[str] = []  # one per replica that reported, in START_PHASES order

    def phase(self, name: str) -> None:
        """A model replica moved on to start-up phase ``name`` (one of START_PHASES)."""
        order = START_PHASES.index(name)
        for i, seen in enumerate(self.phases):  # the first replica still behind moves on
            if START_PHASES.index(seen) == order - 1:
                self.phases[i] = name
                return
        self.phases.append(name)

    def current_phase(self) -> str:
        """The phase of the replica furthest behind; "starting actors" before any reported."""
        if not self.phases:
            return START_PHASES[0]
        return min(self.phases, key=START_PHASES.index)

    def add(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens

    def file_read(self, rows: int, size: int | None) -> None:
        if size:
            self.file_rows += rows
            self.file_bytes += size

    def snapshot(self) -> tuple[int, int]:
        return self.rows, self.tokens

    def read_rate(self) -> tuple[int, int]:
        return self.file_rows, self.file_bytes


class InputTotal:
    """The corpus' rows: exact where the format's metadata holds them (Parquet footers), else
    estimated from the bytes read so far (JSONL)."""

    def __init__(self, rows: int | None = None, bytes_total: int | None = None) -> None:
        self.rows = rows
        self.bytes_total = bytes_total

    @classmethod
    def of_files(
        cls,
        files: Sequence[str],
        fmt: str,
        sizes: Sequence[int] | None,
        storage_options: dict[str, Any],
    ) -> InputTotal:
        """The total of ``files`` as the reader of their format ``fmt`` can tell it; a file
        whose metadata is corrupt counts as the one ``unreadable_file`` row it becomes."""
        reader = formats.reader(fmt)
        counts = []
        for uri in files:
            try:
                count = reader.row_count(uri, storage_options)
            except Exception as err:
                if not is_unreadable(err):
                    raise
                log.warning("input file %s cannot be read: %s", mask_uri(uri), err)
                count = 1
            if count is None:
                return cls(bytes_total=sum(sizes) if sizes is not None else None)
            counts.append(count)
        return cls(rows=sum(counts))

    def estimate(self, file_rows: int, file_bytes: int) -> tuple[int | None, bool]:
        """(total rows, whether it is an estimate)."""
        if self.rows is not None:
            return self.rows, False
        if self.bytes_total and file_bytes:
            return round(self.bytes_total * file_rows / file_bytes), True
        return None, True


def format_progress(
    rows: int,
    total: int | None,
    tokens: int,
    elapsed: float,
    estimated: bool = False,
    phase: str | None = None,
) -> str:
    """The progress line; before the first rows, ``phase`` (what the run waits for) ends it."""
    line = _format_counts(rows, total, tokens, elapsed, estimated)
    if phase is not None and rows == 0:
        line += f" | {phase}"
    return line


def _format_counts(
    rows: int, total: int | None, tokens: int, elapsed: float, estimated: bool
) -> str:
    rate = tokens / elapsed if elapsed > 0 else 0.0
    if total:
        fraction = min(rows / total, 1.0)
        bar = "#" * int(24 * fraction) + "-" * (24 - int(24 * fraction))
        remaining = max(total - rows, 0) * elapsed / rows if rows else None
        eta = _duration(remaining) if remaining is not None else "?"
        shown = f"~{total}" if estimated else f"{total}"
        return (
            f"[{bar}] {rows}/{shown} rows ({100 * fraction:.0f}%) | {rate:,.0f} tok/s | ETA {eta}"
        )
    return f"{rows} rows | {rate:,.0f} tok/s | {_duration(elapsed)} elapsed"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressReporter:
    """Polls a ProgressCounter in a thread, renders it and records samples until stopped."""

    def __init__(
        self,
        counter: Any,
        total: InputTotal | int | None,
        *,
        interval_s: float = 10.0,
        stream: IO[str] | None = None,
    ) -> None:
        self.counter = counter
        self.total = total if isinstance(total, InputTotal) else InputTotal(rows=total)
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.samples: list[tuple[float, int, int]] = [(0.0, 0, 0)]
        self._period = min(SAMPLE_PERIOD_S, interval_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rgbatch-progress", daemon=True)
        self._start = time.monotonic()
        self._last_render = self._start

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._poll(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5 if self.live else self._period):
            self._poll()

    def _poll(self, final: bool = False) -> None:
        try:
            rows, tokens = ray.get(self.counter.snapshot.remote(), timeout=5)
            read_rows, read_bytes = ray.get(self.counter.read_rate.remote(), timeout=5)
            phase = None if rows else ray.get(self.counter.current_phase.remote(), timeout=5)
        except Exception:  # progress is best effort; the run does not depend on it
            return
        now = time.monotonic()
        self._sample(now - self._start, rows, tokens, final)
        if not (final or self.live or now - self._last_render >= self.interval_s):
            return
        self._last_render = now
        total, estimated = self.total.estimate(read_rows, read_bytes)
        line = format_progress(rows, total, tokens, now - self._start, estimated, phase)
        if self.live:
            self.stream.write("\r" + line + ("\n" if final else ""))
            self.stream.flush()
        else:
            log.info("progress: %s", line)

    def _sample(self, t: float, rows: int, tokens: int, final: bool = False) -> None:
        if not final and t - self.samples[-1][0] < self._period:
            return
        self.samples.append((t, rows, tokens))
        if len(self.samples) > MAX_SAMPLES:
            last = self.samples[-1]
            self.samples = [*self.samples[:-1:2], last]
            self._period *= 2
