"""Structured output through the engine: JSON-schema-constrained rows/s against unconstrained.

The same requests run three times on one warmed engine, in one process:

  plain        no constraint
  json_schema  every row constrained by the schema below (llguidance, :mod:`model.grammar`);
               the grammar compile is inside the timed run (once: the cache holds it)
  mixed        even rows constrained, odd rows plain: the plain rows' greedy tokens must equal
               those of the plain run (constrained rows share their continuous batch)

Workload: ``--rows`` prompts (the tiny test sentences, cycled, with the row number), greedy,
``--new-tokens`` each, stop at EOS; the tiny test model (width 64, 5 blocks) with random
weights; engine ``--slots`` slots, prefill batch 8, decode_steps 16. Two vocabularies: the tiny
SentencePiece model (512 pieces, the model's vocab 512) and, unless ``--small``, the same
model widened with synthetic pieces to 256,000 (Gemma's size; the model's embedding and logits
then 256,000 wide), so the masks and their transfers are at full size.

While a constrained row runs, each decode call takes one step (its matcher must see each token
before the next mask); reported per run: wall seconds, rows/s, generated tokens/s, decode calls,
host milliseconds spent computing masks and feeding matchers (total and per call),
executables before/after, and finish reasons. Target (issue 19, reported, not asserted):
json_schema rows/s >= 0.7x plain rows/s.

Run:
  .venv/bin/python -m benchmarks.grammar                # both vocabularies (minutes)
  .venv/bin/python -m benchmarks.grammar --small        # 512-piece vocabulary, fewer rows
  .venv/bin/python -m benchmarks.grammar --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

TARGET = 0.7
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 12},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "rating": {"type": "number"},
        "category": {"enum": ["news", "sports", "weather", "other"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["title", "year", "rating", "category", "tags"],
    "additionalProperties": False,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from benchmarks import harness

    parser = harness.parser(__doc__)
    parser.add_argument("--rows", type=int, default=None, help="requests (default 128; 32 small)")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--wide-vocab", type=int, default=256_000)
    harness.add_output_args(parser, "only the 512-piece vocabulary, 32 rows")
    args = parser.parse_args(argv)
    args.rows = args.rows or (32 if args.small else 128)
    return args


def tokenizers(args: argparse.Namespace) -> list[Any]:
    from model.tokenizer import Tokenizer
    from testkit.tiny_tokenizer import train_tiny_tokenizer, widen_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base = train_tiny_tokenizer(Path(tmp) / "t.model").read_bytes()
    out = [Tokenizer(base)]
    if not args.small:
        out.append(Tokenizer(widen_tokenizer(base, args.wide_vocab)))
    return out


def requests(tokenizer: Any, rows: int, new_tokens: int, grammar: Any, which: str) -> list[Any]:
    from model.engine import GenerationRequest
    from testkit.tiny_tokenizer import _SENTENCES

    out = []
    for i in range(rows):
        text = f"{_SENTENCES[i % len(_SENTENCES)]} Record {i} as JSON:"
        ids = tokenizer.encode(text, add_bos=True)
        constrained = which == "json_schema" or (which == "mixed" and i % 2 == 0)
        g = grammar() if constrained else None
        out.append(GenerationRequest(ids, new_tokens, stop_ids=(tokenizer.eos_id,), grammar=g))
    return out


class _HostTimer:
    """Wraps the scheduler's mask and matcher work to time it."""

    def __init__(self, scheduler: Any) -> None:
        self.seconds = 0.0
        for name in ("decode_plan", "_accept"):
            setattr(scheduler, name, self._timed(getattr(scheduler, name)))

    def _timed(self, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return call


def run_vocab(tokenizer: Any, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    from model.engine import Engine, EngineStats
    from model.grammar import Constraint, GrammarCache
    from testkit.tiny_model import random_params, tiny_config

    config = tiny_config(vocab_size=tokenizer.vocab_size)
    engine = Engine(
        config, random_params(config, seed=0), max_slots=args.slots, prefill_batch=8,
        decode_steps=16,
    )  # fmt: skip
    engine.warmup()
    timer = _HostTimer(engine.scheduler)
    runs: dict[str, Any] = {}
    tokens: dict[str, list[list[int]]] = {}
    for which in ("plain", "json_schema", "mixed"):
        cache = GrammarCache()
        cache.tokenizer(tokenizer)  # the byte table: once per tokenizer per replica, not timed

        def grammar(cache: GrammarCache = cache) -> Any:
            return cache.get(Constraint.json_schema(SCHEMA), tokenizer)

        engine.stats = EngineStats()
        timer.seconds = 0.0
        before = engine.compiled_shapes()
        start = time.perf_counter()
        batch = requests(tokenizer, args.rows, args.new_tokens, grammar, which)
        results = engine.generate(batch)
        seconds = time.perf_counter() - start
        stats = engine.stats
        texts = [tokenizer.decode(r.token_ids) for r in results]
        valid = sum(
            _valid(t) for r, t, q in zip(results, texts, batch, strict=True)
            if q.grammar is not None and r.finish_reason == "stop"
        )  # fmt: skip
        runs[which] = dict(
            seconds=seconds,
            rows_per_s=args.rows / seconds,
            generated_tokens_per_s=stats.generated_tokens / seconds,
            generated_tokens=stats.generated_tokens,
            decode_calls=stats.decode_calls,
            decode_steps=stats.decode_steps,
            host_grammar_ms=timer.seconds * 1e3,
            host_grammar_ms_per_call=timer.seconds * 1e3 / max(1, stats.decode_calls),
            compiles=cache.compiled,
            compiled_shapes=[before, engine.compiled_shapes()],
            finish_reasons=dict(collections.Counter(r.finish_reason for r in results)),
            constrained_stop_valid=valid,
            example=texts[0][:120],
        )
        tokens[which] = [r.token_ids for r in results]
        log(f"vocab {tokenizer.vocab_size}: {which} {seconds:.2f} s")
    odd = range(1, args.rows, 2)
    equal = sum(tokens["mixed"][i] == tokens["plain"][i] for i in odd)
    return dict(
        vocab=tokenizer.vocab_size,
        runs=runs,
        ratio=runs["json_schema"]["rows_per_s"] / runs["plain"]["rows_per_s"],
        mixed_plain_rows_equal=f"{equal}/{len(odd)}",
    )


def _valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def format_report(results: dict[str, Any]) -> str:
    from benchmarks import harness

    w = results["workload"]
    lines = [
        "",
        f"Structured output: {w['rows']} rows, {w['new_tokens']} new tokens, greedy, "
        f"{w['slots']} slots, tiny model (width 64, 5 blocks, random weights)",
        harness.environment_line(results["environment"]),
        "",
    ]
    lines += harness.with_rule(
        f"{'vocab':>8} {'run':<12}{'seconds':>9}{'rows/s':>9}{'tok/s':>9}{'calls':>7}"
        f"{'host ms/call':>14}{'valid/stop':>12}{'executables':>13}"
    )
    for v in results["vocabularies"]:
        for which, r in v["runs"].items():
            stops = r["finish_reasons"].get("stop", 0)
            shapes = "->".join(map(str, r["compiled_shapes"]))
            lines.append(
                f"{v['vocab']:>8} {which:<12}{r['seconds']:>9.2f}{r['rows_per_s']:>9.2f}"
                f"{r['generated_tokens_per_s']:>9.0f}{r['decode_calls']:>7}"
                f"{r['host_grammar_ms_per_call']:>14.2f}"
                f"{r['constrained_stop_valid']:>6}/{stops:<5}{shapes:>13}"
            )
        lines.append(
            f"{v['vocab']:>8} json_schema / plain rows/s: {v['ratio']:.2f}x (target >= "
            f"{TARGET}x); mixed run's plain rows equal to the plain run: "
            f"{v['mixed_plain_rows_equal']}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from benchmarks import harness

    args = parse_args(argv)
    log = harness.Log("grammar", clock=True)
    results: dict[str, Any] = dict(
        environment=harness.environment(),
        workload=dict(rows=args.rows, new_tokens=args.new_tokens, slots=args.slots),
        vocabularies=[run_vocab(tok, args, log) for tok in tokenizers(args)],
    )
    harness.record_load_after(results["environment"])
    return harness.finish(results, format_report(results), args.json, "grammar")


if __name__ == "__main__":
    main()
