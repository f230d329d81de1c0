"""Fixtures of the pipeline tests: the offline checkpoints, a local Ray cluster per module, and the
readers' small test files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import build_fixtures, write_jsonl

from testkit.ray_local import local_ray


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny model (Kaggle layout) and the tiny detoxify checkpoint, built once (read-only)."""
    return build_fixtures(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster for the tests of one module (8 logical CPUs)."""
    with local_ray(num_cpus=8):
        yield


@pytest.fixture
def jsonl(tmp_path: Path) -> str:
    """The readers' JSONL test corpus (:data:`pipeline_helpers.LINES`)."""
    return write_jsonl(tmp_path / "corpus.jsonl")


@pytest.fixture
def parquet_file(tmp_path: Path) -> str:
    """A four-row Parquet file with null ids, a non-string column, floats and lists."""
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
