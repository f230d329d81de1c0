"""Generation controls in the engine: n samples from one prefill, tokens wasted past a stop,
greedy rows unchanged beside rows with controls, and what the controls cost when on.

Parts, all on the tiny test model (testkit.tiny_model, vocab 512), greedy unless said:

  n          ``--prompts`` prompts with n=4 (temperature 0.8) against the same prompts submitted
             4 times each with n=1: prompt tokens prefilled (``EngineStats.prompt_tokens``),
             samples/s. n=4 must prefill each prompt once: prefilled == sum of prompt lengths.
  stop       each prompt with a stop string taken from the middle of its own greedy output,
             found on the device (its token sequence) and on the host only (its text): tokens
             generated past the stop per stopped row (the host check wastes at most
             ``decode_steps - 1``), against running to the token limit.
  mixed      the plain greedy rows alone, then with rows using penalties, min_tokens and
             logprobs in the same batches: whether every plain row's tokens are unchanged.
  cost       decode tokens/s of the same requests with no controls and with presence and
             repetition penalties plus logprobs on every row.

Run:
  .venv/bin/python -m benchmarks.controls --json out/bench/controls.json
  .venv/bin/python -m benchmarks.controls --small
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/...py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from benchmarks import harness
from model.engine import Engine, EngineStats, GenerationRequest
from testkit.tiny_model import random_params, tiny_config

TAG = "controls"


def detokenize(ids: Any) -> str:
    return "".join(f"<{int(i)}>" for i in ids)


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, int(rng.integers(4, 33))).tolist() for _ in range(count)]


def make_engine(params: Any, slots: int) -> Engine:
    engine = Engine(tiny_config(), params, max_slots=slots, detokenize=detokenize)
    engine.warmup()
    return engine


def timed(engine: Engine, requests: list[GenerationRequest]) -> tuple[list[Any], float]:
    engine.stats = EngineStats()
    start = time.perf_counter()
    results = engine.generate(requests)
    return results, time.perf_counter() - start


def n_part(engine: Engine, ids: list[list[int]], new: int) -> dict[str, Any]:
    base = [
        GenerationRequest(p, new, stop_ids=(), temperature=0.8, seed=i) for i, p in enumerate(ids)
    ]
    grouped, wall_n = timed(engine, [dataclasses.replace(r, n=4) for r in base])
    prefilled_n = engine.stats.prompt_tokens
    repeated = [dataclasses.replace(r, seed=r.seed * 4 + k) for r in base for k in range(4)]
    _, wall_1 = timed(engine, repeated)
    prefilled_1 = engine.stats.prompt_tokens
    return dict(
        prompts=len(ids),
        prompt_tokens=sum(map(len, ids)),
        prefilled_n4=prefilled_n,
        prefilled_4x_n1=prefilled_1,
        prefills_each_prompt_once=prefilled_n == sum(map(len, ids)),
        samples=sum(len(r.samples) for r in grouped),
        samples_per_s_n4=4 * len(ids) / wall_n,
        samples_per_s_4x_n1=4 * len(ids) / wall_1,
    )


def stop_part(engine: Engine, ids: list[list[int]], new: int) -> dict[str, Any]:
    plain = engine.generate([GenerationRequest(p, new, stop_ids=()) for p in ids])
    device, host = [], []
    for p, r in zip(ids, plain, strict=True):
        mid = len(r.token_ids) // 2
        seq = tuple(r.token_ids[mid : mid + 2])
        start = len(detokenize(r.token_ids[:mid])) - 2
        text = detokenize(r.token_ids)[start : start + 4]
        device.append(GenerationRequest(p, new, stop_ids=(), stop_sequences=(seq,)))
        host.append(GenerationRequest(p, new, stop_ids=(), stop_strings=(text,)))
    row: dict[str, Any] = dict(rows=len(ids), limit_tokens=sum(len(r.token_ids) for r in plain))
    for label, requests in (("device", device), ("host", host)):
        results, _ = timed(engine, requests)
        kept = sum(r.output_tokens for r in results)
        stopped = sum(r.finish_reason == "stop" for r in results)
        generated = engine.stats.generated_tokens + len(results)  # + each insert's first token
        row[label] = dict(
            stopped=stopped,
            kept_tokens=kept,
            generated_tokens=generated,
            wasted_per_stopped_row=(generated - kept) / max(stopped, 1),
            wasted_tokens_stat=engine.stats.wasted_tokens,
        )
    row["decode_steps"] = engine.engine_config.decode_steps
    return row


def mixed_part(engine: Engine, ids: list[list[int]], new: int) -> dict[str, Any]:
    plain = [GenerationRequest(p, new, stop_ids=()) for p in ids]
    alone = engine.generate(plain)
    controls = dict(presence_penalty=0.7, repetition_penalty=1.3, min_tokens=3, logprobs=5)
    mixed = [x for r in plain for x in (r, dataclasses.replace(r, **controls))]
    together = engine.generate(mixed)[::2]
    same = [a.token_ids == b.token_ids for a, b in zip(alone, together, strict=True)]
    return dict(rows=len(ids), plain_rows_unchanged=all(same), unchanged=sum(same))


def cost_part(engine: Engine, ids: list[list[int]], new: int) -> dict[str, Any]:
    plain = [GenerationRequest(p, new, stop_ids=()) for p in ids]
    on = dict(presence_penalty=0.5, repetition_penalty=1.2, logprobs=5)
    row = {}
    for label, requests in (("off", plain), ("on", [dataclasses.replace(r, **on) for r in plain])):
        results, wall = timed(engine, requests)
        row[f"tokens_per_s_{label}"] = sum(r.output_tokens for r in results) / wall
    row["on_over_off"] = row["tokens_per_s_on"] / row["tokens_per_s_off"]
    row["compiled_shapes"] = engine.compiled_shapes()
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.parser(__doc__)
    harness.add_output_args(parser, "tiny sizes (a smoke run)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    if args.small:
        args.prompts, args.slots, args.new_tokens = 8, 8, 12
    log = harness.Log(TAG, clock=True)
    env = harness.environment()
    params = random_params(tiny_config(), seed=0)
    engine = make_engine(params, args.slots)
    ids = prompts(args.prompts, tiny_config().vocab_size)
    results: dict[str, Any] = dict(environment=env, args=dict(vars(args), json=None))
    for name, part in (
        ("n", n_part),
        ("stop", stop_part),
        ("mixed", mixed_part),
        ("cost", cost_part),
    ):
        log(f"part {name}")
        results[name] = part(engine, ids, args.new_tokens)
        log(f"{name}: {results[name]}")
    harness.record_load_after(env)
    return harness.finish(results, None, args.json, TAG)


if __name__ == "__main__":
    main()
