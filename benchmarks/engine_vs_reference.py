"""Generation throughput of our continuous-batching Engine against the official sampler and HF.

Workload (defaults): one random-weight model shared by all three implementations, width 512,
6 layers (recurrent, recurrent, attention) x 2, 4 heads, MLP 1536, vocab 8192, window 256,
lru_width 512, float32, on the default JAX backend (CPU here). 256 requests whose prompt lengths
and then max_new_tokens are drawn uniformly from 16..128 with ``numpy.random.RandomState(0)``
(``rs.randint(16, 129, size=n)`` twice), then the prompt token ids from the same RandomState in
[2, vocab). Nothing stops early: every request generates exactly its max_new_tokens, greedily.
Throughput is *useful* generated tokens per second: the sum of max_new_tokens over the requests
(17,830 tokens for seed 0), whatever extra work an implementation does.

  ours      model.engine.Engine(config, params, max_slots=32, ...) and ``engine.generate(requests)``
            with ``GenerationRequest(prompt, max_new_tokens, stop_ids=())``: all 256 requests at
            once; finished sequences free their slot for the next prompt at once. Besides the
            engine's own defaults (prefill_batch 8, prefill_chunk 128, decode_steps 16), the
            settings of ``--engine-configs`` (prefill_batch:prefill_chunk:decode_steps, default
            8:32:32,4:64:32) are run; the best warm one is "ours best". Small chunks pay off
            because the engine prefills queued prompts of similar length together; a decode call
            hands back as soon as prefill_batch slots are free, so decode_steps is only a cap.
            cold: a fresh Engine (device put of the params, every compilation) + generate.
            warm: a second generate on the same engine (every shape compiled already). The
            defaults are timed warm only (after ``engine.warmup()``), to save a minute.
            Each warm run is instrumented: every jitted call is followed by block_until_ready and
            timed, so prefill / insert / decode / host time and the padded work are reported.
  official  recurrentgemma.jax.Sampler (1.0.1), requests in batches of 32 in the given order,
            each batch left-padded and run for its largest max_new_tokens; only the requested
            tokens count. ``Sampler.__call__`` takes strings and a SentencePiece vocab, so it is
            bypassed: we build the left-padded id array ourselves and call exactly what
            ``__call__`` calls after tokenizing, ``sampler.prompt_processing_fn(params, tokens,
            None, input_lengths, steps, False, False)`` then ``sampler.sample_fn(params, state,
            False)`` (end_sampling_at_eos_token=False: eos cannot end a row early, and no logit is
            masked), and read ``state.tokens_buffer[:, :max_new_tokens]`` (not ``__call__``'s
            ``tokens[pad_length:]``, which drops tokens of shorter prompts when echo=False). The
            vocab is a stub giving pad 0, eos 1, bos 2. Each new (batch, padded prompt length,
            steps) shape compiles: cold = first pass over the batches (compiles included), warm =
            the same batches again.
  hf        transformers RecurrentGemmaForCausalLM (torch, float32, ``torch.set_num_threads``),
            same weights via model.hf.params_to_hf_state_dict, batches of 32 in order, left padded
            with an attention_mask, ``generate(max_new_tokens=m, min_new_tokens=m,
            do_sample=False)`` with ``generation_config.eos_token_id = None`` (so no eos stop and
            no eos masking). cold = first pass, warm = second pass (torch compiles nothing; the
            difference is allocator and first-touch effects).

Ceiling: the matmul FLOPs of the workload (every prompt token through the network, every
generated token through the network and the logits product) at the float32 rates XLA reaches on
this machine with the model's own weights, 32-row products for decode and 256-row products for
prefill; everything else counted free. No implementation on this machine can beat it.

Greedy tokens are compared as a correctness guard: ours vs official on every request (the
official model ignores left pads exactly as ours does), ours vs HF on the rows that needed no
padding (HF's conv1d reads the pads of a left-padded row, so padded rows legitimately differ).

Memory: each of two fresh subprocesses runs our engine (the best setting above) on
``--mem-requests`` prompts of ``--mem-prompt`` tokens with max_new_tokens ``--mem-short`` and
``--mem-long`` (no early stop). Both first warm up and run the short generation once unmeasured;
then the peak RSS of the measured run is read (VmHWM reset through /proc/self/clear_refs just
before, else psutil RSS sampled every 5 ms), with its growth over the RSS just before it. glibc is
told not to give memory back (CHILD_MALLOC_ENV), so the RSS does not wander with the allocator's
trimming. ru_maxrss is recorded but not used: a child inherits its parent's peak through fork +
exec. The state per sequence is fixed (RG-LRU state, conv taps, a window-sized KV ring), so the
long run should need no more than the short one beyond its output buffers (the generated ids held
as Python ints); for scale the report gives what a KV cache of every token would add. The long
run's throughput is reported too. 32 x 4096 tokens take about two minutes on 2 CPU cores; use
``--mem-requests 8 --mem-slots 8`` for a quicker version.

Run:
  .venv/bin/python benchmarks/engine_vs_reference.py                 # the default workload
  .venv/bin/python benchmarks/engine_vs_reference.py --small         # smoke run (tiny model)
  .venv/bin/python benchmarks/engine_vs_reference.py --json results.json
  .venv/bin/python benchmarks/engine_vs_reference.py --parts ours,memory --engine-configs 8:128:16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import ModelConfig, cache_bytes_per_sequence
from model.config import griffin_pattern
from model.engine import Engine, EngineStats, GenerationRequest
from model.griffin import fuse_params
from model.testing import official_griffin_config, random_params

PARTS: tuple[str, ...] = ("ours", "official", "hf", "ceiling", "memory")

DEFAULTS: dict[str, int] = dict(
    requests=256,
    min_prompt=16,
    max_prompt=128,
    min_new=16,
    max_new=128,
    slots=32,
    ref_batch=32,
    width=512,
    layers=6,
    heads=4,
    mlp=1536,
    vocab=8192,
    window=256,
    mem_requests=32,
    mem_slots=32,
    mem_prompt=64,
    mem_short=128,
    mem_long=4096,
)
SMALL: dict[str, int] = dict(
    requests=12,
    min_prompt=4,
    max_prompt=12,
    min_new=4,
    max_new=12,
    slots=4,
    ref_batch=4,
    width=64,
    layers=3,
    heads=2,
    mlp=96,
    vocab=256,
    window=8,
    mem_requests=4,
    mem_slots=4,
    mem_prompt=8,
    mem_short=16,
    mem_long=64,
)
# prefill_batch:prefill_chunk:decode_steps settings tried besides the engine's own defaults.
DEFAULT_ENGINE_CONFIGS = "8:32:32,4:64:32"
SMALL_ENGINE_CONFIGS = "1:16:4"  # one prefill shape: fewer compiles in the smoke run

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2

# glibc settings for the memory subprocesses: freed memory stays mapped (no trimming, no mmap for
# blocks under 32 MiB, two arenas), so the peak RSS of a run is its peak live use, not the
# allocator's churn. Without them the peak of identical runs wanders by ~50 MiB.
CHILD_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30),
}


# Arguments and workload ---------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, value in DEFAULTS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=int,
            default=None,
            help=f"default {value} (--small: {SMALL[name]})",
        )
    parser.add_argument("--lru-width", type=int, default=None, help="default: --width")
    parser.add_argument(
        "--engine-configs",
        default=None,
        help="comma-separated prefill_batch:prefill_chunk:decode_steps settings tried besides the "
        f"engine defaults (default {DEFAULT_ENGINE_CONFIGS}; --small: {SMALL_ENGINE_CONFIGS})",
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads for HF (default: usable CPUs; --small: 1)",
    )
    parser.add_argument("--small", action="store_true", help="tiny preset for a smoke run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and workload")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write results as JSON")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        return args
    preset = SMALL if args.small else DEFAULTS
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lru_width is None:
        args.lru_width = args.width
    if args.engine_configs is None:
        args.engine_configs = SMALL_ENGINE_CONFIGS if args.small else DEFAULT_ENGINE_CONFIGS
    try:
        args.engine_configs = [
            tuple(int(v) for v in item.split(":"))
            for item in args.engine_configs.split(",")
            if item.strip()
        ]
    except ValueError:
        parser.error("--engine-configs: expected items like 8:128:16")
    if any(len(c) != 3 or min(c) < 1 for c in args.engine_configs):
        parser.error("--engine-configs: expected positive prefill_batch:prefill_chunk:decode_steps")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    args.parts = [p for p in PARTS if p in parts]
    if args.min_prompt < 1 or args.max_prompt < args.min_prompt:
        parser.error("need 1 <= --min-prompt <= --max-prompt")
    if args.min_new < 1 or args.max_new < args.min_new:
        parser.error("need 1 <= --min-new <= --max-new")
    if args.torch_threads is None:
        # The tiny model gains nothing from threads, and 2 OpenMP threads on a busy 2-core
        # machine can make it 100x slower (spinning barriers).
        args.torch_threads = 1 if args.small else usable_cpus()
    return args


def build_config(width: int, layers: int, heads: int, mlp: int, vocab: int, window: int, lru: int):
    return ModelConfig(
        vocab_size=vocab,
        width=width,
        mlp_expanded_width=mlp,
        num_heads=heads,
        block_types=griffin_pattern(layers),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=window,
        logits_soft_cap=30.0,
        lru_width=lru,
    )


def make_workload(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    """(prompts, max_new_tokens): lengths first, then new-token budgets, then ids, one stream."""
    rs = np.random.RandomState(args.seed)
    prompt_lens = rs.randint(args.min_prompt, args.max_prompt + 1, size=args.requests)
    max_new = rs.randint(args.min_new, args.max_new + 1, size=args.requests)
    prompts = [rs.randint(2, vocab, size=int(n)).tolist() for n in prompt_lens]
    return prompts, [int(m) for m in max_new]


def batches(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [b, longest]: prompts right-aligned, PAD_ID and mask 0 before them."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), PAD_ID, np.int32)
    mask = np.zeros((len(prompts), longest), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = prompt
        mask[row, longest - len(prompt) :] = 1
    return ids, mask


# Ours ---------------------------------------------------------------------------------------------
class _Timed:
    """Wraps one of the engine's jitted functions: waits for its result and adds up the time."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls, self.seconds = 0, 0.0

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        out = jax.block_until_ready(self.fn(*args))
        self.seconds += time.perf_counter() - start
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
    requests = [GenerationRequest(p, m, stop_ids=()) for p, m in zip(prompts, max_new, strict=True)]
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


def run_ours_cold(
    config: ModelConfig,
    params: Any,
    prompts: list[list[int]],
    max_new: list[int],
    slots: int,
    options: dict[str, int],
) -> float:
    """Seconds for a fresh engine to compile and run the requests."""
    requests = [GenerationRequest(p, m, stop_ids=()) for p, m in zip(prompts, max_new, strict=True)]
    start = time.perf_counter()
    Engine(config, params, max_slots=slots, **options).generate(requests)
    return time.perf_counter() - start


# Official sampler ---------------------------------------------------------------------------------
class _StubVocab:
    """What Sampler touches on the path we call: pad and eos ids (eos unused: no eos stop)."""

    def pad_id(self) -> int:
        return PAD_ID

    def eos_id(self) -> int:
        return EOS_ID

    def bos_id(self) -> int:
        return BOS_ID


def official_sampler(config: ModelConfig, params: Any) -> Any:
    import recurrentgemma.jax as official

    griffin_config = official_griffin_config(config)
    model = official.Griffin(griffin_config, gradient_checkpointing=False)
    return official.Sampler(model=model, vocab=_StubVocab(), params=jax.device_put(params))


def official_pass(
    sampler: Any, prompts: list[list[int]], max_new: list[int], batch: int
) -> tuple[float, list[list[int]], int]:
    """One pass over the batches: (seconds, tokens per request, token slots computed)."""

    out: list[list[int]] = []
    computed = 0
    start = time.perf_counter()
    for rows in batches(len(prompts), batch):
        ids, _ = left_pad([prompts[i] for i in rows])
        steps = max(max_new[i] for i in rows)
        lengths = jnp.asarray([len(prompts[i]) for i in rows], jnp.int32)
        state = sampler.prompt_processing_fn(
            sampler.params, jnp.asarray(ids), None, lengths, steps, False, False
        )
        if steps > 1:
            state = sampler.sample_fn(sampler.params, state, False)
        buffer = np.asarray(state.tokens_buffer)
        out += [buffer[row, : max_new[i]].tolist() for row, i in enumerate(rows)]
        computed += len(rows) * steps
    return time.perf_counter() - start, out, computed


def run_official(
    config: ModelConfig, params: Any, prompts: list[list[int]], max_new: list[int], batch: int
) -> tuple[dict[str, Any], list[list[int]]]:
    sampler = official_sampler(config, params)
    cold_s, tokens, computed = official_pass(sampler, prompts, max_new, batch)
    shapes_cold = _official_shapes(sampler)
    warm_s, warm_tokens, _ = official_pass(sampler, prompts, max_new, batch)
    row = reference_row(
        "official Sampler",
        batch,
        len(prompts),
        sum(max_new),
        computed,
        (cold_s, warm_s),
        warm_tokens == tokens,
        compiled_shapes_after_cold=shapes_cold,
        compiled_shapes_after_warm=_official_shapes(sampler),
        called="Sampler.prompt_processing_fn(params, ids, None, lengths, steps, False, False); "
        "Sampler.sample_fn(params, state, False); tokens_buffer[:, :max_new]",
    )
    return row, tokens


def reference_row(
    label: str,
    batch: int,
    requests: int,
    useful: int,
    computed: int,
    seconds: tuple[float, float],
    warm_equal_cold: bool,
    **extra: Any,
) -> dict[str, Any]:
    """The result row of a reference implementation run cold then warm over fixed batches."""
    cold_s, warm_s = seconds
    return dict(
        label=label,
        batch=batch,
        batches=len(batches(requests, batch)),
        useful_tokens=useful,
        computed_token_slots=computed,
        cold_s=cold_s,
        warm_s=warm_s,
        cold_tokens_per_s=useful / cold_s,
        warm_tokens_per_s=useful / warm_s,
        warm_tokens_equal_cold=warm_equal_cold,
        **extra,
    )


def _official_shapes(sampler: Any) -> int:
    fns = (sampler._compiled_prompt_processing_fn, sampler._compiled_sample_fn)
    return int(sum(f._cache_size() for f in fns))


# Hugging Face -------------------------------------------------------------------------------------
def hf_model(config: ModelConfig, params: Any, threads: int) -> Any:
    import torch
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    from model import hf

    torch.set_num_threads(threads)
    model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**hf.model_config_to_hf_config(config)))
    model = model.float().eval()
    state = {k: torch.from_numpy(v) for k, v in hf.params_to_hf_state_dict(params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF weights: missing {missing}, unexpected {unexpected}")
    if not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
        raise RuntimeError("HF lm_head is not tied to the embeddings")
    model.generation_config.eos_token_id = None  # nothing may end a row early
    model.generation_config.pad_token_id = PAD_ID
    return model


def hf_pass(
    model: Any, prompts: list[list[int]], max_new: list[int], batch: int
) -> tuple[float, list[list[int]], int]:
    import torch

    out: list[list[int]] = []
    computed = 0
    start = time.perf_counter()
    for rows in batches(len(prompts), batch):
        ids, mask = left_pad([prompts[i] for i in rows])
        steps = max(max_new[i] for i in rows)
        with torch.no_grad():
            generated = model.generate(
                input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long(),
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
            )
        if generated.shape[1] != ids.shape[1] + steps:
            raise RuntimeError(f"HF generated {generated.shape[1] - ids.shape[1]} of {steps}")
        new = generated[:, ids.shape[1] :].numpy()
        out += [new[row, : max_new[i]].tolist() for row, i in enumerate(rows)]
        computed += len(rows) * steps
    return time.perf_counter() - start, out, computed


def run_hf(
    config: ModelConfig,
    params: Any,
    prompts: list[list[int]],
    max_new: list[int],
    batch: int,
    threads: int,
) -> tuple[dict[str, Any], list[list[int]]]:
    import torch
    import transformers

    model = hf_model(config, params, threads)
    cold_s, tokens, computed = hf_pass(model, prompts, max_new, batch)
    warm_s, warm_tokens, _ = hf_pass(model, prompts, max_new, batch)
    row = reference_row(
        "HF generate",
        batch,
        len(prompts),
        sum(max_new),
        computed,
        (cold_s, warm_s),
        warm_tokens == tokens,
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
    )
    return row, tokens


# Ceiling ------------------------------------------------------------------------------------------
def _matmul_gflops(weights: list[np.ndarray], rows: int, repeats: int) -> float:
    """float32 GFLOP/s of x @ w over every weight in turn (as a decode step or a prefill call
    runs them, all distinct, so they stream from memory), x with ``rows`` rows; median run."""
    device_weights = [jnp.asarray(w) for w in weights]

    def products(ws: list[jax.Array], x: jax.Array) -> jax.Array:
        total = jnp.float32(0)
        for w in ws:
            if w.ndim == 2:
                total += jnp.sum(x[:, : w.shape[0]] @ w)
            else:  # block diagonal [n, i, o]
                xb = x[:, : w.shape[0] * w.shape[1]].reshape(rows, w.shape[0], w.shape[1])
                total += jnp.sum(jnp.einsum("bni,nio->bno", xb, w))
        return total

    fn = jax.jit(products)
    width = max(w.shape[0] * w.shape[1] if w.ndim == 3 else w.shape[0] for w in weights)
    x = jnp.ones((rows, width), jnp.float32)
    jax.block_until_ready(fn(device_weights, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(device_weights, x))
        times.append(time.perf_counter() - start)
    flops = 2 * rows * sum(w.size for w in weights)
    return flops / float(np.median(times)) / 1e9


def run_ceiling(
    params: Any, prompt_tokens: int, useful_tokens: int, slots: int, prefill_rows: int, small: bool
) -> dict[str, Any]:
    """The fastest this workload could run here: its matmul FLOPs at the float32 rates XLA
    reaches on this machine with the model's own (serving-layout) weights; decode products have
    ``slots`` rows, prefill products ``prefill_rows``. Everything else (attention scores,
    norms, the scan, sampling, padding, host work) is taken as free, so no engine can beat it."""
    serving = fuse_params(params)
    table = np.asarray(serving["embedder"]["input_embedding"])
    body = [
        np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(serving)
        if np.ndim(leaf) >= 2 and "embedder" not in jax.tree_util.keystr(path)
    ]
    repeats = 3 if small else 15
    decode_rate = _matmul_gflops([*body, table.T.copy()], slots, repeats)
    prefill_rate = _matmul_gflops(body, prefill_rows, repeats)
    body_flops = 2 * sum(w.size for w in body)
    table_flops = 2 * table.size
    # Every prompt token runs the body; every generated token the body and the logits product.
    decode_s = useful_tokens * (body_flops + table_flops) / (decode_rate * 1e9)
    prefill_s = prompt_tokens * body_flops / (prefill_rate * 1e9)
    return dict(
        decode_rows=slots,
        prefill_rows=prefill_rows,
        decode_gflops=decode_rate,
        prefill_gflops=prefill_rate,
        flops_per_prompt_token=body_flops,
        flops_per_generated_token=body_flops + table_flops,
        min_decode_s=decode_s,
        min_prefill_s=prefill_s,
        ceiling_tokens_per_s=useful_tokens / (decode_s + prefill_s),
    )


# Memory (fresh subprocesses) ----------------------------------------------------------------------
def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _vm_hwm_bytes() -> int | None:
    """This process's peak RSS (VmHWM, Linux), or None where /proc is not there.

    Unlike ru_maxrss, VmHWM belongs to the address space: it starts afresh at exec (ru_maxrss of
    a child carries the parent's peak at fork over exec) and can be reset via clear_refs.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_vm_hwm() -> bool:
    """Resets VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``); False if unable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: one engine, ``requests`` x ``max_new`` tokens, peak memory."""
    config = ModelConfig.from_dict(spec["config"])
    params = random_params(config, seed=spec["seed"])
    rs = np.random.RandomState(spec["seed"] + 1)
    n, max_new, vocab = spec["requests"], spec["max_new"], config.vocab_size
    requests = [
        GenerationRequest(rs.randint(2, vocab, size=spec["prompt"]).tolist(), max_new, stop_ids=())
        for _ in range(n)
    ]
    engine = Engine(config, params, max_slots=spec["slots"], **spec["options"])
    engine.warmup()
    shapes_warm = engine.compiled_shapes()
    # The short generation first, unmeasured, in both children: first-use allocations (XLA
    # buffers, the allocator's arenas) are then in the baseline, and what the measured run adds
    # over it is what its length needs beyond a short run's.
    engine.generate(
        [dataclasses.replace(r, max_new_tokens=spec["prerun_max_new"]) for r in requests]
    )
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(engine._state))
    hwm_setup = _vm_hwm_bytes()
    rss_before = _rss_bytes()
    hwm_reset = _reset_vm_hwm()
    peak = [rss_before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    hwm_generate = _vm_hwm_bytes() if hwm_reset else None
    generated = sum(len(r.token_ids) for r in results)
    return dict(
        requests=n,
        prompt=spec["prompt"],
        max_new=max_new,
        slots=spec["slots"],
        generated_tokens=generated,
        exact_lengths=all(len(r.token_ids) == max_new for r in results),
        seconds=seconds,
        tokens_per_s=generated / seconds,
        rss_before_generate=rss_before,
        # Peak RSS while generating: VmHWM reset just before generate when possible, else the
        # highest psutil sample (every 5 ms).
        peak_during_generate=hwm_generate if hwm_generate is not None else peak[0],
        peak_source="VmHWM after clear_refs" if hwm_generate is not None else "psutil samples",
        rss_sampled_peak_during_generate=peak[0],
        growth_during_generate=(hwm_generate or peak[0]) - rss_before,
        peak_setup=hwm_setup,  # VmHWM up to generate: imports, params, compilation
        process_peak=max(hwm_setup or 0, hwm_generate or 0, peak[0]),
        ru_maxrss=int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        engine_state_bytes=state_bytes,
        compiled_shapes_after_warmup=shapes_warm,
        compiled_shapes=engine.compiled_shapes(),
    )


def run_memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(CHILD_MALLOC_ENV)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory(
    config: ModelConfig, args: argparse.Namespace, options: dict[str, int]
) -> dict[str, Any]:
    base = dict(
        config=config.to_dict(),
        seed=args.seed,
        requests=args.mem_requests,
        prompt=args.mem_prompt,
        slots=args.mem_slots,
        options=options,
        prerun_max_new=args.mem_short,
    )
    short = run_memory_child({**base, "max_new": args.mem_short})
    long = run_memory_child({**base, "max_new": args.mem_long})
    extra_tokens = args.mem_requests * (args.mem_long - args.mem_short)
    # The generated ids a caller gets back: Python ints (28-32 B) in lists (8 B per pointer).
    extra_outputs = extra_tokens * (8 + 32)
    # What a cache that kept every token's keys and values (one KV head) would add instead.
    attention_layers = sum(kind == "attention" for kind in config.block_types)
    full_kv = extra_tokens * attention_layers * 2 * config.head_dim * 4
    return dict(
        options=options,
        short=short,
        long=long,
        peak_during_generate_diff=long["peak_during_generate"] - short["peak_during_generate"],
        process_peak_diff=long["process_peak"] - short["process_peak"],
        growth_diff=long["growth_during_generate"] - short["growth_during_generate"],
        output_buffer_bytes_estimate=extra_outputs,
        unbounded_kv_cache_bytes_estimate=full_kv,
        malloc_env=CHILD_MALLOC_ENV,
    )


# Report -------------------------------------------------------------------------------------------
def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def environment() -> dict[str, Any]:
    env = dict(
        jax_version=jax.__version__,
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        cpu_count=os.cpu_count(),
        cpus_usable=usable_cpus(),
        python=platform.python_version(),
        machine=platform.machine(),
        load_avg_before=list(os.getloadavg()),
    )
    try:
        import torch

        env["torch_version"] = torch.__version__
    except ImportError:
        env["torch_version"] = None
    return env


def compare(ours: list[list[int]], theirs: list[list[int]], rows: Sequence[int]) -> dict[str, Any]:
    """How many of ``rows`` have identical greedy tokens, and where the first mismatch starts."""
    same = [i for i in rows if ours[i] == theirs[i]]
    first = {}
    for i in rows:
        if ours[i] != theirs[i]:
            diff = [k for k, (a, b) in enumerate(zip(ours[i], theirs[i], strict=False)) if a != b]
            first[i] = diff[0] if diff else min(len(ours[i]), len(theirs[i]))
    return dict(compared=len(rows), identical=len(same), first_mismatch_at=first)


def _mismatch_summary(first: dict[int, int]) -> str:
    if not first:
        return ""
    shown = ", ".join(f"#{i}@{k}" for i, k in list(first.items())[:8])
    more = f", ... ({len(first) - 8} more)" if len(first) > 8 else ""
    return f"; request#@first differing token: {shown}{more}"


def _mb(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def format_report(results: dict[str, Any]) -> str:
    env, wl = results["environment"], results["workload"]
    lines = [
        f"jax {env['jax_version']}  torch {env['torch_version']}  backend {env['backend']}  "
        f"CPUs {env['cpu_count']} ({env['cpus_usable']} usable)  python {env['python']}",
        f"model: width {wl['width']}, layers {wl['layers']} "
        f"({'/'.join(b[0].upper() for b in wl['block_types'])}), heads {wl['heads']}, "
        f"mlp {wl['mlp']}, vocab {wl['vocab']}, window {wl['window']}, lru {wl['lru_width']}, "
        f"float32, {wl['params']:,} params",
        f"workload: {wl['requests']} requests, prompts {wl['min_prompt']}..{wl['max_prompt']} "
        f"({wl['prompt_tokens']:,} tokens), max_new {wl['min_new']}..{wl['max_new']}, no early "
        f"stop; useful tokens = sum(max_new) = {wl['useful_tokens']:,}; ours {wl['slots']} slots, "
        f"references in batches of {wl['ref_batch']}",
        f"load average (1/5/15 min) before {_load(env, 'before')}, after {_load(env, 'after')}",
        "",
    ]
    header = (
        f"{'implementation':<26}{'cold s':>9}{'cold tok/s':>12}{'warm s':>9}{'warm tok/s':>12}"
        f"{'cold/warm':>11}{'executables':>13}"
    )
    lines += [header, "-" * len(header)]
    rows = [*results.get("ours", []), *(results[k] for k in ("official", "hf") if k in results)]
    for row in rows:
        if "warm_s" not in row:
            lines.append(f"{row['label']:<26}FAILED: {row.get('error')}")
            continue
        shapes = row.get("compiled_shapes_after_warm")
        shapes_text = "" if shapes is None else f"{row['compiled_shapes_after_cold']}->{shapes}"
        if row["cold_s"] is None:
            cold_text = f"{'-':>9}{'-':>12}"
            ratio_text = f"{'-':>11}"
        else:
            cold_text = f"{row['cold_s']:>9.2f}{row['cold_tokens_per_s']:>12,.0f}"
            ratio_text = f"{row['cold_tokens_per_s'] / row['warm_tokens_per_s']:>11.2f}"
        lines.append(
            f"{row['label']:<26}{cold_text}{row['warm_s']:>9.2f}"
            f"{row['warm_tokens_per_s']:>12,.0f}{ratio_text}{shapes_text:>13}"
        )
    lines.append("")
    if results.get("ours"):
        lines.append(
            "ours: pb/c/ds = prefill_batch/prefill_chunk/decode_steps; cold = new Engine + "
            "compile + generate, warm = same engine again (defaults: after engine.warmup(), "
            "not timed cold); executables = jitted shapes held after cold -> after warm"
        )
        lines.append("ours warm-run breakdown (block_until_ready per jitted call):")
        for row in results["ours"]:
            b = row["breakdown"]
            lines.append(
                f"  {row['label']:<24} prefill {b['prefill_s']:6.2f}s ({b['prefill_calls']} calls, "
                f"{b['prompt_tokens'] / b['prefill_token_slots']:.0%} of "
                f"{b['prefill_token_slots']:,} token slots real)  insert {b['insert_s']:5.2f}s  "
                f"decode {b['decode_s']:6.2f}s ({b['decode_calls']} calls, "
                f"{wl['useful_tokens'] / b['decode_slot_steps']:.0%} of "
                f"{b['decode_slot_steps']:,} slot-steps useful)  host {b['host_s']:5.2f}s"
            )
    for key in ("official", "hf"):
        if key in results and "computed_token_slots" in results[key]:
            row = results[key]
            threads = f", torch threads {row['torch_threads']}" if "torch_threads" in row else ""
            lines.append(
                f"{row['label']}: {row['batches']} batches, computed {row['computed_token_slots']:,}"
                f" token slots for {row['useful_tokens']:,} useful "
                f"({row['useful_tokens'] / row['computed_token_slots']:.0%}){threads}"
            )
    if "called" in results.get("official", {}):
        lines.append(f"official calls: {results['official']['called']}")
    lines.append("")
    roof = results.get("ceiling")
    if roof:
        lines.append(
            f"ceiling (matmul FLOPs only, at the float32 rates XLA reaches here): decode rows "
            f"{roof['decode_rows']} {roof['decode_gflops']:.0f} GFLOP/s, prefill rows "
            f"{roof['prefill_rows']} {roof['prefill_gflops']:.0f} GFLOP/s -> at least "
            f"{roof['min_decode_s']:.1f}s decode + {roof['min_prefill_s']:.1f}s prefill = "
            f"{roof['ceiling_tokens_per_s']:,.0f} useful tok/s at most"
        )
        lines.append("")
    ratios = results.get("ratios", {})
    if ratios:
        lines.append("ratios (useful tokens/s):")
        for name, value in ratios.items():
            lines.append(f"  {name:<44}{value:8.2f}")
        lines.append("")
    for name, cmp in results.get("token_checks", {}).items():
        lines.append(
            f"greedy tokens {name}: {cmp['identical']}/{cmp['compared']} requests identical"
            + _mismatch_summary(cmp["first_mismatch_at"])
        )
    mem = results.get("memory")
    if mem:
        lines.append("")
        lines.append(
            f"memory: cache_bytes_per_sequence(float32) {mem['cache_bytes_per_sequence']:,} B; "
            f"engine device state per slot {mem['engine_state_bytes_per_slot']:,} B "
            f"({mem['engine_state_bytes_total']:,} B for {mem['engine_slots']} slots)"
        )
        if "error" in mem:
            lines.append(f"memory runs FAILED: {mem['error']}")
        else:
            opts = mem["options"] or "engine defaults"
            lines.append(f"  fresh subprocess per run, engine settings {opts}:")
            for key in ("short", "long"):
                r = mem[key]
                lines.append(
                    f"  {r['requests']} x (prompt {r['prompt']}, max_new {r['max_new']:>5}) on "
                    f"{r['slots']} slots: peak during generate {_mb(r['peak_during_generate'])} "
                    f"(+{_mb(r['growth_during_generate'])} over the RSS before it), process peak "
                    f"{_mb(r['process_peak'])}; {r['generated_tokens']:,} tokens in "
                    f"{r['seconds']:.1f}s = {r['tokens_per_s']:,.0f} tok/s"
                )
            lines.append(
                f"  long - short: peak during generate {_mb(mem['peak_during_generate_diff'])}, "
                f"process peak {_mb(mem['process_peak_diff'])}, growth during generate "
                f"{_mb(mem['growth_diff'])}; the extra output ids as Python ints "
                f"~{_mb(mem['output_buffer_bytes_estimate'])} (peaks: {mem['short']['peak_source']})"
            )
            lines.append(
                f"  (for scale: a KV cache keeping every token would need "
                f"{_mb(mem['unbounded_kv_cache_bytes_estimate'])} more for the long run; "
                f"children run with {' '.join(f'{k}={v}' for k, v in mem['malloc_env'].items())})"
            )
    lines.append(f"total wall time {results['wall_s']:.0f}s")
    return "\n".join(lines)


def _load(env: dict[str, Any], when: str) -> str:
    values = env.get(f"load_avg_{when}")
    return "n/a" if values is None else "/".join(f"{v:.2f}" for v in values)


def _log(start: float, message: str) -> None:
    print(f"[engine-bench {time.perf_counter() - start:6.1f}s] {message}", flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    if args.memory_child is not None:
        result = memory_child(json.loads(args.memory_child))
        print(json.dumps(result), flush=True)
        return result
    t0 = time.perf_counter()
    config = build_config(
        args.width, args.layers, args.heads, args.mlp, args.vocab, args.window, args.lru_width
    )
    params = random_params(config, seed=args.seed)
    prompts, max_new = make_workload(args, config.vocab_size)
    results: dict[str, Any] = dict(
        environment=environment(),
        workload=dict(
            requests=args.requests,
            min_prompt=args.min_prompt,
            max_prompt=args.max_prompt,
            min_new=args.min_new,
            max_new=args.max_new,
            prompt_tokens=sum(len(p) for p in prompts),
            useful_tokens=sum(max_new),
            slots=args.slots,
            ref_batch=args.ref_batch,
            width=args.width,
            layers=args.layers,
            block_types=list(config.block_types),
            heads=args.heads,
            mlp=args.mlp,
            vocab=args.vocab,
            window=args.window,
            lru_width=args.lru_width,
            params=int(sum(x.size for x in jax.tree.leaves(params))),
            dtype="float32",
            seed=args.seed,
        ),
    )
    _log(t0, f"{args.requests} requests, {sum(max_new):,} useful tokens; parts {args.parts}")
    tokens: dict[str, list[list[int]]] = {}
    best: dict[str, Any] | None = None
    engine: Engine | None = None
    if "ours" in args.parts:
        results["ours"] = []
        settings: list[dict[str, int]] = [{}]
        settings += [
            dict(prefill_batch=pb, prefill_chunk=c, decode_steps=ds)
            for pb, c, ds in args.engine_configs
        ]
        for options in settings:
            # The engine defaults are timed warm only (a cold run costs a minute on 2 CPUs);
            # every other setting cold and warm. The best gets a cold run below if it lacks one.
            cold = bool(options) or len(settings) == 1
            _log(
                t0, f"{engine_label(options)}: {'cold then ' if cold else 'warm-up then '}warm ..."
            )
            row, toks, engine = run_ours(
                config, params, prompts, max_new, args.slots, options, cold=cold
            )
            row["options"] = options
            results["ours"].append(row)
            cold_text = "" if row["cold_s"] is None else f"cold {row['cold_s']:.1f}s, "
            _log(t0, f"  {cold_text}warm {row['warm_s']:.1f}s")
            if "error" not in row and (
                best is None or row["warm_tokens_per_s"] > best["warm_tokens_per_s"]
            ):
                best, tokens["ours"] = row, toks
        if best is not None and best["cold_s"] is None:
            _log(t0, f"{best['label']}: cold ...")
            cold_s = run_ours_cold(config, params, prompts, max_new, args.slots, best["options"])
            best.update(cold_s=cold_s, cold_tokens_per_s=sum(max_new) / cold_s)
    if "official" in args.parts:
        _log(t0, "official Sampler: cold then warm ...")
        try:
            results["official"], tokens["official"] = run_official(
                config, params, prompts, max_new, args.ref_batch
            )
        except Exception as exc:  # report it, keep measuring the rest
            traceback.print_exc()
            results["official"] = dict(
                label="official Sampler", error=f"{type(exc).__name__}: {exc}"
            )
    if "hf" in args.parts:
        _log(t0, "HF generate: cold then warm ...")
        try:
            results["hf"], tokens["hf"] = run_hf(
                config, params, prompts, max_new, args.ref_batch, args.torch_threads
            )
        except Exception as exc:  # report it, keep measuring the rest
            traceback.print_exc()
            results["hf"] = dict(label="HF generate", error=f"{type(exc).__name__}: {exc}")

    if "ceiling" in args.parts:
        _log(t0, "ceiling: float32 matmul rates ...")
        rows = 256 if not args.small else 16
        results["ceiling"] = run_ceiling(
            params, sum(len(p) for p in prompts), sum(max_new), args.slots, rows, args.small
        )

    ratios: dict[str, float] = {}
    checks: dict[str, Any] = {}
    if best is not None:
        ours_defaults = results["ours"][0]
        ratios["ours best cold / warm"] = best["cold_tokens_per_s"] / best["warm_tokens_per_s"]
        for key in ("official", "hf"):
            if key in results and "error" not in results[key]:
                ref = results[key]
                ratios[f"ours best warm / {key} warm"] = (
                    best["warm_tokens_per_s"] / ref["warm_tokens_per_s"]
                )
                ratios[f"ours defaults warm / {key} warm"] = (
                    ours_defaults["warm_tokens_per_s"] / ref["warm_tokens_per_s"]
                )
                ratios[f"ours best cold / {key} cold"] = (
                    best["cold_tokens_per_s"] / ref["cold_tokens_per_s"]
                )
        results["best_ours"] = best["label"]
        if "ceiling" in results:
            roof = results["ceiling"]["ceiling_tokens_per_s"]
            ratios["ours best warm / ceiling"] = best["warm_tokens_per_s"] / roof
            if "official" in results and "error" not in results["official"]:
                official_warm = results["official"]["warm_tokens_per_s"]
                ratios["ceiling / official warm"] = roof / official_warm
        if "official" in tokens:
            checks["ours vs official (all requests)"] = compare(
                tokens["ours"], tokens["official"], range(len(prompts))
            )
        if "hf" in tokens:
            unpadded = [
                i
                for rows in batches(len(prompts), args.ref_batch)
                for i in rows
                if len(prompts[i]) == max(len(prompts[j]) for j in rows)
            ]
            checks["ours vs HF (unpadded rows)"] = compare(tokens["ours"], tokens["hf"], unpadded)
            checks["ours vs HF (all rows, padding differs)"] = compare(
                tokens["ours"], tokens["hf"], range(len(prompts))
            )
    results["ratios"] = ratios
    results["token_checks"] = checks

    if "memory" in args.parts:
        options = dict(best["options"]) if best is not None else {}
        probe = engine or Engine(config, params, max_slots=args.slots, **options)
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(probe._state))
        slots = probe.engine_config.max_slots
        results["memory"] = dict(
            cache_bytes_per_sequence=cache_bytes_per_sequence(config, np.float32),
            engine_state_bytes_total=state_bytes,
            engine_slots=slots,
            engine_state_bytes_per_slot=state_bytes // slots,
        )
        _log(t0, f"memory: {args.mem_requests} x {args.mem_short} and x {args.mem_long} ...")
        try:
            results["memory"].update(run_memory(config, args, options))
        except RuntimeError as exc:
            results["memory"]["error"] = str(exc)
    results["environment"]["load_avg_after"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - t0

    print(format_report(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=_json_default)
            f.write("\n")
        print(f"[engine-bench] wrote {args.json}")
    return json.loads(json.dumps(results, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


if __name__ == "__main__":
    main()
