"""Pipeline at corpus scale: does the driver's work grow with the corpus?

Runs the whole job (`run_job` on a local Ray cluster: read -> prompts -> model -> write ->
finalise) on JSONL corpora of short rows (20 to 60 words) at two sizes, with the tiny fixture
model, one new token and toxicity off, so that the pipeline, not the model, is what is timed.
Each size runs in a fresh driver process, which reports at its end:

- wall time and rows/s of `run_job`;
- the driver's peak RSS (`VmHWM` in /proc/self/status);
- the bytes the driver process read (`rchar` in /proc/self/io: files and sockets alike);
- task seconds per plan operator (Ray Data's stats, from the manifest), per row.

Targets (issue 9): from the small to the large size the driver's peak RSS grows by at most 64 MB
and it reads at most 100 bytes per additional row.

    python -m benchmarks.pipeline_scale --json out/bench/pipeline_scale.json
    python -m benchmarks.pipeline_scale --sizes 2000 20000   # quicker
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/...py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness

DEFAULT_SIZES = (20_000, 200_000)
FILES = 16
RSS_GROWTH_TARGET_MB = 64
READ_PER_ROW_TARGET = 100
VOCAB = [
    "river",
    "market",
    "council",
    "school",
    "bridge",
    "harvest",
    "storm",
    "library",
    "festival",
    "railway",
    "museum",
    "hospital",
    "mayor",
    "teacher",
    "farmer",
    "budget",
    "report",
    "season",
    "village",
    "harbour",
    "factory",
    "garden",
    "engine",
    "ticket",
    "weather",
    "summer",
    "winter",
    "station",
    "street",
    "clinic",
    "theatre",
    "record",
    "opened",
    "closed",
    "rose",
    "fell",
    "grew",
    "moved",
    "built",
    "planned",
    "voted",
    "visited",
    "repaired",
    "announced",
]


def make_corpus(directory: Path, rows: int, files: int = FILES, seed: int = 0) -> int:
    """JSONL files of short rows (20 to 60 words); returns the bytes written."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    handles = [open(directory / f"part-{i:03d}.jsonl", "w") for i in range(files)]  # noqa: SIM115
    try:
        for i in range(rows):
            words = rng.choices(VOCAB, k=rng.randint(20, 60))
            line = json.dumps({"id": f"doc-{i:07d}", "text": " ".join(words).capitalize() + "."})
            handles[i % files].write(line + "\n")
    finally:
        for handle in handles:
            handle.close()
    return sum(p.stat().st_size for p in directory.glob("*.jsonl"))


def job_yaml(
    input_uri: str,
    output_uri: str,
    checkpoint: str,
    *,
    storage_options: dict[str, Any] | None = None,
    rows_per_file: int = 8192,
) -> str:
    """The benchmark job (summarize, one new token, toxicity off) over ``input_uri`` (JSONL);
    ``storage_options`` go to both the input and the output."""
    storage = {"storage_options": storage_options} if storage_options else {}
    return json.dumps(
        {
            "task": "summarize",
            "input": {"uri": input_uri, "id_column": "id", **storage},
            "model": {"checkpoint": checkpoint, "dtype": "float32"},
            "generation": {
                "max_new_tokens": 1,
                "max_prompt_tokens": 256,
                "max_slots": 64,
                "prefill_batch": 16,
                "prefill_chunk": 128,
                "batch_size": 1024,
            },
            "toxicity": {"enabled": False},
            "output": {
                "uri": output_uri,
                "format": "parquet",
                "rows_per_file": rows_per_file,
                **storage,
            },
            "run": {"num_cpus": 8, "progress_interval_s": 30},
        }
    )


def _proc(name: str, key: str) -> int:
    for line in Path(f"/proc/self/{name}").read_text().splitlines():
        if line.startswith(key):
            value = line.split(":", 1)[1].split()[0]
            return int(value) * (1024 if name == "status" else 1)
    raise KeyError(key)


def child(config_path: str, run_id: str) -> dict[str, Any]:
    """One driver: runs the job and reports what this process used."""
    import ray

    from pipeline.config import load_job_config
    from pipeline.runner import run_job
    from testkit.ray_local import start_local_ray

    config = load_job_config(config_path, run_id=run_id, date="2026-11-30")
    start_local_ray(num_cpus=config.run.num_cpus)
    rchar_before = _proc("io", "rchar")
    started = time.perf_counter()
    try:
        result = run_job(config)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - started
    manifest = result.manifest
    rows = manifest["counts"]["rows"]
    return {
        "rows": rows,
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows / wall, 1),
        "driver_peak_rss_mb": round(_proc("status", "VmHWM") / 2**20, 1),
        "driver_read_bytes": _proc("io", "rchar") - rchar_before,
        "driver_read_bytes_total": _proc("io", "rchar"),
        "operator_task_s": manifest.get("operator_task_s", {}),
        "operator_us_per_row": {
            name: round(1e6 * seconds / max(rows, 1), 1)
            for name, seconds in manifest.get("operator_task_s", {}).items()
        },
    }


def run_size(rows: int, workdir: Path, checkpoint: str) -> dict[str, Any]:
    corpus = workdir / f"corpus-{rows}"
    corpus_bytes = make_corpus(corpus, rows)
    config = workdir / f"job-{rows}.yaml"
    config.write_text(job_yaml(f"{corpus}/*.jsonl", str(workdir / "out"), checkpoint))
    result = harness.run_module_json(
        "benchmarks.pipeline_scale", "--child", str(config), f"r{rows}", label=f"{rows} rows"
    )
    result["corpus_bytes"] = corpus_bytes
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs=2, default=DEFAULT_SIZES)
    harness.add_output_args(parser, "sizes 1,000 and 4,000 rows (a smoke run)")
    parser.add_argument("--workdir", help="keep corpora and outputs here (default: a temp dir)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.small:
        args.sizes = (1_000, 4_000)
    if args.child:
        print(json.dumps(child(*args.child)))
        return {}

    from testkit.tiny_model import build_tiny_checkpoint

    env = harness.environment()
    with tempfile.TemporaryDirectory(prefix="rgbatch-scale-") as tmp:
        workdir = Path(args.workdir or tmp)
        checkpoint = str(build_tiny_checkpoint(workdir / "fixtures"))
        small, large = (run_size(n, workdir, checkpoint) for n in sorted(args.sizes))
    harness.record_load_after(env)
    extra_rows = large["rows"] - small["rows"]
    rss_growth = large["driver_peak_rss_mb"] - small["driver_peak_rss_mb"]
    read_per_row = (large["driver_read_bytes"] - small["driver_read_bytes"]) / max(extra_rows, 1)
    results = {
        "benchmark": "pipeline_scale",
        "date": time.strftime("%Y-%m-%d"),
        "environment": env,
        "sizes": {str(small["rows"]): small, str(large["rows"]): large},
        "driver_rss_growth_mb": round(rss_growth, 1),
        "driver_read_bytes_per_extra_row": round(read_per_row, 1),
        "targets": {
            "driver_rss_growth_mb": RSS_GROWTH_TARGET_MB,
            "driver_read_bytes_per_extra_row": READ_PER_ROW_TARGET,
        },
        "meets_targets": rss_growth <= RSS_GROWTH_TARGET_MB and read_per_row <= READ_PER_ROW_TARGET,
    }
    lines = []
    for size in (small, large):
        lines.append(
            f"{size['rows']:>8,} rows: {size['wall_s']:8.1f} s, {size['rows_per_s']:8.1f} rows/s, "
            f"driver peak RSS {size['driver_peak_rss_mb']:7.1f} MB, "
            f"driver read {size['driver_read_bytes'] / 2**20:8.2f} MiB"
        )
        per_row = ", ".join(f"{k} {v} us" for k, v in size["operator_us_per_row"].items())
        lines.append(f"          task time per row: {per_row}")
    lines.append(
        f"driver RSS growth {rss_growth:.1f} MB (target <= {RSS_GROWTH_TARGET_MB}), "
        f"read {read_per_row:.1f} bytes per extra row (target <= {READ_PER_ROW_TARGET})"
    )
    return harness.finish(results, "\n".join(lines), args.json, "pipeline_scale")


if __name__ == "__main__":
    main()
