"""Resume: SIGKILL the driver mid-run, rerun the same run id; every row ends up exactly once and
rows committed before the kill are not generated again, repeated ids included."""

from __future__ import annotations

import json
import time

import fsspec
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import (
    build_fixtures,
    committed_keys,
    corpus_rows,
    job_yaml,
    kill_tree,
    read_output,
    run_cli,
    write_corpus,
)

from pipeline import columns as S

LOCAL = fsspec.filesystem("file")
ROWS = 160


@pytest.mark.slow
def test_sigkill_then_rerun_writes_every_row_exactly_once(tmp_path) -> None:
    fixtures = build_fixtures(tmp_path / "fixtures")
    rows = corpus_rows(ROWS)
    # Every fourth row of the second half repeats an id of the first: resume must go by row
    # key, or a copy whose twin was committed would be filtered out and lost.
    for k, row in enumerate(rows[ROWS // 2 :: 4]):
        row["id"] = rows[k]["id"]
    write_corpus(LOCAL, str(tmp_path / "in"), rows, "jsonl", files=8)
    config = tmp_path / "job.yaml"
    config.write_text(
        job_yaml(
            fixtures,
            task="summarize",
            input_uri=str(tmp_path / "in" / "*.jsonl"),
            output_uri=str(tmp_path / "out"),
            extra={
                "generation": {"max_new_tokens": 24, "batch_size": 4, "max_slots": 4},
                "output": {"rows_per_file": 4},
                "run": {"num_cpus": 8},
            },
        )
    )
    run_dir = tmp_path / "out" / "r1"
    checkpoint_dir = run_dir / "_checkpoint"

    first = run_cli(config, "r1")
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None:
        if len(committed_keys(checkpoint_dir)) >= 16:
            break
        time.sleep(0.5)
    assert first.poll() is None, "the first run ended before it could be killed"
    kill_tree(first)
    committed = committed_keys(checkpoint_dir)
    assert 16 <= len(committed) < ROWS
    assert not (run_dir / "_SUCCESS").exists()
    files_before = {p.name: p.read_bytes() for p in run_dir.glob("part-*.parquet")}

    second = run_cli(config, "r1")
    assert second.wait(timeout=900) == 0
    assert (run_dir / "_SUCCESS").exists()

    table = read_output(LOCAL, str(run_dir), "parquet")
    ids = table.column(S.ID).to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every row, exactly once
    # Rows committed before the kill come from files the first run wrote, untouched; the
    # rerun's own files hold only rows that had not been committed.
    new_files = [p for p in run_dir.glob("part-*.parquet") if p.name not in files_before]
    regenerated = set()
    for path in new_files:
        regenerated.update(pq.read_table(path).column(S.ROW_KEY).to_pylist())
    assert not regenerated & committed
    kept = {p.name for p in run_dir.glob("part-*.parquet")} & set(files_before)
    for name in kept:
        assert (run_dir / name).read_bytes() == files_before[name]
    # The manifest counts what the files hold: no summary of a rolled-back part survived.
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == len(rows)
    assert manifest["counts"]["output_tokens"] == sum(table.column(S.OUTPUT_TOKENS).to_pylist())
    assert all(c["rows_in"] == c["rows_out"] for c in manifest["inputs"].values())
    assert manifest["counts"]["ids_repeated"] == ROWS // 8
    assert len(list((run_dir / "_stats").iterdir())) == len(list(run_dir.glob("part-*.parquet")))
