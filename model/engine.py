"""Continuous-batching generation over RecurrentGemma's fixed-size per-sequence state.

The engine keeps ``max_slots`` sequences on the device. Prompts are prefilled ``prefill_batch`` at a
time (in fixed-size chunks, carrying the state from chunk to chunk, so a 32k-token document costs
the memory of a short one) and inserted into free slots. A decode call runs up to
``decode_steps`` tokens on device and returns early once enough slots have finished to admit a
full prefill batch, so finished slots do not idle and prefill batches are not padded with empty
rows. Prompts of similar length are prefilled together (the oldest queued prompt always goes
first), which keeps chunk padding small. Every jitted function has one fixed shape, so exactly
three executables exist and nothing compiles after warm-up: prefill [prefill_batch,
prefill_chunk], insert [prefill_batch] and decode [max_slots].

Idle slots and left pads are fed position -1, which leaves their state untouched; so a request's
tokens do not depend on which slot or batch it landed in, and sampling is keyed by each request's
own seed and token index.

Shared prefixes: a request's first ``prefix_len`` prompt ids may be shared with other requests
(one document, many questions). The state after a prefix is a fixed few MB whatever its length
and exact at any token boundary, so each distinct prefix is prefilled once, through the same
chunked prefill (the batch's missing prefixes in one prefill batch, its spare rows filled with
the prefixes of queued requests ahead); each row's state goes to host memory, into a
byte-bounded LRU cache (:class:`model.prefix_cache.PrefixCache`, ``prefix_cache_bytes``). A
request that continues a cached prefix prefills only its own tokens, from position
``prefix_len``, in a prefill cache whose row was loaded with the prefix's state (one
host-to-device copy of the batch's cache). Prompts are grouped by the tokens they still
prefill. Prefixes match exactly (same ids, same length), not by longest common prefix. No
executable is added and the prefill batch keeps its one shape; the cached states never take
device memory.

The host never waits on the device while it could be planning: a step waits for the previous
call's output, frees the slots it finished (a few numpy reductions), dispatches the next prefill
batches and decode call, and only then moves the previous call's tokens into their requests and
builds the finished results, while the device runs. The calls are the ones a host that waited
for every token would make, in the same order, so the tokens are too. The host side is
:mod:`model.scheduler` (no JAX), the device side :mod:`model.runner`.

With ``tensor_parallel=N`` one replica spans N local devices: the weights and the slot state are
split over a one-axis mesh by the rules in :mod:`model.sharding`, and the same jitted functions
run partitioned by XLA (two extra executables make the sharded empty caches).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from model.config import ModelConfig
from model.engine_config import EngineConfig
from model.griffin import cache_bytes_per_sequence
from model.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache
from model.runner import DeviceRunner, SlotState, StepOutput, fetch
from model.scheduler import (
    DEFAULT_EOS_ID,
    AdmitPlan,
    CallOutput,
    EngineStats,
    GenerationRequest,
    GenerationResult,
    Retired,
    Scheduler,
    make_prefix_cache,
    merge_inserts,
)
from model.storage import cache_dir

__all__ = [
    "DEFAULT_EOS_ID",
    "AdmitPlan",
    "CallOutput",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "GenerationRequest",
    "GenerationResult",
    "SlotState",
    "StepOutput",
    "enable_compilation_cache",
]


def enable_compilation_cache(directory: str | os.PathLike[str] | None = None) -> Path:
    """Keeps compiled executables on local disk (JAX's persistent compilation cache), so a
    restarted actor or the next night's run with the same model and engine shapes loads them
    instead of compiling again. Default directory: ``<rg-batch cache dir>/xla``."""
    path = Path(directory) if directory is not None else cache_dir() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


class Engine:
    """Continuous-batching generation: ``generate(requests)`` or ``stream(requests)``.

    Tensor parallelism: ``Engine(config, params, tensor_parallel=N, devices=None)`` splits one
    replica over N devices (the first N of ``devices``, default ``jax.local_devices()``), for a
    model whose weights do not fit one device (9B in bfloat16 on 16 GB chips) or to cut the
    per-token latency of reading the weights. Attention heads, RG-LRU heads, the lru and MLP
    widths and the vocabulary are split (:mod:`model.sharding`; N must divide all of them: 2B
    takes 2, 5 or 10, 9B 2, 4, 8 or 16), the shared K/V head and the attention ring buffer are
    replicated. ``engine.params`` holds the sharded arrays, in the checkpoint layout with each
    MLP's gate and up kernels held apart (``ffw_up/w_gate``, ``w_up``): the fused one-device
    layout does not split cleanly. Greedy tokens match N=1 (logits to float rounding) and the
    executables are fixed after warm-up, as with one device. Each replica is one process; run
    several replicas as several Ray actors. :func:`model.memory.plan_memory`
    says how many devices and slots a model needs.

    Prefix reuse (``GenerationRequest.prefix_len``): ``prefix_cache_bytes`` (default 1 GiB of
    host memory; 0 turns reuse off, as does a budget under one state) bounds the cached prefix
    states, ``engine.prefix_cache`` holds them (kept across :meth:`reset`; ``clear()`` drops them)
    and ``engine.stats`` counts prefilled and reused prompt tokens, hits and misses. It works the
    same with tensor parallelism: a loaded prefill cache is split over the mesh like an empty one.
    Each state is ``prefix_entry_bytes`` (0.56 MB for the CPU benchmark model in float32, 17.2 MB
    for 2B in bfloat16).
    """

    def __init__(
        self,
        config: ModelConfig,
        params: Any,
        *,
        max_slots: int = 32,
        engine_config: EngineConfig | None = None,
        devices: Sequence[jax.Device] | None = None,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        detokenize: Callable[[Sequence[int]], str] | None = None,
        **engine_options: Any,
    ) -> None:
        self.config = config
        self.engine_config = engine_config or EngineConfig(max_slots=max_slots, **engine_options)
        ec = self.engine_config
        self.prefix_entry_bytes = cache_bytes_per_sequence(config, ec.dtype)
        prefix_cache = make_prefix_cache(prefix_cache_bytes, self.prefix_entry_bytes)
        self.runner = DeviceRunner(config, params, ec, devices)
        self.scheduler = Scheduler(
            ec, config.vocab_size, prefix_cache, self.prefix_entry_bytes, detokenize
        )
        # Calls dispatched and not yet read back, in order: (device output, insert target slots,
        # whether a row of the call asked for logprobs).
        self._inflight: deque[tuple[StepOutput, np.ndarray | None, bool]] = deque()

    # What tests, benchmarks and the pipeline read ------------------------------------------------
    @property
    def params(self) -> Any:
        """The weights on the device (fused on one device, sharded on a mesh)."""
        return self.runner.params

    @property
    def mesh(self) -> Any:
        return self.runner.mesh

    @property
    def model(self) -> Any:
        return self.runner.model

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The cached prefix states (None when reuse is off)."""
        return self.scheduler.prefix_cache

    @property
    def prefill_rows(self) -> int:
        """Rows of every prefill call (prefill_batch, at most max_slots)."""
        return self.runner.prefill_rows

    @property
    def stats(self) -> EngineStats:
        return self.scheduler.stats

    @stats.setter
    def stats(self, value: EngineStats) -> None:
        self.scheduler.stats = value

    @property
    def _pending(self) -> deque[tuple[Any, GenerationRequest]]:
        return self.scheduler.pending

    @property
    def _state(self) -> SlotState:
        return self.runner.state

    @_state.setter
    def _state(self, value: SlotState) -> None:
        self.runner.state = value

    # The jitted functions, replaceable (a benchmark times each call through a wrapper).
    _prefill = property(lambda self: self.runner.prefill, lambda self, f: _set(self, "prefill", f))
    _insert = property(lambda self: self.runner.insert, lambda self, f: _set(self, "insert", f))
    _decode = property(lambda self: self.runner.decode, lambda self, f: _set(self, "decode", f))

    # Serving -------------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Compiles the three executables (prefill, insert, decode), so nothing compiles while
        serving."""
        self.generate([GenerationRequest([0], max_new_tokens=2, stop_ids=())])
        self.stats = EngineStats()

    def compiled_shapes(self) -> int:
        """How many executables the engine's jitted functions hold (constant after warm-up):
        prefill, insert and decode, and with tensor parallelism the two that make the sharded
        empty caches."""
        return self.runner.compiled_shapes()

    def generate(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        """Results in request order."""
        requests = list(requests)
        results: list[GenerationResult | None] = [None] * len(requests)
        for index, result in self.stream(requests):
            results[index] = result
        return results  # type: ignore[return-value]

    def stream(
        self, requests: Iterable[GenerationRequest]
    ) -> Iterator[tuple[int, GenerationResult]]:
        """Yields ``(request index, result)`` as each request finishes."""
        for index, request in enumerate(requests):
            rejected = self.submit(index, request)
            if rejected is not None:
                yield index, rejected
        while self.busy:
            yield from self.step()

    def submit(self, key: Any, request: GenerationRequest) -> GenerationResult | None:
        """Queues a request under ``key``; a request that cannot run comes back at once as an
        error result (and is not queued)."""
        return self.scheduler.submit(key, request)

    def reset(self) -> None:
        """Drops every queued and running request and clears the device state (the cached prefix
        states stay: they depend only on the weights)."""
        self._inflight.clear()
        self.scheduler.reset()
        self.runner.state = self.runner.empty_state()

    @property
    def busy(self) -> bool:
        """Whether requests are queued or running."""
        return bool(self.scheduler.pending) or bool(self._inflight) or self.scheduler.occupied

    def step(self) -> list[tuple[Any, GenerationResult]]:
        """Reads back the calls dispatched last time, fills the slots they freed from the queue,
        dispatches the next decode call, and then (while the device runs it) returns what the
        calls read back finished."""
        retired = self._retire()
        constrained = self._admit()
        if self.scheduler.occupied and not constrained:
            sched = self.scheduler
            steps, mask = sched.decode_plan()
            out = self.runner.run_decode(sched.refill_at(), steps, mask, sched.take_cancel())
            self._inflight.append((out, None, sched.logprobs_running()))
        return self.scheduler.collect(retired)

    def _retire(self) -> list[Retired]:
        """Reads back every call in flight and retires each, in call order (consecutive inserts
        together)."""
        calls = list(self._inflight)
        self._inflight.clear()
        hosts = fetch(*zip(*calls, strict=True)) if calls else []
        return [self.scheduler.retire(host) for host in merge_inserts(hosts)]

    def _admit(self) -> bool:
        """Prefills and inserts full prefill batches while enough slots are free (dispatched,
        not waited for, except for the prefix states the batches need). True if a batch held a
        constrained request: its first token must reach its matcher before the next decode
        call's mask, so that call waits for the next step."""
        constrained = False
        sched = self.scheduler
        free = sched.free_slots()
        while size := sched.admission_size(len(free)):
            batch = sched.next_batch(size, len(free))
            taken = sum(req.n for _, req in batch)
            targets, free = free[:taken], free[taken:]
            prefixes = sched.prefixes_to_fill(batch)
            if prefixes:
                sched.store_prefixes(prefixes, self.runner.prefix_states(prefixes))
            plan = sched.plan(batch, targets)
            constrained |= plan.constrained
            logprobs = plan.logprobs
            self._inflight.extend((out, at, logprobs) for out, at in self.runner.run_admit(plan))
        return constrained

    def next_token_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [len(prompts), vocab]: the logits after each prompt, through chunked prefill."""
        out = []
        rows = self.prefill_rows
        for start in range(0, len(prompts), rows):
            group = prompts[start : start + rows]
            self.scheduler.count_prefill(group)
            out.append(np.asarray(self.runner.prefill_prompts(group)[0])[: len(group)])
        return np.concatenate(out)


def _set(engine: Engine, name: str, fn: Any) -> None:
    setattr(engine.runner, name, fn)
