"""Pipeline efficiency: end-to-end generated tokens/s over engine-only tokens/s, same rows.

Workload (defaults): 2,000 rows of the kind `make run-local` reads (short documents, summarize
task), one model replica on CPU, a model of the engine benchmark's size (width 512, 6 layers
R,R,A, 4 heads, MLP 1536, window 256, float32) with random weights written in the Kaggle layout
and the tiny tokenizer (vocab 512), up to 32 new tokens per row, 32 slots; engine settings
prefill_batch 8, prefill_chunk 64, decode_steps 32.

1. engine only: the exact prompt ids the pipeline builds, through `Engine.generate` in one process
   (warm: compiled beforehand);
2. end to end: `run_job` on a local Ray cluster (read -> prompts -> model stage -> write; the
   toxicity stage on or off, `--toxicity`), wall time from submit to `_SUCCESS`, actor start-up
   included. `--compile-cache warm` (default): the model actor loads the engine's executables from
   the compilation cache, as any rerun or nightly run on the same nodes does (the engine-only pass
   fills a fresh cache); `--compile-cache cold`: the actor compiles them.

Both use the same engine settings and the same stop ids (EOS and end-of-turn: a chat checkpoint).

efficiency = (generated tokens / end-to-end seconds) / (generated tokens / engine seconds).

  python -m benchmarks.pipeline_efficiency [--rows 2000] [--toxicity] [--compile-cache cold]
                                           [--json out.json]
  python -m benchmarks.pipeline_efficiency --small      # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/...py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import jax
import jax.numpy as jnp
import pyarrow as pa
import ray
import yaml

from benchmarks import harness
from model.engine import Engine, GenerationRequest, enable_compilation_cache
from model.tokenizer import Tokenizer
from pipeline import columns as S
from pipeline.config import load_job_config
from pipeline.formats import ReadSpec
from pipeline.prompts import PromptBuilder
from pipeline.readers import read_file
from pipeline.request import RequestSettings
from pipeline.runner import run_job
from testkit.ray_local import start_local_ray
from testkit.tiny_model import random_params, tiny_config, write_kaggle_checkpoint

SAMPLE = harness.REPO_ROOT / "data" / "sample"


def write_corpus(path: Path, rows: int) -> None:
    """`rows` documents cycled from the committed sample corpus, with fresh ids."""
    docs = []
    for part in sorted(SAMPLE.glob("part-*.jsonl")):
        docs += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
    with path.open("w") as out:
        for i in range(rows):
            doc = dict(docs[i % len(docs)], id=f"row-{i:06d}")
            out.write(json.dumps(doc) + "\n")


def job(args: argparse.Namespace, root: Path, checkpoint: Path, detox: Path | None) -> dict:
    return {
        "task": "summarize",
        "input": {"uri": str(root / "corpus.jsonl"), "id_column": "id", "num_blocks": 8},
        "model": {
            "checkpoint": str(checkpoint),
            "dtype": "float32",
            "compilation_cache": args.compile_cache == "warm",
        },
        "generation": {
            "max_new_tokens": args.new_tokens,
            "max_prompt_tokens": 256,
            "max_slots": args.slots,
            "prefill_batch": 8,
            "prefill_chunk": 64,
            "decode_steps": 32,
            "batch_size": args.batch_size,
        },
        "toxicity": {"enabled": detox is not None, "checkpoint": str(detox) if detox else None},
        "output": {"uri": str(root / "out")},
        "run": {"num_cpus": 8},
    }


def engine_only(config_dict: dict, checkpoint: Path, root: Path) -> tuple[float, float, int]:
    """(warm seconds, seconds with compilation, tokens) for the same prompts, engine alone."""
    from model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    tokenizer = Tokenizer.load(ckpt.tokenizer_path)
    cfg = load_job_config(text=yaml.safe_dump(config_dict), run_id="engine-only")
    spec = ReadSpec(format="jsonl", id_column="id")
    table = pa.concat_tables(list(read_file(str(root / "corpus.jsonl"), spec)))
    builder = PromptBuilder(
        tokenizer,
        task=cfg.task,
        template=cfg.prompt_template(),
        chat=cfg.model.use_chat_template,
        max_prompt_tokens=cfg.generation.max_prompt_tokens,
        truncation=cfg.generation.truncation,
    )
    prompts = builder(table).column(S.PROMPT_IDS).to_pylist()
    gen = cfg.generation
    engine = Engine(
        ckpt.config,
        ckpt.params,
        max_slots=gen.max_slots,
        prefill_batch=gen.prefill_batch,
        prefill_chunk=gen.prefill_chunk,
        decode_steps=gen.decode_steps,
        dtype=jnp.float32,
    )
    # The stop ids the model stage uses, so both sides generate the same tokens.
    settings = RequestSettings.from_config(gen, chat=cfg.model.use_chat_template)
    stop_ids = settings.stop_ids(tokenizer, limit=engine.engine_config.max_stop_ids)
    requests = [GenerationRequest(p, gen.max_new_tokens, stop_ids=stop_ids) for p in prompts]
    _, compile_s = harness.time_call(engine.warmup)
    results, generate_s = harness.time_call(engine.generate, requests)
    return generate_s, compile_s + generate_s, sum(r.output_tokens for r in results)


def measure(
    args: argparse.Namespace, config: Any, root: Path
) -> tuple[float, float, int, float, int]:
    """(engine s, engine s with compilation, engine tokens, end-to-end s, end-to-end tokens)."""
    write_corpus(root / "corpus.jsonl", args.rows)
    checkpoint = write_kaggle_checkpoint(root / "ckpt", random_params(config, 0), config)
    detox = None
    if args.toxicity:
        from testkit.tiny_detoxify import build_tiny_detoxify

        detox = build_tiny_detoxify(root / "detoxify")
    config_dict = job(args, root, checkpoint, detox)

    engine_s, engine_cold_s, engine_tokens = engine_only(config_dict, checkpoint, root)
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "60")
    start_local_ray(num_cpus=8)
    try:
        cfg = load_job_config(text=yaml.safe_dump(config_dict), run_id="bench")
        result, e2e_s = harness.time_call(run_job, cfg)
    finally:
        ray.shutdown()
    return engine_s, engine_cold_s, engine_tokens, e2e_s, result.manifest["counts"]["output_tokens"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--toxicity", action="store_true", help="include the toxicity stage")
    parser.add_argument(
        "--compile-cache",
        choices=("warm", "cold"),
        default="warm",
        help="warm: the model actor finds the engine's executables in the compilation cache "
        "(as a rerun or the next nightly run does; the engine-only pass fills a fresh cache); "
        "cold: the actor compiles everything",
    )
    harness.add_output_args(parser, "tiny model, 64 rows (smoke run)")
    args = parser.parse_args(argv)

    if args.small:
        config, args.rows, args.new_tokens, args.batch_size = tiny_config(), 64, 8, 16
    else:
        config = tiny_config(
            width=512,
            mlp_expanded_width=1536,
            num_heads=4,
            lru_width=512,
            block_types=("recurrent", "recurrent", "attention") * 2,
            attention_window_size=256,
        )
    saved_env = os.environ.get("RGBATCH_CACHE_DIR")
    saved_cache = jax.config.jax_compilation_cache_dir
    with tempfile.TemporaryDirectory(prefix="rgbatch-bench-") as tmp:
        root = Path(tmp)
        # A fresh cache directory for this run only (the Ray workers inherit it).
        os.environ["RGBATCH_CACHE_DIR"] = str(root / "cache")
        try:
            if args.compile_cache == "warm":
                enable_compilation_cache()
            engine_s, engine_cold_s, engine_tokens, e2e_s, e2e_tokens = measure(args, config, root)
        finally:
            jax.config.update("jax_compilation_cache_dir", saved_cache)
            if saved_env is None:
                os.environ.pop("RGBATCH_CACHE_DIR", None)
            else:
                os.environ["RGBATCH_CACHE_DIR"] = saved_env

    engine_tps, e2e_tps = engine_tokens / engine_s, e2e_tokens / e2e_s
    out = {
        "rows": args.rows,
        "new_tokens": args.new_tokens,
        "toxicity": args.toxicity,
        "compile_cache": args.compile_cache,
        "engine_s": engine_s,
        "engine_tokens": engine_tokens,
        "engine_tokens_per_s": engine_tps,
        "end_to_end_s": e2e_s,
        "end_to_end_tokens": e2e_tokens,
        "end_to_end_tokens_per_s": e2e_tps,
        "efficiency": e2e_tps / engine_tps,
        "engine_with_compile_s": engine_cold_s,
        "efficiency_vs_engine_with_compile": engine_cold_s / e2e_s,
        "cpus": os.cpu_count(),
    }
    report = (
        f"engine only: {engine_tokens} tokens in {engine_s:.1f} s = {engine_tps:.0f} tok/s\n"
        f"end to end:  {e2e_tokens} tokens in {e2e_s:.1f} s = {e2e_tps:.0f} tok/s "
        f"(toxicity {'on' if args.toxicity else 'off'}, compilation cache {args.compile_cache})\n"
        f"efficiency:  {out['efficiency']:.2f} (vs the engine with its compilation: "
        f"{out['efficiency_vs_engine_with_compile']:.2f})"
    )
    return harness.finish(out, report, args.json, "pipeline")


if __name__ == "__main__":
    main()
