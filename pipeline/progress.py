"""Run progress: rows done / total, generated tokens/s and ETA.

The model stage reports each finished batch to a small counter actor; the driver polls it. On a
terminal the line is redrawn in place (a live bar); otherwise a log line is written every
``run.progress_interval_s`` seconds.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from typing import IO, Any

import fsspec
import pyarrow.parquet as pq
import ray

log = logging.getLogger("rgbatch.progress")

# Counting JSONL rows means reading the files once on the driver: skipped above this size.
COUNT_JSONL_MAX_BYTES = 2 << 30


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Rows and generated tokens finished so far in this attempt."""

    def __init__(self) -> None:
        self.rows = 0
        self.tokens = 0

    def add(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens

    def snapshot(self) -> tuple[int, int]:
        return self.rows, self.tokens


def count_rows(files: list[str], fmt: str, storage_options: dict[str, Any]) -> int | None:
    """Total input rows: Parquet from footers; JSONL by counting non-blank lines, when the
    corpus is small enough to read twice (None otherwise, and the ETA is left out)."""
    total = 0
    for uri in files:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        if fmt == "parquet":
            with fs.open(path, "rb") as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
            continue
        if fs.size(path) > COUNT_JSONL_MAX_BYTES:
            return None
        with fsspec.open(uri, "rb", compression="infer", **storage_options) as handle:
            total += sum(1 for line in io.BufferedReader(handle) if line.strip())
    return total


def format_progress(rows: int, total: int | None, tokens: int, elapsed: float) -> str:
    rate = tokens / elapsed if elapsed > 0 else 0.0
    if total:
        fraction = min(rows / total, 1.0)
        bar = "#" * int(24 * fraction) + "-" * (24 - int(24 * fraction))
        remaining = (total - rows) * elapsed / rows if rows else None
        eta = _duration(remaining) if remaining is not None else "?"
        return (
            f"[{bar}] {rows}/{total} rows ({100 * fraction:.0f}%) | {rate:,.0f} tok/s | ETA {eta}"
        )
    return f"{rows} rows | {rate:,.0f} tok/s | {_duration(elapsed)} elapsed"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressReporter:
    """Polls a ProgressCounter in a thread and renders it until stopped."""

    def __init__(
        self,
        counter: Any,
        total_rows: int | None,
        *,
        interval_s: float = 10.0,
        stream: IO[str] | None = None,
    ) -> None:
        self.counter = counter
        self.total = total_rows
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rgbatch-progress", daemon=True)
        self._start = time.monotonic()

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._render(final=True)

    def _loop(self) -> None:
        period = 0.5 if self.live else self.interval_s
        while not self._stop.wait(period):
            self._render()

    def _render(self, final: bool = False) -> None:
        try:
            rows, tokens = ray.get(self.counter.snapshot.remote(), timeout=5)
        except Exception:  # progress is best effort; the run does not depend on it
            return
        line = format_progress(rows, self.total, tokens, time.monotonic() - self._start)
        if self.live:
            self.stream.write("\r" + line + ("\n" if final else ""))
            self.stream.flush()
        else:
            log.info("progress: %s", line)
