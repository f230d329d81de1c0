"""The whole job with input and output in object storage: moto's S3 server and a GCS emulator."""

from __future__ import annotations

import json

import fsspec
import pytest
from pipeline_helpers import (
    corpus_rows,
    job_config,
    job_yaml,
    read_output,
    write_corpus,
)

from pipeline import columns as S
from pipeline.runner import run_job


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_end_to_end_through_object_storage(request, fixtures, ray_cluster, store) -> None:
    bucket, options = request.getfixturevalue("s3_bucket" if store == "s3" else "gcs_bucket")
    fs = fsspec.filesystem(store, **options)
    rows = corpus_rows(14)
    write_corpus(fs, f"{bucket}/corpus", rows, "jsonl", files=2)
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=f"{store}://{bucket}/corpus/*.jsonl",
        output_uri=f"{store}://{bucket}/results/{{date}}",
        extra={"input": {"storage_options": options}, "output": {"storage_options": options}},
    )
    result = run_job(job_config(text, run_id="remote"))
    run_dir = f"{bucket}/results/2026-11-27/remote"
    assert result.run_dir == f"{store}://{run_dir}"
    fs.invalidate_cache()
    assert fs.exists(f"{run_dir}/_SUCCESS") and not fs.exists(f"{run_dir}/_checkpoint")
    table = read_output(fs, run_dir, "parquet")
    assert sorted(table.column(S.ID).to_pylist()) == sorted(r["id"] for r in rows)
    manifest = json.loads(fs.cat_file(f"{run_dir}/_manifest.json"))
    assert manifest["counts"]["rows"] == len(rows)
    assert (
        manifest["config"]["output"]["storage_options"]["endpoint_url" if store == "gs" else "key"]
        == "***"
    )
