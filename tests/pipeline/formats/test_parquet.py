"""The Parquet format (pipeline/formats/parquet.py): rows, types kept or read as strings, ids
derived from whole rows."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pipeline_helpers import read_table

from pipeline.columns import (
    ERROR,
    ERROR_KIND,
    ID,
    QUESTION,
    READ_SCHEMA,
    TEXT,
)


def test_parquet_rows(parquet_file: str) -> None:
    table = read_table(
        parquet_file,
        fmt="parquet",
        id_column="doc_id",
        text_column="body",
        question_column="ask",
        passthrough=["score", "tags", "absent"],
    )
    assert table.schema.names == [*READ_SCHEMA.names, "score", "tags", "absent"]
    assert table.schema.field("score").type == pa.float64()
    assert table.schema.field("tags").type == pa.list_(pa.string())
    rows = table.to_pylist()
    assert [r[ID] for r in rows][0::2] == ["p1", "p3"]
    assert [r[TEXT] for r in rows] == ["alpha", "beta", None, "alpha"]
    assert all(r[QUESTION] is None and r["absent"] is None for r in rows)
    assert rows[0][ERROR_KIND] == "not_a_string" and "'ask'" in rows[0][ERROR]
    assert rows[1][ERROR_KIND] == "missing_id" and "missing id" in rows[1][ERROR]
    assert "not a string" not in rows[1][ERROR]  # a null int is just null
    assert rows[0]["tags"] == ["x"] and rows[1]["score"] == 1.5


def test_parquet_derived_ids(tmp_path: Path, parquet_file: str) -> None:
    ids = read_table(parquet_file, fmt="parquet").column(ID).to_pylist()
    assert ids == read_table(parquet_file, fmt="parquet").column(ID).to_pylist()
    assert len(set(ids)) == 4
    # The hash covers every column of the row, read or not: change one value of row 0 only.
    table = pq.read_table(parquet_file)
    pq.write_table(table.set_column(3, "score", pa.array([9.0, 1.5, None, 0.5])), parquet_file)
    changed = read_table(parquet_file, fmt="parquet").column(ID).to_pylist()
    assert changed[0] != ids[0] and changed[1:] == ids[1:]


def test_large_string_and_dictionary_columns_are_strings(tmp_path: Path) -> None:
    path = tmp_path / "types.parquet"
    table = pa.table(
        {
            "text": pa.array(["x", "y"], pa.large_string()),
            "question": pa.array(["q", "q"]).dictionary_encode(),
        }
    )
    pq.write_table(table, path)
    rows = read_table(str(path), fmt="parquet").to_pylist()
    assert [(r[TEXT], r[QUESTION], r[ERROR]) for r in rows] == [("x", "q", None), ("y", "q", None)]
