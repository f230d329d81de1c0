"""Run metrics: the table, the docs list, the stage wrapper, and a real Ray node's Prometheus
endpoint after a small job."""

from __future__ import annotations

import json
import pickle
import re
import socket
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from pipeline_helpers import corpus_rows, job_config, job_yaml
from prometheus_client.parser import text_string_to_metric_families
from ray import cloudpickle

from pipeline import metrics
from pipeline.runner import run_job
from testkit.ray_local import local_ray

REPO = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- metrics:begin -->", "<!-- metrics:end -->"


def test_docs_list_every_metric_from_the_table() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    generated = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    assert generated == metrics.markdown_table()  # regenerate: python -m pipeline.metrics


def test_every_metric_is_tagged_with_the_run_and_named_for_prometheus() -> None:
    names = [spec.name for spec in metrics.METRICS]
    assert len(set(names)) == len(names)
    for spec in metrics.METRICS:
        assert spec.tags[0] == "run_id", spec.name
        assert re.fullmatch(r"rgbatch_[a-z0-9_]+", spec.name), spec.name
        assert spec.description.endswith("."), spec.name
        assert (spec.kind == "histogram") == bool(spec.boundaries), spec.name
    counter = metrics.BY_NAME["rgbatch_rows_written"]
    assert counter.series == ("ray_rgbatch_rows_written_total",)


class _Doubler:
    """A stand-in stage class (real code path: the wrapper subclasses whatever class it gets)."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, table: pa.Table) -> pa.Table:
        return table.append_column("y", pa.array([v * self.factor for v in table["x"].to_pylist()]))


def test_timed_stage_class_keeps_its_name_and_behaviour_and_pickles_by_value() -> None:
    timed = metrics.timed(_Doubler, "double", "run-1")
    assert timed.__name__ == "_Doubler" and issubclass(timed, _Doubler)
    clone = pickle.loads(cloudpickle.dumps(timed))
    assert clone is not _Doubler and issubclass(clone, _Doubler)
    out = clone(3)(pa.table({"x": [1, 2]}))
    assert out["y"].to_pylist() == [3, 6]
    assert metrics._bound_run[0] == "run-1"


def test_timed_stage_function_passes_its_arguments() -> None:
    def add(table: pa.Table, value: int) -> pa.Table:
        return table.append_column("z", pa.array([value] * table.num_rows))

    timed = metrics.timed(add, "add", "run-2")
    assert timed(pa.table({"x": [1]}), value=7)["z"].to_pylist() == [7]
    assert timed.__name__ == "add"


# ------------------------------------------------------------------------- a real Ray node


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape(port: int, run_id: str) -> Counter:
    """Every sample of ``run_id`` on the node's endpoint, summed over Ray's own labels."""
    url = f"http://127.0.0.1:{port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("run_id") != run_id:
                continue
            ours = tuple(
                sorted(
                    (k, v)
                    for k, v in sample.labels.items()
                    if k in ("error_kind", "decision", "stage", "state", "le")
                )
            )
            samples[(sample.name, ours)] += sample.value
    return samples


def _total(samples: Counter, name: str, **labels: str) -> float:
    return sum(
        v for (n, tags), v in samples.items() if n == name and set(labels.items()) <= set(tags)
    )


@pytest.mark.slow
def test_prometheus_endpoint_counts_the_rows_and_errors_of_a_run(tmp_path, fixtures) -> None:
    rows = corpus_rows(14)
    lines = [json.dumps(r) for r in rows] + [json.dumps({"id": "no-text", "title": "t"})]
    raw = ("\n".join(lines) + "\n").encode() + b"{this is not json\n"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.jsonl").write_bytes(raw)
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in" / "rows.jsonl"),
        output_uri=str(tmp_path / "out"),
        extra={"run": {"max_error_fraction": 0.9}, "output": {"rows_per_file": 4}},
    )
    port = _free_port()
    system = {"metrics_report_interval_ms": 1000}  # the agent's default is 10 s
    with local_ray(num_cpus=8, _metrics_export_port=port, _system_config=system):
        result = run_job(job_config(text, run_id="watched"))
        counts = result.manifest["counts"]
        errors = sum(counts["error_kinds"].values())
        assert errors == 2 and counts["rows"] == len(rows) + 2
        predicted = result.manifest["estimate"]  # the run's own estimate, beside the actuals
        assert abs(predicted["rows"] - counts["rows"]) <= 0.25 * counts["rows"]
        assert (
            abs(predicted["prompt_tokens"] - counts["prompt_tokens"])
            <= 0.25 * counts["prompt_tokens"]
        )
        wanted = {
            "ray_rgbatch_rows_read_total": counts["rows"],
            "ray_rgbatch_rows_written_total": counts["rows_written"],
            "ray_rgbatch_rows_errored_total": errors,
            "ray_rgbatch_prompt_tokens_total": counts["prompt_tokens"],
            "ray_rgbatch_generated_tokens_total": counts["output_tokens"],
        }
        deadline = time.monotonic() + 90  # metrics reach the endpoint at the agent's interval
        while True:
            samples = _scrape(port, "watched")
            seen = {name: _total(samples, name) for name in wanted}
            done = _total(samples, "ray_rgbatch_run_state", state="succeeded") == 1
            done = done and _total(samples, "ray_rgbatch_run_start_time_seconds") > 0
            if (seen == wanted and done) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert seen == wanted
    assert done
    for kind, n in counts["error_kinds"].items():
        assert _total(samples, "ray_rgbatch_rows_errored_total", error_kind=kind) == n
    for decision, n in counts["toxicity_decisions"].items():
        assert _total(samples, "ray_rgbatch_toxicity_decisions_total", decision=decision) == n
    for stage in ("prompt", "model", "toxicity", "output"):
        assert _total(samples, "ray_rgbatch_stage_batch_seconds_count", stage=stage) > 0, stage
    assert _total(samples, "ray_rgbatch_engine_slots") == 8  # generation.max_slots, one replica
    assert _total(samples, "ray_rgbatch_run_start_time_seconds") > 0
    exported = {name for name, _ in samples}
    assert exported <= metrics.exported_names(), exported - metrics.exported_names()
