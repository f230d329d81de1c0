"""Memory: does a long generation need more than a short one? Each run in a fresh subprocess.

Each of two fresh subprocesses (``python -m benchmarks.engine.memory SPEC``) runs our engine (the
best setting of the ``ours`` part, else the defaults) on ``--mem-requests`` prompts of
``--mem-prompt`` tokens with max_new_tokens ``--mem-short`` and ``--mem-long`` (no early stop).
Both first warm up and run the short generation once unmeasured; then the peak RSS of the
measured run is read (VmHWM reset through /proc/self/clear_refs just before, else psutil RSS
sampled every 5 ms), with its growth over the RSS just before it. glibc is told not to give
memory back (CHILD_MALLOC_ENV), so the RSS does not wander with the allocator's trimming.
ru_maxrss is recorded but not used: a child inherits its parent's peak through fork + exec. The
state per sequence is fixed (RG-LRU state, conv taps, a window-sized KV ring), so the long run
should need no more than the short one beyond its output buffers (the generated ids held as
Python ints); for scale the report gives what a KV cache of every token would add. The long run's
throughput is reported too. 32 x 4096 tokens take about two minutes on 2 CPU cores; use
``--mem-requests 8 --mem-slots 8`` for a quicker version.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import harness
from model import ModelConfig, cache_bytes_per_sequence
from model.engine import Engine, GenerationRequest
from testkit.tiny_model import random_params

# glibc settings for the memory subprocesses: freed memory stays mapped (no trimming, no mmap for
# blocks under 32 MiB, two arenas), so the peak RSS of a run is its peak live use, not the
# allocator's churn. Without them the peak of identical runs wanders by ~50 MiB.
CHILD_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30),
}


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


def _state_bytes(engine: Engine) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(engine._state))


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
    state_bytes = _state_bytes(engine)
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
    """``memory_child(spec)`` in a fresh interpreter (this module's ``__main__``)."""
    return harness.run_module_json(
        __name__, json.dumps(spec), env=CHILD_MALLOC_ENV, label="memory child"
    )


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


def run_part(
    config: ModelConfig,
    params: Any,
    args: argparse.Namespace,
    best: dict[str, Any] | None,
    engine: Engine | None,
    log: harness.Log,
) -> dict[str, Any]:
    """The fixed device state per slot (of ``engine``, else a new one), then the two runs."""
    options = dict(best["options"]) if best is not None else {}
    probe = engine or Engine(config, params, max_slots=args.slots, **options)
    state_bytes = _state_bytes(probe)
    slots = probe.engine_config.max_slots
    result: dict[str, Any] = dict(
        cache_bytes_per_sequence=cache_bytes_per_sequence(config, np.float32),
        engine_state_bytes_total=state_bytes,
        engine_slots=slots,
        engine_state_bytes_per_slot=state_bytes // slots,
    )
    log(f"memory: {args.mem_requests} x {args.mem_short} and x {args.mem_long} ...")
    try:
        result.update(run_memory(config, args, options))
    except RuntimeError as exc:
        result["error"] = str(exc)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The child: ``python -m benchmarks.engine.memory SPEC_JSON``; prints the result as JSON."""
    spec = json.loads((sys.argv[1:] if argv is None else argv)[0])
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    result = memory_child(spec)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
