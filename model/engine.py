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

With ``tensor_parallel=N`` one replica spans N local devices: the weights and the slot state are
split over a one-axis mesh by the rules in :mod:`model.sharding`, and the same jitted functions
run partitioned by XLA (two extra executables make the sharded empty caches).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig
from model.engine_config import EngineConfig
from model.griffin import Cache, RecurrentGemma, cache_bytes_per_sequence, fuse_params, init_cache
from model.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache
from model.sampling import SamplingParams, sample
from model.sharding import (
    cache_specs,
    check_tensor_parallel,
    make_mesh,
    named_shardings,
    param_specs,
    stack_gated_up,
    unstack_gated_up,
)
from model.storage import cache_dir

Array = jax.Array
DEFAULT_EOS_ID = 1
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue. The caller adds BOS to ``prompt_ids``."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    stop_ids: Sequence[int] = (DEFAULT_EOS_ID,)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    prefix_len: int = 0  # the first prefix_len ids may be shared: their state is computed once


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Generated ids (without the stop id) and why generation ended: stop, length or error."""

    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    error: str | None = None


class SlotState(NamedTuple):
    """Everything the device keeps per slot; every array has leading dimension max_slots."""

    cache: Cache
    next_token: Array  # int32: the last emitted token, fed at the next step
    position: Array  # int32: its position
    active: Array  # bool
    generated: Array  # int32: tokens emitted so far
    budget: Array  # int32: max_new_tokens
    stop_ids: Array  # int32 [s, max_stop_ids], -1 padded
    sampling: SamplingParams


class StepOutput(NamedTuple):
    """Per slot and step: the drawn token, whether it was emitted, whether it was a stop id."""

    tokens: Array
    emitted: Array
    stopped: Array


@dataclasses.dataclass
class EngineStats:
    """Work done since the engine was built or warmed up (assign a new EngineStats to restart).

    With shared prefixes, the request a prefix was prefilled for is its miss and every later one
    that starts from the cached state a hit: ``prompt_tokens + reused_prompt_tokens`` is the
    prompt tokens of the requests admitted, plus any prefix prefilled again after its state was
    evicted (or computed ahead and evicted unused).
    """

    prefill_calls: int = 0
    prefill_token_slots: int = 0  # rows x chunk, padding included
    prompt_tokens: int = 0  # real prompt tokens prefilled (shared prefixes included, once each)
    reused_prompt_tokens: int = 0  # prompt tokens whose state came from the prefix cache
    prefix_cache_hits: int = 0  # requests that started from a prefix state computed before
    prefix_cache_misses: int = 0  # requests whose prefix was prefilled for them
    decode_calls: int = 0
    decode_steps: int = 0  # steps run on device, over all calls
    generated_tokens: int = 0

    @property
    def prefill_fill(self) -> float:
        """Fraction of prefill token slots that held a real prompt token."""
        return self.prompt_tokens / self.prefill_token_slots if self.prefill_token_slots else 0.0

    def decode_fill(self, max_slots: int) -> float:
        """Fraction of decode slot-steps that produced a token."""
        slot_steps = self.decode_steps * max_slots
        return self.generated_tokens / slot_steps if slot_steps else 0.0


@dataclasses.dataclass
class _Running:
    index: Any
    request: GenerationRequest
    tokens: list[int]


def enable_compilation_cache(directory: str | os.PathLike[str] | None = None) -> Path:
    """Keeps compiled executables on local disk (JAX's persistent compilation cache), so a
    restarted actor or the next night's run with the same model and engine shapes loads them
    instead of compiling again. Default directory: ``<rg-batch cache dir>/xla``."""
    path = Path(directory) if directory is not None else cache_dir() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def _validate(request: GenerationRequest, config: ModelConfig, engine: EngineConfig) -> str | None:
    ids = np.asarray(request.prompt_ids)
    if ids.size == 0:
        return "empty prompt"
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        return "prompt_ids must be a flat sequence of integers"
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        bad = int(ids[(ids < 0) | (ids >= config.vocab_size)][0])
        return f"token id {bad} is outside the vocabulary [0, {config.vocab_size})"
    if engine.max_prompt_tokens is not None and ids.size > engine.max_prompt_tokens:
        return f"prompt has {ids.size} tokens, over max_prompt_tokens={engine.max_prompt_tokens}"
    if request.max_new_tokens < 1:
        return f"max_new_tokens must be >= 1, got {request.max_new_tokens}"
    if len(request.stop_ids) > engine.max_stop_ids:
        return f"at most {engine.max_stop_ids} stop ids, got {len(request.stop_ids)}"
    if request.temperature < 0 or request.top_k < 0 or not 0 < request.top_p <= 1:
        return "temperature and top_k must be >= 0 and top_p in (0, 1]"
    n = request.prefix_len
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 0 <= n < ids.size:
        return (
            f"prefix_len must be an integer in [0, {ids.size}) for a {ids.size}-token prompt "
            f"(at least one prompt token follows the shared prefix), got {n!r}"
        )
    return None


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
        **engine_options: Any,
    ) -> None:
        self.config = config
        self.engine_config = engine_config or EngineConfig(max_slots=max_slots, **engine_options)
        ec = self.engine_config
        n = ec.tensor_parallel
        check_tensor_parallel(config, n)
        self.mesh = make_mesh(n, devices) if n > 1 or devices is not None else None
        self._prefill_cache_sharding: Any = None  # set with tensor parallelism
        self.prefix_entry_bytes = cache_bytes_per_sequence(config, ec.dtype)
        self.prefix_cache = self._make_prefix_cache(prefix_cache_bytes)
        self._blank_row: Any = None  # one empty sequence's cache, host copy
        self.model = RecurrentGemma(config, dtype=ec.dtype, fused=n == 1)
        if n == 1:
            # The serving layout: one matmul per shared input (a copy of those weights; the
            # caller may drop its own tree once the engine is built).
            cast = jax.tree.map(lambda x: jnp.asarray(x, ec.dtype), params)
            self.params = fuse_params(self._committed(cast))
            self._prefill = jax.jit(self._prefill_fn, donate_argnums=(3,))
            self._insert = jax.jit(self._insert_fn, donate_argnums=(0,))
            self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))
            self._jitted = [self._prefill, self._insert, self._decode]
        else:
            self._shard(params)
        self._state = self._empty_state()
        self._pending: deque[tuple[Any, GenerationRequest]] = deque()
        self._slots: list[_Running | None] = [None] * self.engine_config.max_slots
        self.stats = EngineStats()

    # Device functions (one shape each) -----------------------------------------------------------
    def _prefill_fn(self, params: Any, tokens: Array, positions: Array, cache: Cache):
        logits, cache = self.model.apply(
            {"params": self._model_params(params)}, tokens, positions, cache, last_logits_only=True
        )
        return logits[:, 0], cache

    def _insert_fn(
        self,
        state: SlotState,
        prefill_cache: Cache,
        logits: Array,
        slots: Array,
        prompt_len: Array,
        budget: Array,
        stop_ids: Array,
        sampling: SamplingParams,
    ) -> tuple[SlotState, StepOutput]:
        """Samples each new row's first token and moves its state into slot ``slots[i]``."""
        first = sample(logits, sampling, jnp.zeros_like(prompt_len))
        stopped = jnp.any(first[:, None] == stop_ids, axis=-1)
        emitted = ~stopped
        active = emitted & (budget > 1)

        def put(big: Array, small: Array) -> Array:
            return big.at[slots].set(small.astype(big.dtype), mode="drop")

        new_state = SlotState(
            cache=jax.tree.map(put, state.cache, prefill_cache),
            next_token=put(state.next_token, first),
            position=put(state.position, prompt_len),
            active=put(state.active, active),
            generated=put(state.generated, emitted.astype(jnp.int32)),
            budget=put(state.budget, budget),
            stop_ids=put(state.stop_ids, stop_ids),
            sampling=jax.tree.map(put, state.sampling, sampling),
        )
        return new_state, StepOutput(first, emitted, stopped)

    def _decode_fn(
        self, params: Any, state: SlotState, refill_at: Array
    ) -> tuple[SlotState, StepOutput]:
        """Up to decode_steps steps; stops early once ``refill_at`` slots are free (so the host
        can admit a full prefill batch) or none is active. Steps not run are not emitted."""
        steps, slots = self.engine_config.decode_steps, self.engine_config.max_slots

        def step(carry: tuple[SlotState, Array, StepOutput]) -> tuple[SlotState, Array, StepOutput]:
            state, i, out = carry
            positions = jnp.where(state.active, state.position, -1)
            logits, cache = self.model.apply(
                {"params": self._model_params(params)},
                state.next_token[:, None],
                positions[:, None],
                state.cache,
            )
            token = sample(logits[:, 0], state.sampling, state.generated)
            stopped = state.active & jnp.any(token[:, None] == state.stop_ids, axis=-1)
            emitted = state.active & ~stopped
            generated = state.generated + emitted
            active = emitted & (generated < state.budget)
            new_state = state._replace(
                cache=cache,
                next_token=jnp.where(emitted, token, state.next_token),
                position=state.position + emitted,
                active=active,
                generated=generated,
            )
            out = StepOutput(
                out.tokens.at[:, i].set(token),
                out.emitted.at[:, i].set(emitted),
                out.stopped.at[:, i].set(stopped),
            )
            return new_state, i + 1, out

        def more(carry: tuple[SlotState, Array, StepOutput]) -> Array:
            state, i, _ = carry
            free = slots - jnp.sum(state.active)
            return (i < steps) & jnp.any(state.active) & (free < refill_at)

        empty = StepOutput(
            jnp.zeros((slots, steps), jnp.int32),
            jnp.zeros((slots, steps), bool),
            jnp.zeros((slots, steps), bool),
        )
        state, _, out = jax.lax.while_loop(more, step, (state, jnp.int32(0), empty))
        return state, out

    def _model_params(self, params: Any) -> Any:
        """The tree the model reads, from what the engine stores (inside jit)."""
        return params if self.engine_config.tensor_parallel == 1 else stack_gated_up(params)

    def _shard(self, params: Any) -> None:
        """Places the params on the mesh (each device receives only its shards, cast there) and
        jits the device functions with fixed in/out shardings."""
        ec, mesh = self.engine_config, self.mesh
        params = unstack_gated_up(params)
        param_sh = named_shardings(mesh, param_specs(params))

        def place(x: Any, sharding: Any) -> Array:
            x = jax.device_put(x, sharding)
            return x if x.dtype == ec.dtype else x.astype(ec.dtype)

        self.params = jax.tree.map(place, params, param_sh)
        param_sh = jax.tree.map(lambda x: x.sharding, self.params)
        rep = named_shardings(mesh, P())

        def cache_sh(rows: int) -> Any:
            shapes = jax.eval_shape(lambda: init_cache(self.config, rows, ec.dtype))
            return named_shardings(mesh, cache_specs(shapes))

        prefill_cache = cache_sh(self.prefill_rows)
        self._prefill_cache_sharding = prefill_cache
        slot_cache = cache_sh(ec.max_slots)
        state = SlotState(slot_cache, *([rep] * (len(SlotState._fields) - 2)), sampling=rep)
        logits = named_shardings(mesh, P(None, "tp"))  # split by vocab, like the embedding
        self._prefill = jax.jit(
            self._prefill_fn,
            donate_argnums=(3,),
            in_shardings=(param_sh, rep, rep, prefill_cache),
            out_shardings=(logits, prefill_cache),
        )
        self._insert = jax.jit(
            self._insert_fn,
            donate_argnums=(0,),
            in_shardings=(state, prefill_cache, logits, *[rep] * 5),
            out_shardings=(state, rep),
        )
        self._decode = jax.jit(
            self._decode_fn,
            donate_argnums=(1,),
            in_shardings=(param_sh, state, rep),
            out_shardings=(state, rep),
        )
        # The empty caches are made on the mesh, split, never whole on one device.
        self._new_prefill_cache = jax.jit(
            lambda: init_cache(self.config, self.prefill_rows, ec.dtype),
            out_shardings=prefill_cache,
        )
        self._new_state = jax.jit(self._zero_state, out_shardings=state)
        self._jitted = [
            self._prefill,
            self._insert,
            self._decode,
            self._new_prefill_cache,
            self._new_state,
        ]

    def _zero_state(self) -> SlotState:
        ec, s = self.engine_config, self.engine_config.max_slots

        def zeros(dtype: Any = jnp.int32) -> Array:  # distinct buffers: the state is donated
            return jnp.zeros((s,), dtype)

        return SlotState(
            cache=init_cache(self.config, s, ec.dtype),
            next_token=zeros(),
            position=zeros(),
            active=zeros(bool),
            generated=zeros(),
            budget=zeros(),
            stop_ids=jnp.full((s, ec.max_stop_ids), -1, jnp.int32),
            sampling=SamplingParams(zeros(jnp.float32), zeros(), jnp.ones((s,)), zeros()),
        )

    def _committed(self, tree: Any) -> Any:
        """One device named in ``devices``: arrays committed to it (jit runs where they are)."""
        return tree if self.mesh is None else jax.device_put(tree, self.mesh.devices.flat[0])

    def _empty_state(self) -> SlotState:
        if self.engine_config.tensor_parallel > 1:
            return self._new_state()
        return self._committed(self._zero_state())

    def _empty_prefill_cache(self) -> Cache:
        if self.engine_config.tensor_parallel > 1:
            return self._new_prefill_cache()
        return self._committed(init_cache(self.config, self.prefill_rows, self.engine_config.dtype))

    def _loaded_prefill_cache(self, states: Sequence[Any]) -> Cache:
        """A prefill cache on the device whose row i holds ``states[i]`` (a host cache of one
        sequence), empty where that is None: one host-to-device copy, no compiled function."""
        if self._blank_row is None:
            empty = jax.device_get(self._empty_prefill_cache())
            self._blank_row = jax.tree.map(lambda x: np.array(x[0]), empty)
        rows = [self._blank_row if state is None else state for state in states]
        rows += [self._blank_row] * (self.prefill_rows - len(rows))
        cache = jax.tree.map(lambda *xs: np.stack(xs), *rows)
        if self._prefill_cache_sharding is not None:  # split over the mesh like an empty one
            return jax.device_put(cache, self._prefill_cache_sharding)
        return jax.device_put(cache) if self.mesh is None else self._committed(cache)

    # Host side -----------------------------------------------------------------------------------
    @property
    def prefill_rows(self) -> int:
        """Rows of every prefill call (prefill_batch, at most max_slots)."""
        return min(self.engine_config.prefill_batch, self.engine_config.max_slots)

    def _make_prefix_cache(self, max_bytes: int) -> PrefixCache | None:
        if max_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {max_bytes}")
        if max_bytes == 0:
            return None
        if max_bytes < self.prefix_entry_bytes:
            log.warning(
                "prefix_cache_bytes=%d holds no prefix state (%d bytes each): prefix reuse is off",
                max_bytes,
                self.prefix_entry_bytes,
            )
            return None
        return PrefixCache(max_bytes)

    def warmup(self) -> None:
        """Compiles the three executables (prefill, insert, decode), so nothing compiles while
        serving."""
        self.generate([GenerationRequest([0], max_new_tokens=2, stop_ids=())])
        self.stats = EngineStats()

    def compiled_shapes(self) -> int:
        """How many executables the engine's jitted functions hold (constant after warm-up):
        prefill, insert and decode, and with tensor parallelism the two that make the sharded
        empty caches."""
        return sum(f._cache_size() for f in self._jitted)

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
        error = _validate(request, self.config, self.engine_config)
        if error is not None:
            return GenerationResult([], "error", len(request.prompt_ids), 0, error)
        self._pending.append((key, request))
        return None

    def reset(self) -> None:
        """Drops every queued and running request and clears the device state (the cached prefix
        states stay: they depend only on the weights)."""
        self._pending.clear()
        self._slots = [None] * self.engine_config.max_slots
        self._state = self._empty_state()

    @property
    def busy(self) -> bool:
        """Whether requests are queued or running."""
        return bool(self._pending) or any(self._slots)

    def step(self) -> list[tuple[Any, GenerationResult]]:
        """Fills free slots from the queue, runs one decode call; returns what finished."""
        slots, done, rows = self._slots, [], self.prefill_rows
        free = [i for i, run in enumerate(slots) if run is None]
        # Admit only full prefill batches (or all that is left): a partial batch would be padded
        # with empty rows, and the decode call below hands back as soon as a full one fits.
        while self._pending and len(free) >= min(rows, len(self._pending)):
            batch = self._next_batch(min(rows, len(self._pending)))
            targets, free = free[: len(batch)], free[len(batch) :]
            done.extend(self._admit(batch, targets, slots))
        if any(slots):
            refill_at = min(rows, len(self._pending)) if self._pending else len(slots) + 1
            self._state, out = self._decode(self.params, self._state, np.int32(refill_at))
            out = jax.device_get(out)
            # Every step run has an active slot, which either emits or stops: the steps run are
            # the columns up to the last one with anything in it.
            ran = int(np.max(np.nonzero(out.emitted | out.stopped)[1], initial=-1)) + 1
            self.stats.decode_calls += 1
            self.stats.decode_steps += ran
            self.stats.generated_tokens += int(out.emitted.sum())
            done.extend(self._collect(StepOutput(*(x[:, :ran] for x in out)), slots))
        return done

    def _next_batch(self, size: int) -> list[tuple[Any, GenerationRequest]]:
        """The oldest queued prompt and the size-1 others of the most similar lengths among the
        next length_lookahead queued ones (the oldest always goes first: nothing starves)."""
        pending = self._pending
        anchor = pending.popleft()
        if size == 1:
            return [anchor]
        reach = max(size, self.engine_config.length_lookahead) - 1
        window = [pending.popleft() for _ in range(min(len(pending), reach))]
        target = self._fed_len(anchor[1])
        order = sorted(
            range(len(window)), key=lambda j: (abs(self._fed_len(window[j][1]) - target), j)
        )
        chosen = set(order[: size - 1])
        for j in reversed(range(len(window))):  # the rest go back, in their order
            if j not in chosen:
                pending.appendleft(window[j])
        return [anchor] + [window[j] for j in sorted(chosen)]

    def _admit(
        self,
        batch: list[tuple[Any, GenerationRequest]],
        targets: list[int],
        slots: list[_Running | None],
    ) -> Iterator[tuple[Any, GenerationResult]]:
        if self.prefix_cache is not None and any(req.prefix_len for _, req in batch):
            logits, cache = self._prefill_prompts(*self._continuations([r for _, r in batch]))
        else:
            logits, cache = self._prefill_prompts([req.prompt_ids for _, req in batch])
        self._state, first = self._insert(
            self._state, cache, logits, *self._row_args(batch, targets)
        )
        first = jax.device_get(first)
        for row, (index, req) in enumerate(batch):
            run = _Running(index, req, [])
            slots[targets[row]] = run
            yield from self._advance(
                targets[row], slots, first.tokens[row], first.emitted[row], first.stopped[row]
            )

    def _prefill_prompts(
        self,
        prompts: Sequence[Sequence[int]],
        starts: Sequence[int] | None = None,
        states: Sequence[Any] | None = None,
    ) -> tuple[Array, Cache]:
        """Right-aligned prompts in chunks of prefill_chunk; state carried across chunks. With
        ``states``, row i continues ``states[i]`` (a cached prefix state, or None for an empty
        one) from position ``starts[i]``."""
        ec = self.engine_config
        p, c = self.prefill_rows, ec.prefill_chunk
        chunks = math.ceil(max(len(ids) for ids in prompts) / c)
        self.stats.prefill_calls += chunks
        self.stats.prefill_token_slots += chunks * c * p
        self.stats.prompt_tokens += sum(len(ids) for ids in prompts)
        tokens = np.zeros((p, chunks * c), np.int32)
        positions = np.full((p, chunks * c), -1, np.int32)
        for row, ids in enumerate(prompts):
            start = starts[row] if starts else 0
            tokens[row, -len(ids) :] = ids
            positions[row, -len(ids) :] = np.arange(start, start + len(ids))
        if states is not None and any(state is not None for state in states):
            cache = self._loaded_prefill_cache(states)
        else:
            cache = self._empty_prefill_cache()
        for k in range(chunks):
            window = slice(k * c, (k + 1) * c)
            logits, cache = self._prefill(
                self.params, tokens[:, window], positions[:, window], cache
            )
        return logits, cache

    # Shared prefixes ------------------------------------------------------------------------------
    def _prefix_key(self, request: GenerationRequest) -> tuple[int, ...] | None:
        """The request's shared prefix ids (its key in the prefix cache), or None if it has none
        or reuse is off."""
        if self.prefix_cache is None or not request.prefix_len:
            return None
        return tuple(request.prompt_ids[: request.prefix_len])

    def _fed_len(self, request: GenerationRequest) -> int:
        """Prompt tokens the request's own prefill row holds (after its prefix, if reused)."""
        shared = request.prefix_len if self.prefix_cache is not None else 0
        return len(request.prompt_ids) - shared

    def _continuations(
        self, batch: list[GenerationRequest]
    ) -> tuple[list[Sequence[int]], list[int], list[Any]]:
        """Per row: the ids it prefills, their first position and the state it starts from (a
        cached prefix state, or None to prefill the whole prompt)."""
        self._fill_prefix_cache(batch)
        pc, stats = self.prefix_cache, self.stats
        assert pc is not None
        prompts: list[Sequence[int]] = []
        starts: list[int] = []
        states: list[Any] = []
        for req in batch:
            key = self._prefix_key(req)
            entry = None if key is None else pc.get(key)
            if key is not None:
                if entry is not None and entry.used:
                    stats.prefix_cache_hits += 1
                    stats.reused_prompt_tokens += entry.tokens
                else:  # its prefix was prefilled for it: now, or whole in its own row below
                    stats.prefix_cache_misses += 1
            if entry is None:
                prompts.append(req.prompt_ids)
                starts.append(0)
                states.append(None)
            else:
                entry.used = True
                prompts.append(req.prompt_ids[entry.tokens :])
                starts.append(entry.tokens)
                states.append(entry.state)
        return prompts, starts, states

    def _fill_prefix_cache(self, batch: list[GenerationRequest]) -> None:
        """Prefills the batch's shared prefixes that are not cached and caches each one's state.

        The prefill rows left over take the uncached prefixes of queued requests ahead (up to
        ``length_lookahead * prefill_rows`` of them, so a prefill batch of documents fills up
        even when each document has many questions): first those that need no more chunks, in
        queue order, then the fewest extra chunks. What the batch and the requests ahead will use
        is evicted last (the batch's very last), and no more states are computed than fit the
        budget beside those.
        """
        pc, rows = self.prefix_cache, self.prefill_rows
        assert pc is not None
        needed = dict.fromkeys(k for k in map(self._prefix_key, batch) if k is not None)
        missing = [k for k in needed if k not in pc]
        if not missing:
            return
        ahead = itertools.islice(self._pending, self.engine_config.length_lookahead * rows)
        queued = dict.fromkeys(k for _, r in ahead if (k := self._prefix_key(r)) is not None)
        held_queued = [k for k in queued if k in pc and k not in needed]
        held_batch = [k for k in needed if k in pc]
        pc.touch(reversed(held_queued))  # the soonest needed evicted last
        pc.touch(held_batch)
        fit = pc.capacity(self.prefix_entry_bytes)
        chosen = missing[: max(0, min(rows, fit - len(held_batch)))]
        if not chosen:
            return
        room = min(rows, fit - len(held_batch) - len(held_queued)) - len(chosen)
        if room > 0:
            c = self.engine_config.prefill_chunk
            chunks = math.ceil(max(map(len, chosen)) / c)
            extras = [k for k in queued if k not in pc and k not in needed]
            extras.sort(key=lambda k: max(0, math.ceil(len(k) / c) - chunks))  # stable
            chosen += extras[:room]
        _, cache = self._prefill_prompts(chosen)
        host = jax.device_get(cache)
        for row, key in enumerate(chosen):
            pc.put(key, jax.tree.map(lambda x, row=row: np.array(x[row]), host), len(key))

    def next_token_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [len(prompts), vocab]: the logits after each prompt, through chunked prefill."""
        out = []
        rows = self.prefill_rows
        for start in range(0, len(prompts), rows):
            group = prompts[start : start + rows]
            out.append(np.asarray(self._prefill_prompts(group)[0])[: len(group)])
        return np.concatenate(out)

    def _row_args(self, batch: list[tuple[Any, GenerationRequest]], targets: list[int]):
        ec = self.engine_config
        p = self.prefill_rows
        slots = np.full((p,), ec.max_slots, np.int32)  # out of range: rows beyond the batch drop
        slots[: len(targets)] = targets
        prompt_len = np.zeros((p,), np.int32)
        budget = np.ones((p,), np.int32)
        stop_ids = np.full((p, ec.max_stop_ids), -1, np.int32)
        temperature = np.zeros((p,), np.float32)
        top_k = np.zeros((p,), np.int32)
        top_p = np.ones((p,), np.float32)
        seed = np.zeros((p,), np.int32)
        for row, (_, req) in enumerate(batch):
            prompt_len[row] = len(req.prompt_ids)
            budget[row] = req.max_new_tokens
            stop_ids[row, : len(req.stop_ids)] = list(req.stop_ids)
            temperature[row], top_k[row], top_p[row] = req.temperature, req.top_k, req.top_p
            seed[row] = np.int64(req.seed) & 0x7FFFFFFF
        return slots, prompt_len, budget, stop_ids, SamplingParams(temperature, top_k, top_p, seed)

    def _collect(
        self, out: StepOutput, slots: list[_Running | None]
    ) -> Iterator[tuple[Any, GenerationResult]]:
        for slot, run in enumerate(slots):
            if run is None:
                continue
            for step in range(out.tokens.shape[1]):
                if slots[slot] is None:
                    break
                yield from self._advance(
                    slot,
                    slots,
                    out.tokens[slot, step],
                    out.emitted[slot, step],
                    out.stopped[slot, step],
                )

    @staticmethod
    def _advance(
        slot: int, slots: list[_Running | None], token: Any, emitted: Any, stopped: Any
    ) -> Iterator[tuple[Any, GenerationResult]]:
        run = slots[slot]
        assert run is not None
        if emitted:
            run.tokens.append(int(token))
        reason = (
            "stop"
            if stopped
            else "length"
            if len(run.tokens) >= run.request.max_new_tokens
            else None
        )
        if reason is not None:
            slots[slot] = None
            n_prompt = len(run.request.prompt_ids)
            yield run.index, GenerationResult(run.tokens, reason, n_prompt, len(run.tokens))
