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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from model import controls as ctl
from model.controls import ENDED_LOOP, ENDED_STOP_SEQUENCE, Controls
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
    # Controls past sampling (all off by default; see model.controls).
    n: int = 1  # samples from one prefill, each in its own slot (seeds: controls.sample_seed)
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None off; k: the drawn token's and the top k (0..max_logprobs)
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # matched on the device
    stop_strings: tuple[str, ...] = ()  # matched on the host in the decoded text (if it can)
    loop_ngram: int = 0  # loop guard: end when the last loop_ngram * loop_repeats tokens repeat
    loop_repeats: int = 0
    # A model.grammar.CompiledGrammar the output must match (its EOS must be among stop_ids):
    # each token is drawn under its mask, one decode step per call while such a row runs. Stop
    # strings found in the text do not end such a row (a match is complete or cut by length).
    grammar: Any = None


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Generated ids (without the stop id) and why generation ended: stop, length, loop (the
    loop guard) or error. A stop sequence or stop string ends ``token_ids`` with the token that
    completed it (the caller cuts the text).

    ``logprobs`` (when asked): per token, its log-probability; ``top_logprobs`` per token the
    asked number of (id, log-probability), most likely first. ``samples``: for ``n > 1`` all n
    samples in order (the fields above are sample 0's).
    """

    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    error: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    samples: tuple[GenerationResult, ...] = ()


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
    wasted_tokens: int = 0  # generated past a stop string the host found (up to a call's steps)

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

    The per-row arrays below are per insert entry: one per sample (``n`` of a request), in
    ``inserts`` groups of ``prefill_rows``; ``source`` says which prefill row each copies.

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
      source: int32 [entries]: the prefill row each entry starts from.
      controls: The entries' :class:`model.controls.Controls` (numpy); its ``prompt_bits`` per
        prefill row, None when no row uses the repetition penalty.
      mask: int32 [entries, ceil(vocab / 32)]: each entry's packed allowed tokens for its first
        token (each sample of a constrained request has its own matcher), or None when no entry
        is constrained (all allowed).
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
    source: np.ndarray
    controls: Controls
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
    ended: np.ndarray | None = None  # int8 [rows, steps]: a stop sequence / loop ended the row
    logprob: np.ndarray | None = None  # float32 [rows, steps]: the drawn token's
    top_ids: np.ndarray | None = None  # int32 [rows, steps, max_logprobs]
    top_logprobs: np.ndarray | None = None  # float32 [rows, steps, max_logprobs]

    def row_logprobs(self, row: int, k: int, picked: Any) -> tuple[list[float], list[Any]]:
        """Row ``row``'s logprobs and top-``k`` (id, logprob) at the ``picked`` steps."""
        assert self.logprob is not None and self.top_ids is not None
        assert self.top_logprobs is not None
        lps = self.logprob[row][picked].tolist()
        ids = self.top_ids[row][picked][:, :k].tolist()
        values = self.top_logprobs[row][picked][:, :k].tolist()
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]
        return lps, tops


@dataclasses.dataclass
class _Group:
    """The samples of one request with n > 1, as they finish."""

    results: list[GenerationResult | None]


@dataclasses.dataclass
class _Running:
    key: Any
    request: GenerationRequest
    slot: int
    start: int  # the index of the first decode call the request takes part in
    first: list[int] = dataclasses.field(default_factory=list)  # the insert's token, if emitted
    end: int = -1  # the index of the decode call that finished it (start - 1: the insert did)
    reason: str = "length"
    limit: int | None = None  # tokens kept: a stop string found on the host ends them there
    sample: int = 0
    group: _Group | None = None
    first_logprobs: tuple[list[float], list[Any]] = ([], [])
    tail: list[int] = dataclasses.field(default_factory=list)  # last ids, for stop strings
    count: int = 0  # tokens the stop-string check has seen
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
    problem = ctl.problem(request, vocab_size, engine)
    if problem is not None:
        return problem
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
        detokenize: Callable[[Sequence[int]], str] | None = None,
    ) -> None:
        self.detokenize = detokenize  # for stop strings: without it only stop sequences match
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
        self._cancel = np.zeros(s, bool)  # slots stopped by the host, to deactivate on device
        self.grammars: GrammarSlots | None = None  # made at the first constrained request
        # Decode outputs (tokens, emitted) from index _first_kept on, while a request needs them.
        self._history: list[CallOutput] = []
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

    def _slots_needed(self, count: int) -> int:
        """Slots the next ``count`` queued requests take (their samples), at most max_slots."""
        taken = sum(req.n for _, req in itertools.islice(self.pending, count))
        return min(self.engine_config.max_slots, taken)

    def admission_size(self, free: int) -> int:
        """Rows of the next prefill batch, or 0: only full batches (or all that is left) are
        admitted, since a partial one would be padded and a decode call hands back as soon as a
        full one fits (a request with n samples takes n slots)."""
        n = min(self.prefill_rows, len(self.pending))
        return n if n and free >= self._slots_needed(n) else 0

    def refill_at(self) -> int:
        """Free slots at which a decode call hands back (past max_slots: never)."""
        if self.pending:
            return self._slots_needed(min(self.prefill_rows, len(self.pending)))
        return self.engine_config.max_slots + 1

    def next_batch(self, size: int, free: int | None = None) -> list[tuple[Any, GenerationRequest]]:
        """The oldest queued prompt and the size-1 others of the most similar lengths among the
        next length_lookahead queued ones (the oldest always goes first: nothing starves), as
        many as fit ``free`` slots (None: any)."""
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
        chosen, used = [], anchor[1].n
        for j in sorted(order[: size - 1]):
            if free is None or used + window[j][1].n <= free:
                chosen.append(j)
                used += window[j][1].n
        kept = set(chosen)
        for j in reversed(range(len(window))):  # the rest go back, in their order
            if j not in kept:
                pending.appendleft(window[j])
        return [anchor] + [window[j] for j in chosen]

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
        e = p * math.ceil(sum(req.n for req in requests) / p)  # entries: one per sample
        controls = ctl.empty_controls(e, (ec.max_stop_sequences, ec.max_stop_length), 1)
        bits = None
        if any(req.repetition_penalty != 1 for req in requests):
            bits = np.zeros((p, ctl.bitmask_words(self.vocab_size)), np.uint32)
            for row, req in enumerate(requests):
                if req.repetition_penalty != 1:
                    bits[row] = ctl.pack_tokens(req.prompt_ids, self.vocab_size)
        plan = AdmitPlan(
            prompts=prompts,
            starts=starts,
            states=states,
            slots=np.full((e,), ec.max_slots, np.int32),  # out of range: padding rows drop
            prompt_len=np.zeros((e,), np.int32),
            budget=np.ones((e,), np.int32),
            stop_ids=np.full((e, ec.max_stop_ids), -1, np.int32),
            temperature=np.zeros((e,), np.float32),
            top_k=np.zeros((e,), np.int32),
            top_p=np.ones((e,), np.float32),
            seed=np.zeros((e,), np.int32),
            source=np.zeros((e,), np.int32),
            controls=controls._replace(prompt_bits=bits),
        )
        entry = 0
        for row, (key, req) in enumerate(batch):
            group = _Group([None] * req.n) if req.n > 1 else None
            for sample in range(req.n):
                slot = targets[entry]
                plan.slots[entry], plan.source[entry] = slot, row
                plan.prompt_len[entry] = len(req.prompt_ids)
                plan.budget[entry] = req.max_new_tokens
                plan.stop_ids[entry, : len(req.stop_ids)] = list(req.stop_ids)
                plan.temperature[entry], plan.top_k[entry] = req.temperature, req.top_k
                plan.top_p[entry] = req.top_p
                plan.seed[entry] = ctl.sample_seed(req.seed, sample)
                ctl.fill_row(controls, entry, req)
                start = self._first_kept + len(self._history)
                self._runs[slot] = _Running(key, req, slot, start, sample=sample, group=group)
                self._live[slot] = True
                self._cancel[slot] = False
                self._generated[slot] = 0
                self._budget[slot] = req.max_new_tokens
                entry += 1
        if any(req.grammar is not None for req in requests):  # each sample: its own matcher
            grammars = self._grammar_slots()
            plan.mask = np.full((e, grammars.words), -1, np.int32)
            for entry, slot in enumerate(plan.slots.tolist()):
                run = self._runs[slot] if slot < len(self._runs) else None
                if run is not None and run.request.grammar is not None:
                    grammars.start(slot, run.request.grammar)
                    grammars.fill(slot, plan.mask[entry])
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

    def take_cancel(self) -> np.ndarray:
        """bool [max_slots]: the slots the host stopped since the last call (to deactivate on
        the device before the next decode call), cleared."""
        cancel, self._cancel = self._cancel, np.zeros_like(self._cancel)
        return cancel

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

    # Results ------------------------------------------------------------------------------------
    def retire(self, output: CallOutput) -> Retired:
        """Frees the slots whose request ``output`` finished (stop id drawn, stop sequence or loop
        matched on the device, stop string found in the text here, or budget reached) and counts
        the work: numpy over rows and steps, Python only per finished request (and per running
        request with stop strings)."""
        ended = output.ended if output.ended is not None else np.zeros(output.tokens.shape, np.int8)
        if output.slots is None:  # a decode call: rows are slots
            busy = np.flatnonzero((output.emitted | output.stopped).any(axis=0))
            stats = self.stats
            stats.decode_calls += 1
            stats.decode_steps += int(busy[-1]) + 1 if busy.size else 0
            stats.generated_tokens += int(output.emitted.sum())
            index = self._first_kept + len(self._history)
            self._history.append(output)
            self._generated += output.emitted.sum(axis=1) * self._live
            rows = np.arange(len(self._runs))
            stopped, code = output.stopped.any(axis=1), ended.max(axis=1)
            emitted = output.emitted
        else:  # an insert: rows are prefill rows, each going to output.slots[row]
            index = -1
            rows = np.flatnonzero(output.slots < len(self._runs))
            slots = output.slots[rows]
            first = output.emitted[rows, 0]
            self._generated[slots] = first
            for row, slot, emit in zip(rows.tolist(), slots.tolist(), first.tolist(), strict=True):
                run = self._runs[slot]
                if emit and run is not None:
                    run.first.append(int(output.tokens[row, 0]))
                    if run.request.logprobs is not None:
                        run.first_logprobs = output.row_logprobs(row, run.request.logprobs, [0])
            stopped, code = output.stopped[rows, 0], ended[rows, 0]
            emitted = output.emitted[rows]
            full = np.zeros(len(self._runs), bool)
            full[slots] = True
            stopped, code = _by_slot(stopped, slots, full), _by_slot(code, slots, full)
            emitted = _by_slot(emitted, slots, full)
            rows = _by_slot(rows, slots, full)
            live = full
        live = self._live if output.slots is None else live & self._live
        if self.grammars is not None:  # each constrained slot's matcher sees its new tokens
            for slot in np.flatnonzero(live).tolist():
                if self.grammars.matchers[slot] is not None:
                    picked = output.tokens[rows[slot]][emitted[slot]].tolist()
                    self.grammars.accept(slot, picked)
        reasons = np.where(stopped | (code == ENDED_STOP_SEQUENCE), "stop", "length")
        reasons = np.where(code == ENDED_LOOP, "loop", reasons)
        done = live & (stopped | (code > 0) | (self._generated >= self._budget))
        limits: dict[int, int] = {}
        if self.detokenize is not None:
            for slot in np.flatnonzero(live).tolist():
                run = self._runs[slot]
                if run is None or not run.request.stop_strings or run.request.grammar is not None:
                    continue
                tokens = output.tokens[rows[slot]][emitted[slot]].tolist()
                cut = self._text_stop(run, tokens)
                if cut is not None:
                    limits[slot] = cut
                    self.stats.wasted_tokens += int(self._generated[slot]) - cut
                    if not done[slot]:
                        done[slot] = True
                        self._cancel[slot] = True
        finished = []
        for slot in np.flatnonzero(done).tolist():
            run = self._runs[slot]
            assert run is not None
            run.reason = "stop" if slot in limits else str(reasons[slot])
            run.limit = limits.get(slot)
            run.end = index if index >= 0 else run.start - 1
            if self.grammars is not None and self.grammars.matchers[slot] is not None:
                run.error = self.grammars.release(slot)
            self._runs[slot] = None
            self._live[slot] = False
            finished.append(run)
        return Retired(finished)

    def _text_stop(self, run: _Running, new: list[int]) -> int | None:
        """The output tokens up to the one completing a stop string in the text, if ``new`` (the
        run's next tokens) completes one past min_tokens; keeps a tail of ids to decode."""
        req, decode = run.request, self.detokenize
        assert decode is not None
        before, run.count = run.count, run.count + len(new)
        tail, offset = run.tail + new, before - len(run.tail)  # offset: output index of tail[0]
        run.tail = tail[-(4 * max(map(len, req.stop_strings)) + 4) :]
        if not new or run.count < max(req.min_tokens, 1):
            return None

        def holds(m: int) -> bool:
            text = decode(tail[:m])
            return any(stop in text for stop in req.stop_strings)

        if not holds(len(tail)):
            return None
        low, high = max(len(tail) - len(new) + 1, req.min_tokens - offset, 1), len(tail)
        while low < high:  # the fewest tokens whose text holds one (text only grows with more)
            mid = (low + high) // 2
            if holds(mid):
                high = mid
            else:
                low = mid + 1
        return offset + high

    def collect(self, retired: Sequence[Retired]) -> list[tuple[Any, GenerationResult]]:
        """The requests that finished, as (key, result): each one's tokens gathered from the
        decode outputs it took part in; outputs no running request needs are dropped. A request
        with n > 1 comes once all its samples are done."""
        done: list[tuple[Any, GenerationResult]] = []
        for item in retired:
            for run in item.finished:
                result = self._result(run)
                if run.group is None:
                    done.append((run.key, result))
                    continue
                run.group.results[run.sample] = result
                if all(r is not None for r in run.group.results):
                    samples = tuple(run.group.results)  # type: ignore[arg-type]
                    done.append((run.key, dataclasses.replace(samples[0], samples=samples)))
        starts = [run.start for run in self._runs if run is not None]
        keep_from = min(starts, default=self._first_kept + len(self._history))
        del self._history[: keep_from - self._first_kept]
        self._first_kept = keep_from
        return done

    def _result(self, run: _Running) -> GenerationResult:
        k = run.request.logprobs
        parts = [np.asarray(run.first, np.int32)]
        lps, tops = list(run.first_logprobs[0]), list(run.first_logprobs[1])
        for call in range(run.start, run.end + 1):
            out = self._history[call - self._first_kept]
            picked = out.emitted[run.slot]
            parts.append(out.tokens[run.slot][picked])
            if k is not None:
                more_lps, more_tops = out.row_logprobs(run.slot, k, picked)
                lps += more_lps
                tops += more_tops
        ids = np.concatenate(parts).tolist()
        if run.limit is not None:
            ids, lps, tops = ids[: run.limit], lps[: run.limit], tops[: run.limit]
        n_prompt = len(run.request.prompt_ids)
        return GenerationResult(
            ids,
            "error" if run.error is not None else run.reason,
            n_prompt,
            len(ids),
            run.error,
            logprobs=lps if k is not None else None,
            top_logprobs=tops if k is not None else None,
        )


def _by_slot(values: np.ndarray, slots: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Per-row ``values`` of an insert laid out per slot (zeros where no row went)."""
    out = np.zeros((len(full), *values.shape[1:]), values.dtype)
    out[slots] = values
    return out
