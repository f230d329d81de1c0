"""Readers: JSONL (plain, gzip) and Parquet into READ_SCHEMA rows, ids, errors, Ray Data, S3."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import read_table

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
from pipeline.formats import ReadSpec, infer_format
from pipeline.formats.rows import id_key, resume_key
from pipeline.readers import CorpusDatasource, read_file
from testkit.ray_local import start_local_ray

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
SAMPLE_JSONL = sorted(str(p) for p in SAMPLE.glob("part-*.jsonl"))
SAMPLE_PARQUET = str(SAMPLE / "parquet" / "part-000.parquet")

# Line by line: good, blank, non-string text, not UTF-8, not JSON, a JSON list, whitespace only,
# two identical rows, a row without id.
LINES: list[bytes] = [
    b'{"id": "a1", "text": "First document.", "question": "What?", "title": "One", "n": 3}',
    b"",
    b'{"id": 2, "text": 42, "question": "Why?", "title": null, "n": {"k": [1, 2]}}',
    b'{"id": "a3", "text": "caf\xe9"}',
    b"{not json",
    b"[1, 2, 3]",
    b"   \t",
    b'{"text": "Same row.", "title": "Dup"}',
    b'{"text": "Same row.", "title": "Dup"}',
    b'{"id": null, "text": "No id.", "prompt": "Write a poem."}',
]
N_ROWS = 8  # the blank and whitespace-only lines are not rows


def _write_jsonl(path: Path, lines: list[bytes] = LINES) -> str:
    data = b"\n".join(lines) + b"\n"
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return str(path)


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    return table.to_pylist()


@pytest.fixture
def jsonl(tmp_path: Path) -> str:
    return _write_jsonl(tmp_path / "corpus.jsonl")


@pytest.fixture
def parquet_file(tmp_path: Path) -> str:
    table = pa.table(
        {
            "doc_id": pa.array(["p1", None, "p3", "p4"]),
            "body": pa.array(["alpha", "beta", None, "alpha"]),
            "ask": pa.array([1, None, 3, 4], pa.int64()),
            "score": pa.array([0.5, 1.5, None, 0.5], pa.float64()),
            "tags": pa.array([["x"], [], None, ["x"]], pa.list_(pa.string())),
        }
    )
    path = tmp_path / "corpus.parquet"
    pq.write_table(table, path)
    return str(path)


# ------------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("uri", "fmt"),
    [
        ("a/b.jsonl", "jsonl"),
        ("s3://bucket/x.JSON", "jsonl"),
        ("gs://b/p/x.jsonl.gz", "jsonl"),
        ("x.json.gz", "jsonl"),
        ("x.parquet", "parquet"),
        ("memory://x.pq", "parquet"),
        ("x.ndjson", "jsonl"),
        ("x.parquet.gz", None),
        ("x.csv", None),
        ("x.gz", None),
    ],
)
def test_infer_format(uri: str, fmt: str | None) -> None:
    assert infer_format(uri) == fmt


def test_unknown_format_and_bad_passthrough_raise(jsonl: str) -> None:
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_table(jsonl.replace(".jsonl", ".txt"), fmt=None)
    with pytest.raises(ValueError, match="unknown format"):
        read_table(jsonl, fmt="csv")
    with pytest.raises(ValueError, match="clash"):
        read_table(jsonl, fmt="jsonl", passthrough=["text"])
    with pytest.raises(TypeError):
        read_table(jsonl, fmt="jsonl", passthrough="title")


# --------------------------------------------------------------------------------- JSONL


def test_jsonl_rows_errors_and_schema(jsonl: str) -> None:
    table = read_table(jsonl, fmt="jsonl", id_column="id", passthrough=["title", "n"])
    assert table.schema.names == [*READ_SCHEMA.names, "title", "n"]
    assert table.schema.field(ID).nullable is False
    assert table.schema.field("n").type == pa.string()
    assert table.num_rows == N_ROWS
    rows = _rows(table)
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
    gz = _write_jsonl(tmp_path / "corpus.jsonl.gz")
    plain = read_table(jsonl, fmt="jsonl", id_column="id", passthrough=["title"])
    packed = read_table(gz, fmt=None, id_column="id", passthrough=["title"])
    assert packed.drop_columns([SOURCE, ID, ROW_KEY]).equals(
        plain.drop_columns([SOURCE, ID, ROW_KEY])
    )
    assert packed.column(ID).to_pylist()[:2] == ["a1", "2"]
    assert set(packed.column(SOURCE).to_pylist()) == {gz}


def test_missing_columns_are_null_not_errors(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bare.jsonl", [b'{"body": "Only a body."}'])
    table = read_table(path, fmt="jsonl", text_column="body", passthrough=["absent"])
    (row,) = _rows(table)
    assert row[TEXT] == "Only a body."
    assert row[QUESTION] is None and row[PROMPT] is None and row["absent"] is None
    assert row[ERROR] is None and row[ERROR_KIND] is None


def test_column_mapping_and_all_mapped_errors_reported(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "m.jsonl", [b'{"doc": ["a"], "q": 1.5, "p": "go"}'])
    table = read_table(path, fmt="jsonl", text_column="doc", question_column="q", prompt_column="p")
    (row,) = _rows(table)
    assert (row[TEXT], row[QUESTION], row[PROMPT]) == (None, None, "go")
    assert row[ERROR_KIND] == "not_a_string"
    assert "'doc'" in row[ERROR] and "'q'" in row[ERROR]


def test_unpaired_surrogate_and_blank_id(tmp_path: Path) -> None:
    lines = [
        b'{"id": "s1", "text": "lone \\ud800 half"}',
        b'{"id": "s2", "text": "paired \\ud83d\\ude00 emoji"}',
        b'{"id": "  ", "text": "blank id"}',
    ]
    path = _write_jsonl(tmp_path / "s.jsonl", lines)
    lone, paired, blank = _rows(read_table(path, fmt="jsonl", id_column="id"))
    assert lone[ERROR_KIND] == "invalid_utf8" and lone[TEXT] is None and len(lone[ID]) == 24
    assert paired[ERROR] is None and paired[TEXT] == "paired \U0001f600 emoji"
    assert blank[ERROR_KIND] == "missing_id" and len(blank[ID]) == 24


def test_empty_file_gives_empty_table_with_schema(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "empty.jsonl", [b"", b"  "])
    spec = ReadSpec(format="jsonl", passthrough=["title"])
    assert list(read_file(path, spec)) == []
    assert spec.reader_of(path).columns(spec) == [*READ_SCHEMA.names, "title"]
    one = _write_jsonl(tmp_path / "one.jsonl", [b'{"text": "x"}'])
    table = read_table(one, fmt="jsonl", passthrough=["title"])
    assert table.num_rows == 1 and table.schema.names == [*READ_SCHEMA.names, "title"]


# ----------------------------------------------------------------------------------- ids


def test_derived_ids_are_stable_and_distinct(tmp_path: Path, jsonl: str) -> None:
    first = read_table(jsonl, fmt="jsonl").column(ID).to_pylist()
    second = read_table(jsonl, fmt="jsonl").column(ID).to_pylist()
    assert first == second
    assert all(len(i) == 24 and int(i, 16) >= 0 for i in first)
    assert len(set(first)) == N_ROWS  # the two identical lines get distinct ids
    copy = _write_jsonl(tmp_path / "copy.jsonl")
    other = read_table(copy, fmt="jsonl").column(ID).to_pylist()
    assert not set(other) & set(first)  # the source is part of the hash


def test_batches_match_whole_file(jsonl: str, parquet_file: str) -> None:
    for uri in (jsonl, parquet_file):
        whole = read_table(uri, fmt=None, passthrough=["title"] if uri == jsonl else ["score"])
        batches = list(
            read_file(
                uri, ReadSpec(passthrough=["title"] if uri == jsonl else ["score"], batch_rows=3)
            )
        )
        assert [b.num_rows for b in batches][:-1] == [3] * (len(batches) - 1)
        assert pa.concat_tables(batches).equals(whole)


# ------------------------------------------------------------------------------- Parquet


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
    rows = _rows(table)
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
    rows = _rows(read_table(str(path), fmt="parquet"))
    assert [(r[TEXT], r[QUESTION], r[ERROR]) for r in rows] == [("x", "q", None), ("y", "q", None)]


# ---------------------------------------------------------------------------- the sample


def test_sample_corpus() -> None:
    parts = [read_table(p, fmt=None, id_column="id", passthrough=["title"]) for p in SAMPLE_JSONL]
    assert [t.num_rows for t in parts] == [100, 100, 100]
    rows = [row for t in parts for row in _rows(t)]
    assert [r[ID] for r in rows] == [f"doc-{i:05d}" for i in range(1, 301)]
    assert all(r[ERROR] is None and r[TEXT] and r[QUESTION] and r["title"] for r in rows)
    parquet = read_table(SAMPLE_PARQUET, fmt=None, id_column="id", passthrough=["title"])
    assert parquet.drop_columns([SOURCE, ROW_KEY]).equals(parts[0].drop_columns([SOURCE, ROW_KEY]))
    size = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert size < 300_000


# ------------------------------------------------------------------------------ Ray Data


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    start_local_ray(num_cpus=2, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([(SOURCE, "ascending"), (ID, "ascending")])


def test_read_tasks_group_files() -> None:
    files = [f"/data/f{i}.jsonl" for i in range(5)]
    source = CorpusDatasource(files, file_sizes=[10, 10, 10, 10, 60])
    groups = [t.metadata.input_files for t in source.get_read_tasks(2)]
    assert groups == [tuple(files[:4]), (files[4],)]
    assert [len(t.metadata.input_files) for t in source.get_read_tasks(100)] == [1] * 5
    assert source.estimate_inmemory_data_size() == 100
    assert CorpusDatasource(files).estimate_inmemory_data_size() is None
    assert CorpusDatasource([]).get_read_tasks(4) == []
    with pytest.raises(ValueError, match="cannot tell the format"):
        CorpusDatasource(["/data/x.txt"])


@pytest.mark.usefixtures("ray_local")
def test_read_datasource_matches_direct_reads(jsonl: str, parquet_file: str) -> None:
    import ray

    files = [*SAMPLE_JSONL, jsonl]
    source = CorpusDatasource(files, ReadSpec(passthrough=["title"], batch_rows=64))
    ds = ray.data.read_datasource(source)
    got = pa.Table.from_batches(
        [
            b
            for t in ds.iter_batches(batch_format="pyarrow", batch_size=None)
            for b in t.to_batches()
        ]
    )
    want = pa.concat_tables([read_table(f, fmt=None, passthrough=["title"]) for f in files])
    assert got.num_rows == 300 + N_ROWS
    assert _sorted(got).equals(_sorted(want))

    pq_ds = ray.data.read_datasource(
        CorpusDatasource(
            [SAMPLE_PARQUET, parquet_file], ReadSpec(id_column="id", passthrough=["title"])
        )
    )
    assert pq_ds.count() == 104
    assert pq_ds.limit(5).count() == 5


# ------------------------------------------------------------------------------------ S3


@pytest.mark.usefixtures("ray_local")
def test_read_from_s3(
    s3_bucket: tuple[str, dict[str, Any]], tmp_path: Path, jsonl: str, parquet_file: str
) -> None:
    import ray
    import s3fs

    bucket, options = s3_bucket
    gz = _write_jsonl(tmp_path / "corpus.jsonl.gz")
    fs = s3fs.S3FileSystem(**options)
    uris = []
    for local in (gz, parquet_file):
        uri = f"s3://{bucket}/in/{Path(local).name}"
        fs.put_file(local, uri)
        uris.append(uri)

    remote = read_table(uris[0], fmt=None, id_column="id", storage_options=options)
    local = read_table(gz, fmt=None, id_column="id")
    assert remote.drop_columns([SOURCE, ID, ROW_KEY]).equals(
        local.drop_columns([SOURCE, ID, ROW_KEY])
    )
    assert set(remote.column(SOURCE).to_pylist()) == {uris[0]}

    ds = ray.data.read_datasource(CorpusDatasource(uris, ReadSpec(storage_options=options)))
    got = ds.to_arrow_refs()
    table = pa.concat_tables(ray.get(got), promote_options="permissive")
    assert table.num_rows == N_ROWS + 4
    assert set(table.column(SOURCE).to_pylist()) == set(uris)


# ------------------------------------------------------------------- lines that cannot wedge


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
    rows = _rows(table)
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


def test_the_source_column_never_carries_a_credential() -> None:
    import fsspec

    uri = "memory://bucket/signed.jsonl?X-Amz-Signature=s3cr3tsignature"
    with fsspec.open(uri, "wb") as handle:
        handle.write(b'{"id": "a", "text": "hi"}\n{"text": "no id"}\n')
    table = read_table(uri, fmt="jsonl", id_column="id")
    assert set(table.column(SOURCE).to_pylist()) == {
        "memory://bucket/signed.jsonl?X-Amz-Signature=***"
    }
    assert "s3cr3t" not in json.dumps(table.to_pylist())
    # Ids and resume keys follow the masked URI: a re-signed URL keeps them.
    resigned = "memory://bucket/signed.jsonl?X-Amz-Signature=another"
    fsspec.filesystem("memory").pipe(
        resigned.removeprefix("memory://"), fsspec.open(uri).open().read()
    )
    again = read_table(resigned, fmt="jsonl", id_column="id")
    assert again.column(ID).to_pylist() == table.column(ID).to_pylist()
    assert again.column(ROW_KEY).to_pylist() == table.column(ROW_KEY).to_pylist()
