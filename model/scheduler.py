"""The engine's host side: requests, admission, the prefix-state policy, finished results.

Nothing here imports JAX (a test holds it so): the scheduler decides, the device runner
(:mod:`model.runner`) computes, and :class:`model.engine.Engine` joins the two. Between them go
two small records:

- :class:`AdmitPlan` (scheduler -> runner): one prefill batch, its rows' prompts (after any
  reused prefix), the prefix states they continue, their target slots and settings, as host
  arrays shaped for the runner's one compiled shape.
- :class:`CallOutput` (runner -> scheduler): what one insert or decode call drew, as host
  arrays [rows, steps]. The scheduler reads it in two passes: :meth:`Scheduler.retire` (which
  slots are now free: a few numpy reductions, done before the next call is dispatched) and
  :meth:`Scheduler.collect` (the tokens into each request and the finished results, done while
  the device runs that next call). No per-token Python loop.

Admission: the oldest queued prompt always goes first, with the ``prefill_rows - 1`` others of
the most similar lengths among the next ``length_lookahead``; only full prefill batches are
admitted (or all that is left). Shared prefixes: see :meth:`Scheduler.prefixes_to_fill`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from model.engine_config import EngineConfig
from model.grammar import GrammarSlots
from model.prefix_cache import PrefixCache

DEFAULT_EOS_ID = 1
log = logging.getLogger("model.engine")


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
    # A model.grammar.CompiledGrammar the output must match (its EOS must be among stop_ids):
    # each token is drawn under its mask, one decode step per call while such a row runs.
    grammar: Any = None


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Generated ids (without the stop id) and why generation ended: stop, length or error."""

    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    error: str | None = None


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
class AdmitPlan:
    """One prefill batch for the runner to prefill and insert (rows past the batch are padding).

    Attributes:
      prompts: The ids each row prefills: its prompt, or what follows its reused prefix.
      starts: Each row's first position (the reused prefix's length, else 0); None: all 0.
      states: Each row's starting state (a host cache of one sequence) or None for an empty
        one; None: every row starts empty.
      slots: int32 [prefill_rows]: the slot each row goes to; ``max_slots`` for padding rows
        (dropped on insert).
      prompt_len: int32 [prefill_rows]: whole prompt lengths (the position of the first new
        token).
      budget: int32 [prefill_rows]: max_new_tokens.
      stop_ids: int32 [prefill_rows, max_stop_ids], -1 padded.
      temperature, top_k, top_p, seed: [prefill_rows] sampling settings (float32, int32,
        float32, int32).
      mask: int32 [prefill_rows, ceil(vocab / 32)]: each row's packed allowed tokens for its
        first token, or None when no row is constrained (all allowed).
    """

    prompts: list[Sequence[int]]
    starts: list[int] | None
    states: list[Any] | None
    slots: np.ndarray
    prompt_len: np.ndarray
    budget: np.ndarray
    stop_ids: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    seed: np.ndarray
    mask: np.ndarray | None = None

    @property
    def constrained(self) -> bool:
        return self.mask is not None


@dataclasses.dataclass
class CallOutput:
    """What one device call drew, on the host, per row and step: the token, whether it was
    emitted (it counts as output), whether it was a stop id (it ends the request, unemitted).

    For a decode call rows are slots and ``steps`` its decode_steps (columns past the steps it
    ran are all False); for an insert rows are the plan's rows and there is one step, and
    ``slots`` says where each row went.
    """

    tokens: np.ndarray  # int32 [rows, steps]
    emitted: np.ndarray  # bool [rows, steps]
    stopped: np.ndarray  # bool [rows, steps]
    slots: np.ndarray | None = None  # int32 [rows]: an insert's target slots


@dataclasses.dataclass
class _Running:
    key: Any
    request: GenerationRequest
    slot: int
    start: int  # the index of the first decode call the request takes part in
    first: list[int] = dataclasses.field(default_factory=list)  # the insert's token, if emitted
    end: int = -1  # the index of the decode call that finished it (start - 1: the insert did)
    stopped: bool = False
    error: str | None = None  # a grammar error met on the way (the result is an error)


@dataclasses.dataclass
class Retired:
    """The requests one call finished, after :meth:`Scheduler.retire` (their tokens are gathered
    by :meth:`Scheduler.collect`)."""

    finished: list[_Running]


def validate(request: GenerationRequest, vocab_size: int, engine: EngineConfig) -> str | None:
    """Why the request cannot run, or None."""
    ids = np.asarray(request.prompt_ids)
    if ids.size == 0:
        return "empty prompt"
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        return "prompt_ids must be a flat sequence of integers"
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        return f"token id {bad} is outside the vocabulary [0, {vocab_size})"
    if engine.max_prompt_tokens is not None and ids.size > engine.max_prompt_tokens:
        return f"prompt has {ids.size} tokens, over max_prompt_tokens={engine.max_prompt_tokens}"
    if request.max_new_tokens < 1:
        return f"max_new_tokens must be >= 1, got {request.max_new_tokens}"
    if len(request.stop_ids) > engine.max_stop_ids:
        return f"at most {engine.max_stop_ids} stop ids, got {len(request.stop_ids)}"
    if request.temperature < 0 or request.top_k < 0 or not 0 < request.top_p <= 1:
        return "temperature and top_k must be >= 0 and top_p in (0, 1]"
    if request.grammar is not None:
        if request.grammar.vocab_size != vocab_size:
            return (
                f"the grammar was compiled for a {request.grammar.vocab_size}-token vocabulary, "
                f"the model has {vocab_size}"
            )
        if request.grammar.eos_id not in request.stop_ids:
            return f"a constrained request needs its EOS id {request.grammar.eos_id} in stop_ids"
    n = request.prefix_len
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 0 <= n < ids.size:
        return (
            f"prefix_len must be an integer in [0, {ids.size}) for a {ids.size}-token prompt "
            f"(at least one prompt token follows the shared prefix), got {n!r}"
        )
    return None


def make_prefix_cache(max_bytes: int, entry_bytes: int) -> PrefixCache | None:
    """The prefix cache for ``max_bytes``, or None when reuse is off (0, or under one state)."""
    if max_bytes < 0:
        raise ValueError(f"prefix_cache_bytes must be >= 0, got {max_bytes}")
    if max_bytes == 0:
        return None
    if max_bytes < entry_bytes:
        log.warning(
            "prefix_cache_bytes=%d holds no prefix state (%d bytes each): prefix reuse is off",
            max_bytes,
            entry_bytes,
        )
        return None
    return PrefixCache(max_bytes)


class Scheduler:
    """Queue, slots, admission, prefix policy and results of one engine (host only)."""

    def __init__(
        self,
        engine_config: EngineConfig,
        vocab_size: int,
        prefix_cache: PrefixCache | None,
        prefix_entry_bytes: int,
    ) -> None:
        self.engine_config = engine_config
        self.vocab_size = vocab_size
        self.prefix_cache = prefix_cache
        self.prefix_entry_bytes = prefix_entry_bytes
        self.prefill_rows = min(engine_config.prefill_batch, engine_config.max_slots)
        self.stats = EngineStats()
        self.pending: deque[tuple[Any, GenerationRequest]] = deque()
        self.reset()

    def reset(self) -> None:
        """Drops every queued and running request."""
        s = self.engine_config.max_slots
        self.pending.clear()
        self._runs: list[_Running | None] = [None] * s
        self._live = np.zeros(s, bool)  # slots whose request is not yet seen to finish
        self._generated = np.zeros(s, np.int64)  # tokens each slot's request has emitted
        self._budget = np.zeros(s, np.int64)
        self.grammars: GrammarSlots | None = None  # made at the first constrained request
        # Decode outputs (tokens, emitted) from index _first_kept on, while a request needs them.
        self._history: list[tuple[np.ndarray, np.ndarray]] = []
        self._first_kept = 0

    # Requests -------------------------------------------------------------------------------------
    def submit(self, key: Any, request: GenerationRequest) -> GenerationResult | None:
        """Queues a request under ``key``; one that cannot run comes back as an error result."""
        error = validate(request, self.vocab_size, self.engine_config)
        if error is not None:
            return GenerationResult([], "error", len(request.prompt_ids), 0, error)
        self.pending.append((key, request))
        return None

    @property
    def occupied(self) -> bool:
        """Whether any slot holds a request not yet seen to finish."""
        return bool(self._live.any())

    @property
    def slots_in_use(self) -> int:
        """How many slots hold a request not yet seen to finish."""
        return int(self._live.sum())

    # Admission ------------------------------------------------------------------------------------
    def free_slots(self) -> list[int]:
        return np.flatnonzero(~self._live).tolist()

    def admission_size(self, free: int) -> int:
        """Rows of the next prefill batch, or 0: only full batches (or all that is left) are
        admitted, since a partial one would be padded and a decode call hands back as soon as a
        full one fits."""
        n = min(self.prefill_rows, len(self.pending))
        return n if n and free >= n else 0

    def refill_at(self) -> int:
        """Free slots at which a decode call hands back (past max_slots: never)."""
        if self.pending:
            return min(self.prefill_rows, len(self.pending))
        return self.engine_config.max_slots + 1

    def next_batch(self, size: int) -> list[tuple[Any, GenerationRequest]]:
        """The oldest queued prompt and the size-1 others of the most similar lengths among the
        next length_lookahead queued ones (the oldest always goes first: nothing starves)."""
        pending = self.pending
        anchor = pending.popleft()
        if size == 1:
            return [anchor]
        reach = max(size, self.engine_config.length_lookahead) - 1
        window = [pending.popleft() for _ in range(min(len(pending), reach))]
        target = self.fed_len(anchor[1])
        order = sorted(
            range(len(window)), key=lambda j: (abs(self.fed_len(window[j][1]) - target), j)
        )
        chosen = set(order[: size - 1])
        for j in reversed(range(len(window))):  # the rest go back, in their order
            if j not in chosen:
                pending.appendleft(window[j])
        return [anchor] + [window[j] for j in sorted(chosen)]

    def plan(self, batch: list[tuple[Any, GenerationRequest]], targets: list[int]) -> AdmitPlan:
        """The prefill plan of ``batch`` into slots ``targets`` (the slots are taken now). With
        reuse on, call :meth:`prefixes_to_fill` and :meth:`store_prefixes` first."""
        requests = [req for _, req in batch]
        if self.prefix_cache is not None and any(req.prefix_len for req in requests):
            prompts, starts, states = self._continuations(requests)
        else:
            prompts, starts, states = [req.prompt_ids for req in requests], None, None
        self.count_prefill(prompts)
        ec, p = self.engine_config, self.prefill_rows
        plan = AdmitPlan(
            prompts=prompts,
            starts=starts,
            states=states,
            slots=np.full((p,), ec.max_slots, np.int32),  # out of range: padding rows drop
            prompt_len=np.zeros((p,), np.int32),
            budget=np.ones((p,), np.int32),
            stop_ids=np.full((p, ec.max_stop_ids), -1, np.int32),
            temperature=np.zeros((p,), np.float32),
            top_k=np.zeros((p,), np.int32),
            top_p=np.ones((p,), np.float32),
            seed=np.zeros((p,), np.int32),
        )
        plan.slots[: len(targets)] = targets
        if any(req.grammar is not None for req in requests):
            grammars = self._grammar_slots()
            plan.mask = np.full((p, grammars.words), -1, np.int32)
            for row, req in enumerate(requests):
                if req.grammar is not None:
                    grammars.start(targets[row], req.grammar)
                    grammars.fill(targets[row], plan.mask[row])
        for row, (key, req) in enumerate(batch):
            plan.prompt_len[row] = len(req.prompt_ids)
            plan.budget[row] = req.max_new_tokens
            plan.stop_ids[row, : len(req.stop_ids)] = list(req.stop_ids)
            plan.temperature[row], plan.top_k[row] = req.temperature, req.top_k
            plan.top_p[row] = req.top_p
            plan.seed[row] = np.int64(req.seed) & 0x7FFFFFFF
            slot = targets[row]
            self._runs[slot] = _Running(key, req, slot, self._first_kept + len(self._history))
            self._live[slot] = True
            self._generated[slot] = 0
            self._budget[slot] = req.max_new_tokens
        return plan

    def _grammar_slots(self) -> GrammarSlots:
        if self.grammars is None:
            self.grammars = GrammarSlots(self.engine_config.max_slots, self.vocab_size)
        return self.grammars

    def decode_plan(self) -> tuple[int, np.ndarray | None]:
        """(most steps, mask) of the next decode call: one step under the slots' masks while a
        constrained request runs (its matcher must see each token before the next mask), else
        every step with no mask."""
        mask = self.grammars.decode_mask(self._live) if self.grammars is not None else None
        return (self.engine_config.decode_steps if mask is None else 1), mask

    def count_prefill(self, prompts: Sequence[Sequence[int]]) -> None:
        """Adds a prefill of ``prompts`` (right-aligned in chunks) to the stats."""
        c, stats = self.engine_config.prefill_chunk, self.stats
        chunks = math.ceil(max(len(ids) for ids in prompts) / c)
        stats.prefill_calls += chunks
        stats.prefill_token_slots += chunks * c * self.prefill_rows
        stats.prompt_tokens += sum(len(ids) for ids in prompts)

    # Shared prefixes ------------------------------------------------------------------------------
    def prefix_key(self, request: GenerationRequest) -> tuple[int, ...] | None:
        """The request's shared prefix ids (its key in the prefix cache), or None if it has none
        or reuse is off."""
        if self.prefix_cache is None or not request.prefix_len:
            return None
        return tuple(request.prompt_ids[: request.prefix_len])

    def fed_len(self, request: GenerationRequest) -> int:
        """Prompt tokens the request's own prefill row holds (after its prefix, if reused)."""
        shared = request.prefix_len if self.prefix_cache is not None else 0
        return len(request.prompt_ids) - shared

    def prefixes_to_fill(self, batch: list[tuple[Any, GenerationRequest]]) -> list[tuple[int, ...]]:
        """The shared prefixes to prefill now (at most one prefill batch), their states to be
        given to :meth:`store_prefixes`: the batch's uncached ones, and in the rows left over
        the uncached prefixes of queued requests ahead (up to ``length_lookahead *
        prefill_rows`` of them, so a prefill batch of documents fills up even when each document
        has many questions): first those that need no more chunks, in queue order, then the
        fewest extra chunks. What the batch and the requests ahead will use is evicted last (the
        batch's very last), and no more states are computed than fit the budget beside those.
        """
        pc, rows = self.prefix_cache, self.prefill_rows
        if pc is None:
            return []
        keys = (self.prefix_key(req) for _, req in batch)
        needed = dict.fromkeys(k for k in keys if k is not None)
        missing = [k for k in needed if k not in pc]
        if not missing:
            return []
        ahead = itertools.islice(self.pending, self.engine_config.length_lookahead * rows)
        queued = dict.fromkeys(k for _, r in ahead if (k := self.prefix_key(r)) is not None)
        held_queued = [k for k in queued if k in pc and k not in needed]
        held_batch = [k for k in needed if k in pc]
        pc.touch(reversed(held_queued))  # the soonest needed evicted last
        pc.touch(held_batch)
        fit = pc.capacity(self.prefix_entry_bytes)
        chosen = missing[: max(0, min(rows, fit - len(held_batch)))]
        if not chosen:
            return []
        room = min(rows, fit - len(held_batch) - len(held_queued)) - len(chosen)
        if room > 0:
            c = self.engine_config.prefill_chunk
            chunks = math.ceil(max(map(len, chosen)) / c)
            extras = [k for k in queued if k not in pc and k not in needed]
            extras.sort(key=lambda k: max(0, math.ceil(len(k) / c) - chunks))  # stable
            chosen += extras[:room]
        self.count_prefill(chosen)
        return chosen

    def store_prefixes(self, keys: Sequence[tuple[int, ...]], states: Sequence[Any]) -> None:
        """Caches each prefix's state (a host cache of one sequence)."""
        assert self.prefix_cache is not None
        for key, state in zip(keys, states, strict=True):
            self.prefix_cache.put(key, state, len(key))

    def _continuations(
        self, batch: list[GenerationRequest]
    ) -> tuple[list[Sequence[int]], list[int], list[Any]]:
        """Per row: the ids it prefills, their first position and the state it starts from (a
        cached prefix state, or None to prefill the whole prompt)."""
        pc, stats = self.prefix_cache, self.stats
        assert pc is not None
        prompts: list[Sequence[int]] = []
        starts: list[int] = []
        states: list[Any] = []
        for req in batch:
            key = self.prefix_key(req)
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

    # Results --------------------------------------------------------------------------------------
    def retire(self, output: CallOutput) -> Retired:
        """Frees the slots whose request ``output`` finished (stop id drawn or budget reached)
        and counts the work: numpy over rows and steps, Python only per finished request."""
        if output.slots is None:  # a decode call: rows are slots
            busy = np.flatnonzero((output.emitted | output.stopped).any(axis=0))
            stats = self.stats
            stats.decode_calls += 1
            stats.decode_steps += int(busy[-1]) + 1 if busy.size else 0
            stats.generated_tokens += int(output.emitted.sum())
            index = self._first_kept + len(self._history)
            self._history.append((output.tokens, output.emitted))
            self._generated += output.emitted.sum(axis=1) * self._live
            if self.grammars is not None:
                self._accept(output.tokens, output.emitted, np.flatnonzero(self._live))
            stopped = output.stopped.any(axis=1)
            done = self._live & (stopped | (self._generated >= self._budget))
            slots = np.flatnonzero(done)
            stopped = stopped[slots]
        else:  # an insert: rows are prefill rows, each going to output.slots[row]
            index = -1
            rows = np.flatnonzero(output.slots < len(self._runs))
            slots = output.slots[rows]
            emitted, stopped = output.emitted[rows, 0], output.stopped[rows, 0]
            self._generated[slots] = emitted
            for row, slot, first in zip(
                rows.tolist(), slots.tolist(), emitted.tolist(), strict=True
            ):
                run = self._runs[slot]
                if first and run is not None:
                    run.first.append(int(output.tokens[row, 0]))
            if self.grammars is not None:
                live = np.zeros(len(self._runs), bool)
                live[slots] = True
                tokens = np.zeros((len(self._runs), 1), np.int32)
                tokens[slots, 0] = output.tokens[rows, 0]
                emits = np.zeros((len(self._runs), 1), bool)
                emits[slots, 0] = emitted
                self._accept(tokens, emits, slots)
            done = stopped | (self._generated[slots] >= self._budget[slots])
            slots, stopped = slots[done], stopped[done]
        finished = []
        for slot, stop in zip(slots.tolist(), stopped.tolist(), strict=True):
            run = self._runs[slot]
            assert run is not None
            run.stopped, run.end = stop, index if index >= 0 else run.start - 1
            if self.grammars is not None and self.grammars.matchers[slot] is not None:
                run.error = self.grammars.release(slot)
            self._runs[slot] = None
            self._live[slot] = False
            finished.append(run)
        return Retired(finished)

    def _accept(self, tokens: np.ndarray, emitted: np.ndarray, slots: np.ndarray) -> None:
        """Feeds each constrained slot's emitted tokens to its matcher (before the next mask)."""
        grammars = self.grammars
        assert grammars is not None
        for slot in slots.tolist():
            if grammars.matchers[slot] is not None:
                grammars.accept(slot, tokens[slot][emitted[slot]].tolist())

    def collect(self, retired: Sequence[Retired]) -> list[tuple[Any, GenerationResult]]:
        """The requests that finished, as (key, result): each one's tokens gathered from the
        decode outputs it took part in; outputs no running request needs are dropped."""
        done: list[tuple[Any, GenerationResult]] = []
        for item in retired:
            for run in item.finished:
                parts = [np.asarray(run.first, np.int32)]
                for call in range(run.start, run.end + 1):
                    tokens, emitted = self._history[call - self._first_kept]
                    parts.append(tokens[run.slot][emitted[run.slot]])
                ids = np.concatenate(parts).tolist()
                reason = "stop" if run.stopped else "length"
                n_prompt = len(run.request.prompt_ids)
                if run.error is not None:
                    reason = "error"
                result = GenerationResult(ids, reason, n_prompt, len(ids), run.error)
                done.append((run.key, result))
        starts = [run.start for run in self._runs if run is not None]
        keep_from = min(starts, default=self._first_kept + len(self._history))
        del self._history[: keep_from - self._first_kept]
        self._first_kept = keep_from
        return done
