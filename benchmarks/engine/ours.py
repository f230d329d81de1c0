"""Our continuous-batching Engine on the workload, per engine setting.

``model.engine.Engine(config, params, max_slots=slots, ...)`` and ``engine.generate(requests)``
with ``GenerationRequest(prompt, max_new_tokens, stop_ids=())``: all requests at once; finished
sequences free their slot for the next prompt at once. Besides the engine's own defaults
(prefill_batch 8, prefill_chunk 128, decode_steps 16), the settings of ``--engine-configs``
(prefill_batch:prefill_chunk:decode_steps) are run; the best warm one is "ours best". Small chunks
pay off because the engine prefills queued prompts of similar length together; a decode call
hands back as soon as prefill_batch slots are free, so decode_steps is only a cap.

cold: a fresh Engine (device put of the params, every compilation) + generate. warm: a second
generate on the same engine (every shape compiled already). The defaults are timed warm only
(after ``engine.warmup()``), to save a minute, unless they turn out best. Each warm run is
instrumented: every jitted call is followed by block_until_ready and timed, so prefill / insert /
decode / host time and the padded work are reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import harness
from model import ModelConfig
from model.engine import Engine, EngineStats, GenerationRequest


class _Timed:
    """Wraps one of the engine's jitted functions: waits for its result and adds up the time."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls, self.seconds = 0, 0.0

    def __call__(self, *args: Any) -> Any:
        out, seconds = harness.time_call(self.fn, *args)
        self.seconds += seconds
        self.calls += 1
        return out


def instrument(engine: Engine) -> dict[str, _Timed]:
    """Per-function device time of the next run (block_until_ready after each call)."""
    timers = {
        "prefill": _Timed(engine._prefill),
        "insert": _Timed(engine._insert),
        "decode": _Timed(engine._decode),
    }
    for name, timer in timers.items():
        setattr(engine, f"_{name}", timer)
    return timers


def engine_label(options: dict[str, int]) -> str:
    if not options:
        return "ours defaults"
    return "ours pb{prefill_batch} c{prefill_chunk} ds{decode_steps}".format(**options)


def _requests(prompts: list[list[int]], max_new: list[int]) -> list[GenerationRequest]:
    return [GenerationRequest(p, m, stop_ids=()) for p, m in zip(prompts, max_new, strict=True)]


def run_ours(
    config: ModelConfig,
    params: Any,
    prompts: list[list[int]],
    max_new: list[int],
    slots: int,
    options: dict[str, int],
    *,
    cold: bool = True,
) -> tuple[dict[str, Any], list[list[int]], Engine]:
    """Cold (fresh engine + compile + generate) then warm (same engine again, instrumented).

    Without ``cold`` the first run is replaced by ``engine.warmup()`` and only warm is timed.
    """
    requests = _requests(prompts, max_new)
    useful = sum(max_new)
    start = time.perf_counter()
    engine = Engine(config, params, max_slots=slots, **options)
    tokens: list[list[int]] | None = None
    if cold:
        tokens = [r.token_ids for r in engine.generate(requests)]
    else:
        engine.warmup()
    first_s = time.perf_counter() - start
    shapes_cold = engine.compiled_shapes()
    timers = instrument(engine)
    engine.stats = EngineStats()
    start = time.perf_counter()
    warm_results = engine.generate(requests)
    warm_s = time.perf_counter() - start
    for name, timer in timers.items():
        setattr(engine, f"_{name}", timer.fn)
    warm_tokens = [r.token_ids for r in warm_results]
    ec = engine.engine_config
    exact = all(len(t) == m for t, m in zip(tokens or warm_tokens, max_new, strict=True))
    decode_calls = timers["decode"].calls
    row = dict(
        label=engine_label(options),
        max_slots=ec.max_slots,
        prefill_batch=ec.prefill_batch,
        prefill_chunk=ec.prefill_chunk,
        decode_steps=ec.decode_steps,
        useful_tokens=useful,
        cold_s=None,
        cold_tokens_per_s=None,
        warmup_s=None if cold else first_s,
        warm_s=warm_s,
        warm_tokens_per_s=useful / warm_s,
        prefill_rows=engine.prefill_rows,
        compiled_shapes_after_cold=shapes_cold,
        compiled_shapes_after_warm=engine.compiled_shapes(),
        exact_lengths=exact,
        breakdown=dict(
            prefill_s=timers["prefill"].seconds,
            prefill_calls=timers["prefill"].calls,
            insert_s=timers["insert"].seconds,
            insert_calls=timers["insert"].calls,
            decode_s=timers["decode"].seconds,
            decode_calls=decode_calls,
            host_s=warm_s - sum(t.seconds for t in timers.values()),
            decode_slot_steps=engine.stats.decode_steps * ec.max_slots,
            decode_steps=engine.stats.decode_steps,
            prefill_token_slots=engine.stats.prefill_token_slots,
            prompt_tokens=sum(len(p) for p in prompts),
        ),
    )
    if cold:
        row.update(cold_s=first_s, cold_tokens_per_s=useful / first_s)
        row["warm_tokens_equal_cold"] = warm_tokens == tokens
    if not exact:
        row["error"] = "some request did not generate exactly max_new_tokens"
    return row, warm_tokens, engine


def run_settings(
    config: ModelConfig,
    params: Any,
    prompts: list[list[int]],
    max_new: list[int],
    slots: int,
    engine_configs: Sequence[tuple[int, int, int]],
    log: harness.Log,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[list[int]] | None, Engine]:
    """The engine defaults, then each prefill_batch:prefill_chunk:decode_steps setting.

    Returns (a row per setting, the best row by warm tokens/s or None if every one failed, the
    best one's greedy tokens, the last engine run).
    """
    rows: list[dict[str, Any]] = []
    settings: list[dict[str, int]] = [{}]
    settings += [
        dict(prefill_batch=pb, prefill_chunk=c, decode_steps=ds) for pb, c, ds in engine_configs
    ]
    best: dict[str, Any] | None = None
    best_tokens: list[list[int]] | None = None
    for options in settings:
        # The engine defaults are timed warm only (a cold run costs a minute on 2 CPUs);
        # every other setting cold and warm. The best gets a cold run below if it lacks one.
        cold = bool(options) or len(settings) == 1
        log(f"{engine_label(options)}: {'cold then ' if cold else 'warm-up then '}warm ...")
        row, tokens, engine = run_ours(config, params, prompts, max_new, slots, options, cold=cold)
        row["options"] = options
        rows.append(row)
        cold_text = "" if row["cold_s"] is None else f"cold {row['cold_s']:.1f}s, "
        log(f"  {cold_text}warm {row['warm_s']:.1f}s")
        if "error" not in row and (
            best is None or row["warm_tokens_per_s"] > best["warm_tokens_per_s"]
        ):
            best, best_tokens = row, tokens
    if best is not None and best["cold_s"] is None:
        log(f"{best['label']}: cold ...")
        # A fresh engine compiling and running the requests.
        requests = _requests(prompts, max_new)
        start = time.perf_counter()
        Engine(config, params, max_slots=slots, **best["options"]).generate(requests)
        cold_s = time.perf_counter() - start
        best.update(cold_s=cold_s, cold_tokens_per_s=sum(max_new) / cold_s)
    return rows, best, best_tokens, engine
