"""Fault soak: a whole job through flaky object storage, against the same job without faults.

Serves an S3 stand-in (moto's server) on 127.0.0.1 behind :class:`tests.fault_proxy.FaultProxy`,
puts a JSONL corpus of short rows there, and runs the job (tiny fixture model, one new token,
toxicity off, 1,024 rows per part file) twice in fresh driver processes: input and output both
through the proxy, first with no fault (the proxy forwards everything), then with faults on 10%
of all requests (reads, listings, part and summary writes, Ray Data's checkpoint, the manifest
and ``_SUCCESS``): a quarter each refused connections, connections cut mid-transfer, 503
SlowDown answers and 2 s delays, drawn from a fixed seed. The storage options are what the README
tells users to set: botocore's standard retry mode with 10 attempts.

Each run reports its wall time, its exit (a run that fails is rerun once, and the rerun counted),
the faults injected per kind, and what a direct (proxy-free) read of its outputs finds: rows
lost, rows duplicated, and whether ``_SUCCESS`` and the manifest's row count agree.

    python -m benchmarks.fault_soak --json out/bench/fault_soak.json   # 20,000 rows
    python -m benchmarks.fault_soak --small                            # 1,000 rows
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/...py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness
from benchmarks.pipeline_scale import VOCAB, job_yaml

DEFAULT_ROWS = 20_000
SMALL_ROWS = 1_000
FILES = 8
FAULT_RATE = 0.10
KINDS = ("refuse", "cut", "slowdown", "delay")
SEED = 20261130
DELAY_S = 2.0
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def fault_rules(rate: float) -> list[Any]:
    """One rule per kind over every request, chained so that ``rate`` of all requests get a
    fault, a quarter of them of each kind (a later rule only draws for what earlier ones let by)."""
    from tests.fault_proxy import Rule

    share = rate / len(KINDS)
    rules = []
    for i, kind in enumerate(KINDS):
        rules.append(Rule(kind, share / (1 - share * i), delay_s=DELAY_S, name=kind))
    return rules


def make_corpus(fs: Any, prefix: str, rows: int, seed: int = 0) -> None:
    """JSONL files of short rows (20 to 60 words) written straight to the bucket."""
    import random

    rng = random.Random(seed)
    chunks: list[list[str]] = [[] for _ in range(FILES)]
    for i in range(rows):
        words = rng.choices(VOCAB, k=rng.randint(20, 60))
        line = json.dumps({"id": f"doc-{i:07d}", "text": " ".join(words).capitalize() + "."})
        chunks[i % FILES].append(line + "\n")
    for i, lines in enumerate(chunks):
        fs.pipe_file(f"{prefix}/part-{i:03d}.jsonl", "".join(lines).encode())


def run_driver(config: Path, run_id: str, log: Path) -> tuple[int, float]:
    """``python -m pipeline.cli run`` in a fresh process: (exit status, wall seconds)."""
    import subprocess

    env = {**os.environ, **FAKE_CREDENTIALS}
    env["PYTHONPATH"] = str(harness.REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    started = time.perf_counter()
    with log.open("ab") as out:
        status = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "run", str(config), "--run-id", run_id],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        ).returncode
    return status, time.perf_counter() - started


def audit(fs: Any, run_dir: str, rows: int) -> dict[str, Any]:
    """What a direct read of the outputs finds: rows lost and duplicated, _SUCCESS, manifest."""
    import pyarrow.parquet as pq

    fs.invalidate_cache()
    ids: list[str] = []
    parts = sorted(fs.glob(f"{run_dir}/part-*.parquet"))
    for path in parts:
        ids.extend(
            pq.read_table(io.BytesIO(fs.cat_file(path)), columns=["id"]).column(0).to_pylist()
        )
    expected = {f"doc-{i:07d}" for i in range(rows)}
    manifest_path = f"{run_dir}/_manifest.json"
    manifest = json.loads(fs.cat_file(manifest_path)) if fs.exists(manifest_path) else {}
    return {
        "success_marker": fs.exists(f"{run_dir}/_SUCCESS"),
        "parts": len(parts),
        "rows_out": len(ids),
        "rows_lost": len(expected - set(ids)),
        "rows_duplicated": len(ids) - len(set(ids)),
        "manifest_rows": manifest.get("counts", {}).get("rows"),
    }


def soak_run(
    name: str, proxy: Any, rules: list[Any], direct: Any, bucket: str, config: Path, rows: int
) -> dict[str, Any]:
    proxy.set_rules(rules, seed=SEED)
    proxy.reset_counts()
    log = config.with_suffix(".log")
    status, wall = run_driver(config, name, log)
    attempts = [{"exit": status, "wall_s": round(wall, 1)}]
    if status != 0:  # the run's promise: a rerun of the same run id finishes the work
        status, rerun_wall = run_driver(config, name, log)
        attempts.append({"exit": status, "wall_s": round(rerun_wall, 1)})
        wall += rerun_wall
    counts = proxy.counts()
    with proxy.paused():
        found = audit(direct, f"{bucket}/out/{name}", rows)
    return {
        "run_id": name,
        "rows": rows,
        "wall_s": round(wall, 1),
        "rows_per_s": round(rows / wall, 1),
        "attempts": attempts,
        "reruns": len(attempts) - 1,
        "exit": status,
        "requests": proxy.requests,
        "faults_injected": {n: c["injected"] for n, c in counts.items()},
        "faults_total": sum(c["injected"] for c in counts.values()),
        **found,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--rate", type=float, default=FAULT_RATE, help="share of requests faulted")
    harness.add_output_args(parser, f"{SMALL_ROWS:,} rows (a smoke run)")
    parser.add_argument("--workdir", help="keep configs and driver logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.small:
        args.rows = SMALL_ROWS

    import s3fs
    from moto.server import ThreadedMotoServer

    from testkit.tiny_model import build_tiny_checkpoint
    from tests.fault_proxy import FaultProxy, proxied_options

    env = harness.environment()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with (
            tempfile.TemporaryDirectory(prefix="rgbatch-soak-") as tmp,
            FaultProxy(endpoint, seed=SEED) as proxy,
        ):
            workdir = Path(args.workdir or tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            checkpoint = str(build_tiny_checkpoint(workdir / "fixtures"))
            options = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing"}
            options["secret"] = "testing"
            direct = s3fs.S3FileSystem(**options, skip_instance_cache=True)
            bucket = f"rgbatch-soak-{uuid.uuid4().hex[:8]}"
            direct.mkdir(bucket)
            make_corpus(direct, f"{bucket}/in", args.rows)
            storage = proxied_options(options, proxy.url, max_attempts=10)
            storage.pop("skip_instance_cache")
            config = workdir / "job.yaml"
            config.write_text(
                job_yaml(
                    f"s3://{bucket}/in/*.jsonl",
                    f"s3://{bucket}/out",
                    checkpoint,
                    storage_options=storage,
                    rows_per_file=1024,
                )
            )
            runs = {}
            for name, rules in (("clean", []), ("faulty", fault_rules(args.rate))):
                print(f"[fault_soak] {name} run of {args.rows:,} rows ...", flush=True)
                runs[name] = soak_run(name, proxy, rules, direct, bucket, config, args.rows)
    finally:
        server.stop()
    harness.record_load_after(env)
    clean, faulty = runs["clean"], runs["faulty"]
    results = {
        "benchmark": "fault_soak",
        "date": time.strftime("%Y-%m-%d"),
        "environment": env,
        "rows": args.rows,
        "fault_rate": args.rate,
        "seed": SEED,
        "runs": runs,
        "slowdown": round(faulty["wall_s"] / clean["wall_s"], 2),
        "nothing_lost": all(
            r["rows_lost"] == 0 and r["rows_duplicated"] == 0 and r["success_marker"]
            for r in runs.values()
        ),
    }
    lines = [
        f"{name:>6}: {r['wall_s']:7.1f} s ({r['rows_per_s']:.1f} rows/s), exit {r['exit']}, "
        f"reruns {r['reruns']}, {r['faults_total']} faults in {r['requests']} requests "
        f"{r['faults_injected']}, lost {r['rows_lost']}, duplicated {r['rows_duplicated']}, "
        f"_SUCCESS {r['success_marker']}, manifest rows {r['manifest_rows']}"
        for name, r in runs.items()
    ]
    lines.append(
        f"faulty / clean wall time: {results['slowdown']}x; nothing lost: {results['nothing_lost']}"
    )
    lines.append(harness.load_line(env))
    return harness.finish(results, "\n".join(lines), args.json, "fault_soak")


if __name__ == "__main__":
    main()
