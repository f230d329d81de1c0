"""How close is the estimate before a run to the run? (`rgbatch validate --estimate --calibrate`)

For each corpus a fresh driver process does what a user does: it estimates the job from a
sample with a calibration on the configured model (:func:`pipeline.estimate.calibrate`), then
runs the job (`run_job` on a local Ray of its own) and compares the estimate with the manifest:
rows, prompt tokens, generated tokens, and wall time (the manifest's ``started_at`` to
``finished_at``, which is what the estimate predicts: Ray's own start is not in it).

Corpora: the committed sample (``configs/local.yaml`` as ``make run-local`` runs it, toxicity
on) and a corpus of JSONL files of mixed sizes (6 to 1,200 rows, one gzipped; short and long
documents). Targets (issue 20): rows and prompt tokens within 25%, wall time within a factor of
1.5 either way.

    python -m benchmarks.estimate_accuracy --json out/bench/estimate.json
    python -m benchmarks.estimate_accuracy --small     # the mixed corpus only, smaller
"""

from __future__ import annotations

import argparse
import gzip
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
from benchmarks.pipeline_scale import VOCAB

REPO = Path(__file__).resolve().parents[1]
COUNT_TOLERANCE = 0.25
WALL_FACTOR = 1.5
MIXED_FILES = (("a.jsonl", 6), ("b.jsonl", 90), ("c.jsonl", 300), ("d.jsonl.gz", 400))
MIXED_BIG = ("e.jsonl", 1200)


def mixed_corpus(directory: Path, small: bool) -> None:
    """JSONL files of mixed sizes; documents of 20 to 400 words (so prompts of mixed length)."""
    rng = random.Random(7)
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, n in (*MIXED_FILES, *(() if small else (MIXED_BIG,))):
        lines = []
        for i in range(start, start + n):
            words = rng.choices(VOCAB, k=rng.choice((20, 60, 150, 400)))
            lines.append(json.dumps({"id": f"m{i}", "text": " ".join(words)}) + "\n")
        data = "".join(lines).encode()
        (directory / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        start += n


def child(config_path: str, run_id: str) -> dict[str, Any]:
    """One driver: estimate with calibration, then the run; returns both."""
    import ray

    from pipeline.config import load_job_config
    from pipeline.estimate import calibrate, estimate, prompted_sample
    from pipeline.runner import driver_tokenizer, run_job
    from testkit.ray_local import start_local_ray

    config = load_job_config(config_path, run_id=run_id, date="2026-12-03")
    tokenizer = driver_tokenizer(config)
    began = time.perf_counter()
    sample = prompted_sample(config, tokenizer, 400)
    throughput = calibrate(config, sample)
    predicted = estimate(config, tokenizer, throughput=throughput, sample=sample)
    estimate_s = time.perf_counter() - began
    start_local_ray(num_cpus=config.run.num_cpus)
    try:
        result = run_job(config)
    finally:
        ray.shutdown()
    manifest = result.manifest
    wall = _seconds(manifest["finished_at"]) - _seconds(manifest["started_at"])
    counts = manifest["counts"]
    actual = {
        "rows": counts["rows"],
        "prompt_tokens": counts["prompt_tokens"],
        "generated_tokens": counts["output_tokens"],
        "wall_s": round(wall, 2),
    }
    guess = {
        "rows": predicted.rows,
        "prompt_tokens": predicted.prompt_tokens,
        "generated_tokens": predicted.generated_tokens,
        "wall_s": round(predicted.wall_s or 0.0, 2),
    }
    return {
        "estimate": guess,
        "actual": actual,
        "ratio": {k: round(guess[k] / max(actual[k], 1e-9), 3) for k in actual},
        "throughput": predicted.throughput,
        "estimate_s": round(estimate_s, 2),
        "operator_task_s": manifest.get("operator_task_s", {}),
    }


def _seconds(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _job(config: Path, input_uri: str, output_uri: str, fixtures: Path, fmt: str | None) -> None:
    import yaml

    job = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    job["input"]["uri"] = input_uri
    job["input"]["passthrough"] = []
    if fmt:
        job["input"]["format"] = fmt
    job["model"]["checkpoint"] = str(fixtures / "tiny-it")
    job["toxicity"]["checkpoint"] = str(fixtures / "detoxify" / "tiny-detoxify-original.ckpt")
    job["output"]["uri"] = output_uri
    config.write_text(yaml.safe_dump(job))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__)
    harness.add_output_args(parser, "the mixed corpus only, without its largest file")
    parser.add_argument("--workdir", help="keep corpora and outputs here (default: a temp dir)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return {}

    from testkit.tiny_detoxify import build_tiny_detoxify
    from testkit.tiny_model import build_tiny_checkpoint

    env = harness.environment()
    cases: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rgbatch-estimate-") as tmp:
        workdir = Path(args.workdir or tmp)
        fixtures = workdir / "fixtures"
        build_tiny_checkpoint(fixtures)
        build_tiny_detoxify(fixtures / "detoxify")
        mixed_corpus(workdir / "mixed", args.small)
        corpora = {
            "sample": (str(REPO / "data" / "sample" / "*.jsonl"), None),
            "mixed": (str(workdir / "mixed" / "*.jsonl*"), "jsonl"),
        }
        if args.small:
            corpora.pop("sample")
        for name, (uri, fmt) in corpora.items():
            config = workdir / f"{name}.yaml"
            _job(config, uri, str(workdir / "out"), fixtures, fmt)
            cases[name] = harness.run_module_json(
                "benchmarks.estimate_accuracy", "--child", str(config), name, label=name
            )
    harness.record_load_after(env)
    lines = []
    ok = True
    for name, case in cases.items():
        ratio = case["ratio"]
        counts_ok = all(abs(ratio[k] - 1) <= COUNT_TOLERANCE for k in ("rows", "prompt_tokens"))
        wall_ok = 1 / WALL_FACTOR <= ratio["wall_s"] <= WALL_FACTOR
        ok = ok and counts_ok and wall_ok
        est, act = case["estimate"], case["actual"]
        lines.append(
            f"{name:>7}: rows {est['rows']:,}/{act['rows']:,}, prompt tokens "
            f"{est['prompt_tokens']:,}/{act['prompt_tokens']:,}, generated "
            f"{est['generated_tokens']:,}/{act['generated_tokens']:,}, wall "
            f"{est['wall_s']:.1f}/{act['wall_s']:.1f} s (estimate/actual: wall x{ratio['wall_s']})"
        )
    lines.append(
        f"targets: rows and prompt tokens within {COUNT_TOLERANCE:.0%}, wall time within a "
        f"factor of {WALL_FACTOR}: {'met' if ok else 'NOT met'}"
    )
    results = {
        "benchmark": "estimate_accuracy",
        "date": time.strftime("%Y-%m-%d"),
        "environment": env,
        "cases": cases,
        "targets": {"count_tolerance": COUNT_TOLERANCE, "wall_factor": WALL_FACTOR},
        "meets_targets": ok,
    }
    return harness.finish(results, "\n".join(lines), args.json, "estimate_accuracy")


if __name__ == "__main__":
    main()
