"""Progress: the bar's text, row counting, and the reporter on and off a terminal."""

from __future__ import annotations

import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.progress import ProgressCounter, ProgressReporter, count_rows, format_progress


def test_format_with_and_without_a_total() -> None:
    line = format_progress(rows=50, total=200, tokens=3000, elapsed=10.0)
    assert "50/200 rows (25%)" in line and "300 tok/s" in line and "ETA 0:00:30" in line
    assert "[######------------------]" in line
    assert format_progress(0, 10, 0, 1.0).endswith("ETA ?")
    assert format_progress(7, None, 70, 7.0) == "7 rows | 10 tok/s | 0:00:07 elapsed"


def test_count_rows_jsonl_gzip_and_parquet(tmp_path) -> None:
    import gzip

    (tmp_path / "a.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps({"a": i}) + "\n" for i in range(5)))
    pq.write_table(pa.table({"a": list(range(7))}), tmp_path / "c.parquet")
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz")]
    assert count_rows(files, "jsonl", {}) == 7
    assert count_rows([str(tmp_path / "c.parquet")], "parquet", {}) == 7


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


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
