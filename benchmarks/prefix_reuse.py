"""One prefill per document for many questions: the engine with and without prefix reuse.

Workload (defaults): the CPU engine benchmark's model (width 512, 6 layers R,R,A x 2, 4 heads,
MLP 1536, vocab 8192, window 256, lru_width 512, float32, random weights). 64 documents of
960..1040 tokens (BOS and random ids) with 8 questions of 10..20 tokens each: 512 requests whose
prompt is a document and then a question, the 8 of one document adjacent, 32 new tokens each,
greedy, no stop. ``numpy.random.RandomState(seed)`` draws the document lengths, then the
question lengths, then the document ids, then the question ids.

One engine (32 slots, prefill_batch 8, prefill_chunk 64, decode_steps 32: the engine benchmark's
best CPU setting), warmed up, runs the requests twice through ``Engine.generate``:

  no reuse   every request with ``prefix_len=0``: each prompt prefilled whole
  reuse      ``prefix_len`` = the document's length: each document prefilled once, its state
             copied into the rows of its questions (the prefix cache starts empty)

Reported per run: prompt tokens actually prefilled (``engine.stats.prompt_tokens``), prefill
token slots (padding included), reused tokens, prefix cache hits / misses, wall seconds and
rows/s end to end, executables before and after; then the ratios and the greedy tokens compared
row by row. Targets (issue 13; reported, not asserted): at least 4x fewer prefilled tokens and
at least 2x the rows/s.

Run:
  .venv/bin/python -m benchmarks.prefix_reuse                 # the default workload (minutes)
  .venv/bin/python -m benchmarks.prefix_reuse --small         # smoke run (tiny model)
  .venv/bin/python -m benchmarks.prefix_reuse --json results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/...py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import jax
import numpy as np

from benchmarks import harness
from model.engine import Engine, EngineStats, GenerationRequest
from testkit.tiny_model import random_params

BOS_ID = 2
TARGETS = dict(prefilled_tokens_ratio=4.0, rows_per_s_ratio=2.0)

DEFAULTS: dict[str, int] = dict(
    docs=64,
    questions=8,
    min_doc=960,
    max_doc=1040,
    min_question=10,
    max_question=20,
    new_tokens=32,
    slots=32,
    prefill_batch=8,
    prefill_chunk=64,
    decode_steps=32,
    **harness.MODEL_DEFAULTS,
)
SMALL: dict[str, int] = dict(
    docs=6,
    questions=4,
    min_doc=40,
    max_doc=60,
    min_question=3,
    max_question=6,
    new_tokens=4,
    slots=4,
    prefill_batch=2,
    prefill_chunk=16,
    decode_steps=4,
    **harness.MODEL_SMALL,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    harness.add_workload_args(parser, DEFAULTS, SMALL)
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and workload")
    harness.add_output_args(parser, "tiny preset for a smoke run")
    args = parser.parse_args(argv)
    harness.resolve_workload_args(args, DEFAULTS, SMALL)
    if args.min_question < 1 or args.min_doc < 1:
        parser.error("documents and questions need at least one token")
    return args


def make_requests(args: argparse.Namespace, vocab: int) -> list[GenerationRequest]:
    """Document-major: the questions of one document adjacent; ``prefix_len`` = document."""
    rs = np.random.RandomState(args.seed)
    doc_lens = rs.randint(args.min_doc, args.max_doc + 1, size=args.docs)
    question_lens = rs.randint(
        args.min_question, args.max_question + 1, size=(args.docs, args.questions)
    )
    docs = [[BOS_ID, *rs.randint(3, vocab, size=int(n) - 1).tolist()] for n in doc_lens]
    requests = []
    for doc, lens in zip(docs, question_lens, strict=True):
        for n in lens:
            prompt = doc + rs.randint(3, vocab, size=int(n)).tolist()
            requests.append(
                GenerationRequest(prompt, args.new_tokens, stop_ids=(), prefix_len=len(doc))
            )
    return requests


def run(engine: Engine, requests: list[GenerationRequest], label: str) -> dict[str, Any]:
    """One timed ``generate`` on a warm engine, with its stats."""
    engine.stats = EngineStats()
    before = engine.compiled_shapes()
    start = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - start
    stats = engine.stats
    return dict(
        label=label,
        seconds=seconds,
        rows_per_s=len(requests) / seconds,
        generated_tokens_per_s=stats.generated_tokens / seconds,
        prefilled_tokens=stats.prompt_tokens,
        prefill_token_slots=stats.prefill_token_slots,
        prefill_calls=stats.prefill_calls,
        reused_prompt_tokens=stats.reused_prompt_tokens,
        prefix_cache_hits=stats.prefix_cache_hits,
        prefix_cache_misses=stats.prefix_cache_misses,
        decode_steps=stats.decode_steps,
        generated_tokens=stats.generated_tokens,
        compiled_shapes=[before, engine.compiled_shapes()],
        errors=sum(r.finish_reason == "error" for r in results),
        tokens=[r.token_ids for r in results],
    )


def format_report(results: dict[str, Any]) -> str:
    w, env = results["workload"], results["environment"]
    lines = [
        "",
        f"Prefix reuse: {w['docs']} documents of {w['min_doc']}..{w['max_doc']} tokens x "
        f"{w['questions']} questions of {w['min_question']}..{w['max_question']} tokens, "
        f"{w['new_tokens']} new tokens each, greedy ({w['requests']} rows, "
        f"{w['prompt_tokens']:,} prompt tokens)",
        f"model: {harness.model_summary(w)}, float32",
        f"engine: {w['slots']} slots, prefill_batch {w['prefill_batch']}, prefill_chunk "
        f"{w['prefill_chunk']}, decode_steps {w['decode_steps']}",
        harness.environment_line(env),
        harness.load_line(env),
        "",
    ]
    lines += harness.with_rule(
        f"{'run':<10}{'prefilled':>11}{'token slots':>13}{'reused':>10}{'hits/misses':>13}"
        f"{'seconds':>9}{'rows/s':>9}{'executables':>13}"
    )
    for row in results["runs"].values():
        shapes = "->".join(map(str, row["compiled_shapes"]))
        lines.append(
            f"{row['label']:<10}{row['prefilled_tokens']:>11,}{row['prefill_token_slots']:>13,}"
            f"{row['reused_prompt_tokens']:>10,}"
            f"{row['prefix_cache_hits']:>7}/{row['prefix_cache_misses']:<5}"
            f"{row['seconds']:>9.2f}{row['rows_per_s']:>9.2f}{shapes:>13}"
        )
    r, t = results["ratios"], TARGETS
    lines += [
        "",
        f"prefilled tokens: {r['prefilled_tokens']:.2f}x fewer with reuse (target >= "
        f"{t['prefilled_tokens_ratio']:g}x), token slots {r['prefill_token_slots']:.2f}x fewer",
        f"rows/s: {r['rows_per_s']:.2f}x with reuse (target >= {t['rows_per_s_ratio']:g}x)",
        f"greedy tokens equal with and without reuse: {results['greedy_equal_rows']}/"
        f"{w['requests']} rows",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    log = harness.Log("prefix_reuse", clock=True)
    config = harness.griffin_config(args)
    params = random_params(config, seed=args.seed)
    requests = make_requests(args, config.vocab_size)
    plain = [dataclasses.replace(r, prefix_len=0) for r in requests]
    results: dict[str, Any] = dict(
        environment=harness.environment(),
        workload=dict(
            docs=args.docs,
            questions=args.questions,
            min_doc=args.min_doc,
            max_doc=args.max_doc,
            min_question=args.min_question,
            max_question=args.max_question,
            new_tokens=args.new_tokens,
            requests=len(requests),
            prompt_tokens=sum(len(r.prompt_ids) for r in requests),
            document_tokens=sum(r.prefix_len for r in requests[:: args.questions]),
            slots=args.slots,
            prefill_batch=args.prefill_batch,
            prefill_chunk=args.prefill_chunk,
            decode_steps=args.decode_steps,
            **harness.model_fields(args, config),
            params=int(sum(x.size for x in jax.tree.leaves(params))),
            dtype="float32",
            seed=args.seed,
        ),
    )
    engine = Engine(
        config,
        params,
        max_slots=args.slots,
        prefill_batch=args.prefill_batch,
        prefill_chunk=args.prefill_chunk,
        decode_steps=args.decode_steps,
    )
    log("warm-up (compiles the three executables) ...")
    engine.warmup()
    log(f"no reuse: {len(plain)} rows ...")
    no_reuse = run(engine, plain, "no reuse")
    log(f"  {no_reuse['seconds']:.1f}s")
    engine.prefix_cache.clear()
    log(f"reuse: {len(requests)} rows ...")
    reuse = run(engine, requests, "reuse")
    log(f"  {reuse['seconds']:.1f}s")
    harness.record_load_after(results["environment"])

    equal = sum(a == b for a, b in zip(no_reuse["tokens"], reuse["tokens"], strict=True))
    results["greedy_equal_rows"] = equal
    results["runs"] = {}
    for key, row in (("no_reuse", no_reuse), ("reuse", reuse)):
        row.pop("tokens")
        results["runs"][key] = row
    results["ratios"] = dict(
        prefilled_tokens=no_reuse["prefilled_tokens"] / max(reuse["prefilled_tokens"], 1),
        prefill_token_slots=no_reuse["prefill_token_slots"] / max(reuse["prefill_token_slots"], 1),
        rows_per_s=reuse["rows_per_s"] / no_reuse["rows_per_s"],
    )
    results["targets"] = dict(
        **TARGETS,
        prefilled_tokens_met=results["ratios"]["prefilled_tokens"]
        >= TARGETS["prefilled_tokens_ratio"],
        rows_per_s_met=results["ratios"]["rows_per_s"] >= TARGETS["rows_per_s_ratio"],
    )
    return harness.finish(results, format_report(results), args.json, "prefix_reuse")


if __name__ == "__main__":
    main()
