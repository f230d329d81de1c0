"""The JSONL format (pipeline/formats/jsonl.py): lines into READ_SCHEMA rows, plain and gzip,
errors as rows, derived ids, lines that cannot wedge a read."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from pipeline_helpers import N_ROWS, read_table, write_jsonl

from pipeline.columns import (
    ERROR,
    ERROR_KIND,
    ID,
    PROMPT,
    QUESTION,
    READ_SCHEMA,
    ROW_KEY,
    SOURCE,
    TEXT,
)
from pipeline.formats import ReadSpec
from pipeline.formats.rows import id_key, resume_key
from pipeline.readers import read_file


def test_jsonl_rows_errors_and_schema(jsonl: str) -> None:
    table = read_table(jsonl, fmt="jsonl", id_column="id", passthrough=["title", "n"])
    assert table.schema.names == [*READ_SCHEMA.names, "title", "n"]
    assert table.schema.field(ID).nullable is False
    assert table.schema.field("n").type == pa.string()
    assert table.num_rows == N_ROWS
    rows = table.to_pylist()
    assert all(row[SOURCE] == jsonl for row in rows)

    good = rows[0]
    assert (good[ID], good[TEXT], good[QUESTION], good[PROMPT]) == (
        "a1",
        "First document.",
        "What?",
        None,
    )
    assert good[ERROR] is None and good[ERROR_KIND] is None
    assert (good["title"], good["n"]) == ("One", "3")

    not_str = rows[1]
    assert not_str[ID] == "2"
    assert not_str[TEXT] is None and not_str[QUESTION] == "Why?"
    assert not_str[ERROR_KIND] == "not_a_string" and "'text'" in not_str[ERROR]
    assert not_str["title"] is None and json.loads(not_str["n"]) == {"k": [1, 2]}

    bad_utf8, bad_json, json_list = rows[2], rows[3], rows[4]
    assert bad_utf8[ERROR_KIND] == "invalid_utf8" and "line 4" in bad_utf8[ERROR]
    assert bad_json[ERROR_KIND] == "invalid_json" and "line 5" in bad_json[ERROR]
    assert json_list[ERROR_KIND] == "invalid_json" and "not an object" in json_list[ERROR]
    for row in (bad_utf8, bad_json, json_list):
        assert row[TEXT] is None and row["title"] is None and len(row[ID]) == 24

    missing = rows[5:]
    for row in missing:
        assert row[ERROR_KIND] == "missing_id" and "missing id" in row[ERROR]
        assert len(row[ID]) == 24
    assert rows[7][PROMPT] == "Write a poem." and rows[7][TEXT] == "No id."
    assert len({row[ID] for row in rows}) == N_ROWS


def test_gzip_reads_like_plain(tmp_path: Path, jsonl: str) -> None:
    gz = write_jsonl(tmp_path / "corpus.jsonl.gz")
    plain = read_table(jsonl, fmt="jsonl", id_column="id", passthrough=["title"])
    packed = read_table(gz, fmt=None, id_column="id", passthrough=["title"])
    assert packed.drop_columns([SOURCE, ID, ROW_KEY]).equals(
        plain.drop_columns([SOURCE, ID, ROW_KEY])
    )
    assert packed.column(ID).to_pylist()[:2] == ["a1", "2"]
    assert set(packed.column(SOURCE).to_pylist()) == {gz}


def test_missing_columns_are_null_not_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bare.jsonl", [b'{"body": "Only a body."}'])
    table = read_table(path, fmt="jsonl", text_column="body", passthrough=["absent"])
    (row,) = table.to_pylist()
    assert row[TEXT] == "Only a body."
    assert row[QUESTION] is None and row[PROMPT] is None and row["absent"] is None
    assert row[ERROR] is None and row[ERROR_KIND] is None


def test_column_mapping_and_all_mapped_errors_reported(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [b'{"doc": ["a"], "q": 1.5, "p": "go"}'])
    table = read_table(path, fmt="jsonl", text_column="doc", question_column="q", prompt_column="p")
    (row,) = table.to_pylist()
    assert (row[TEXT], row[QUESTION], row[PROMPT]) == (None, None, "go")
    assert row[ERROR_KIND] == "not_a_string"
    assert "'doc'" in row[ERROR] and "'q'" in row[ERROR]


def test_unpaired_surrogate_and_blank_id(tmp_path: Path) -> None:
    lines = [
        b'{"id": "s1", "text": "lone \\ud800 half"}',
        b'{"id": "s2", "text": "paired \\ud83d\\ude00 emoji"}',
        b'{"id": "  ", "text": "blank id"}',
    ]
    path = write_jsonl(tmp_path / "s.jsonl", lines)
    lone, paired, blank = read_table(path, fmt="jsonl", id_column="id").to_pylist()
    assert lone[ERROR_KIND] == "invalid_utf8" and lone[TEXT] is None and len(lone[ID]) == 24
    assert paired[ERROR] is None and paired[TEXT] == "paired \U0001f600 emoji"
    assert blank[ERROR_KIND] == "missing_id" and len(blank[ID]) == 24


def test_empty_file_gives_empty_table_with_schema(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "empty.jsonl", [b"", b"  "])
    spec = ReadSpec(format="jsonl", passthrough=["title"])
    assert list(read_file(path, spec)) == []
    assert spec.reader_of(path).columns(spec) == [*READ_SCHEMA.names, "title"]
    one = write_jsonl(tmp_path / "one.jsonl", [b'{"text": "x"}'])
    table = read_table(one, fmt="jsonl", passthrough=["title"])
    assert table.num_rows == 1 and table.schema.names == [*READ_SCHEMA.names, "title"]


def test_derived_ids_are_stable_and_distinct(tmp_path: Path, jsonl: str) -> None:
    first = read_table(jsonl, fmt="jsonl").column(ID).to_pylist()
    second = read_table(jsonl, fmt="jsonl").column(ID).to_pylist()
    assert first == second
    assert all(len(i) == 24 and int(i, 16) >= 0 for i in first)
    assert len(set(first)) == N_ROWS  # the two identical lines get distinct ids
    copy = write_jsonl(tmp_path / "copy.jsonl")
    other = read_table(copy, fmt="jsonl").column(ID).to_pylist()
    assert not set(other) & set(first)  # the source is part of the hash


def test_deep_nesting_and_oversized_lines_become_error_rows(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    big = json.dumps({"id": "big", "text": "x" * 150_000})
    path.write_bytes(
        b"[" * 60_000
        + b"\n"
        + json.dumps({"id": "ok", "text": "fine"}).encode()
        + b"\n"
        + big.encode()
        + b"\n"
        + big.encode()  # the last line, without a line break
    )
    table = read_table(str(path), fmt="jsonl", id_column="id", max_row_bytes=100_000)
    rows = table.to_pylist()
    assert len(rows) == 4
    assert rows[0][ERROR_KIND] == "invalid_json" and "nests JSON too deeply" in rows[0][ERROR]
    assert rows[1][ID] == "ok" and rows[1][ERROR] is None
    for row, line in zip(rows[2:], (3, 4), strict=True):
        assert row[ERROR_KIND] == "row_too_large" and row[TEXT] is None
        assert f"line {line} has {len(big)} bytes, over input.max_row_bytes (100000)" in row[ERROR]
    assert len({row[ROW_KEY] for row in rows}) == 4  # every row keeps its own resume key


def test_ids_keep_their_type_and_row_keys_are_unique(tmp_path: Path) -> None:
    path = tmp_path / "ids.jsonl"
    lines = [{"id": 42}, {"id": "42"}, {"id": "a"}, {"id": "a"}, {"id": 4.5}, {"id": True}]
    path.write_text("".join(json.dumps({**row, "text": "t"}) + "\n" for row in lines))
    assert [id_key(r["id"]) for r in lines] == ["i:42", "s:42", "s:a", "s:a", "j:4.5", "j:true"]
    table = read_table(str(path), fmt="jsonl", id_column="id")
    keys = table.column(ROW_KEY).to_pylist()
    assert len(set(keys)) == len(lines)
    assert keys == [resume_key(str(path), i) for i in range(len(lines))]
