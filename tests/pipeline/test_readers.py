"""Readers across formats: format inference, batches, the sample corpus, Ray Data read tasks and
S3. Each format's own rows, errors and ids: tests/pipeline/formats/."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pipeline_helpers import N_ROWS, read_table, write_jsonl

from pipeline.columns import (
    ERROR,
    ID,
    QUESTION,
    ROW_KEY,
    SOURCE,
    TEXT,
)
from pipeline.formats import ReadSpec, infer_format
from pipeline.readers import CorpusDatasource, read_file
from testkit.ray_local import start_local_ray

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
SAMPLE_JSONL = sorted(str(p) for p in SAMPLE.glob("part-*.jsonl"))
SAMPLE_PARQUET = str(SAMPLE / "parquet" / "part-000.parquet")

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


# ----------------------------------------------------------------------------------- ids


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


# ---------------------------------------------------------------------------- the sample


def test_sample_corpus() -> None:
    parts = [read_table(p, fmt=None, id_column="id", passthrough=["title"]) for p in SAMPLE_JSONL]
    assert [t.num_rows for t in parts] == [100, 100, 100]
    rows = [row for t in parts for row in t.to_pylist()]
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
    gz = write_jsonl(tmp_path / "corpus.jsonl.gz")
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
