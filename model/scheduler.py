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
_INT_ONLY = {int}
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
        """Whether an entry is constrained (has a grammar mask)."""
        return self.mask is not None

    @property
    def logprobs(self) -> bool:
        """Whether an entry asks for log-probabilities."""
        return bool((self.controls.logprobs >= 0).any())


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


def merge_inserts(outputs: Sequence[CallOutput]) -> list[CallOutput]:
    """``outputs`` with each run of consecutive insert outputs (the same fields read back) as
    one, its rows one after another: retiring it is retiring them in turn (an insert touches
    only its own slots), for one pass of numpy instead of one per call."""
    merged: list[CallOutput] = []
    group: list[CallOutput] = []

    def flush() -> None:
        if len(group) == 1:
            merged.append(group[0])
        elif group:
            names = [f.name for f in dataclasses.fields(CallOutput)]
            joined = (
                None
                if getattr(group[0], n) is None
                else np.concatenate([getattr(o, n) for o in group])
                for n in names
            )
            merged.append(CallOutput(*joined))
        group.clear()

    for out in outputs:
        joins = (
            out.slots is not None
            and group
            and (out.logprob is None) == (group[0].logprob is None)
            and (out.ended is None) == (group[0].ended is None)
        )
        if not joins:
            flush()
        if out.slots is None:
            merged.append(out)
        else:
            group.append(out)
    flush()
    return merged


@dataclasses.dataclass
class _Group:
    """The samples of one request with n > 1, as they finish."""

    results: list[GenerationResult | None]


@dataclasses.dataclass(slots=True)
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
    size = _checked_prompt_len(request.prompt_ids, vocab_size)
    if size is None:  # not a plain list of ids in range: numpy says why
        ids = np.asarray(request.prompt_ids)
        if ids.size == 0:
            return "empty prompt"
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            return "prompt_ids must be a flat sequence of integers"
        if ids.min() < 0 or ids.max() >= vocab_size:
            bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
            return f"token id {bad} is outside the vocabulary [0, {vocab_size})"
        size = int(ids.size)
    if engine.max_prompt_tokens is not None and size > engine.max_prompt_tokens:
        return f"prompt has {size} tokens, over max_prompt_tokens={engine.max_prompt_tokens}"
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
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 0 <= n < size:
        return (
            f"prefix_len must be an integer in [0, {size}) for a {size}-token prompt "
            f"(at least one prompt token follows the shared prefix), got {n!r}"
        )
    return None


def _checked_prompt_len(ids: Any, vocab_size: int) -> int | None:
    """The length of ``ids`` if it is a non-empty list or tuple of Python ints in the
    vocabulary (the usual prompt, checked without numpy), else None."""
    if type(ids) is not list and type(ids) is not tuple:
        return None
    if not ids or set(map(type, ids)) != _INT_ONLY:
        return None
    if min(ids) < 0 or max(ids) >= vocab_size:
        return None
    return len(ids)


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
        self._plan_templates: dict[int, AdmitPlan] = {}  # blank plans by entries, copied
        self._slot_ids = np.arange(engine_config.max_slots)
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
        self._start = np.zeros(s, np.int64)  # each slot's request's _Running.start
        self._logprobs = np.zeros(s, bool)  # slots whose request asks for logprobs
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
        reach = min(len(pending), max(size, self.engine_config.length_lookahead) - 1)
        window = list(itertools.islice(pending, reach))  # looked at in place, not popped
        shared = self.prefix_cache is not None
        target = self.fed_len(anchor[1])
        gaps = [
            abs(len(req.prompt_ids) - (req.prefix_len if shared else 0) - target)
            for _, req in window
        ]
        order = sorted(range(reach), key=gaps.__getitem__)  # stable: ties in queue order
        chosen, used = [], anchor[1].n
        for j in sorted(order[: size - 1]):
            n = window[j][1].n
            if free is None or used + n <= free:
                chosen.append(j)
                used += n
        for j in reversed(chosen):  # the rest stay queued, in their order
            del pending[j]
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
        p = self.prefill_rows
        entries = [(row, sample) for row, req in enumerate(requests) for sample in range(req.n)]
        m = len(entries)  # one per sample, then padding up to whole inserts
        e = p * math.ceil(m / p)
        bits = None
        if any(req.repetition_penalty != 1 for req in requests):
            bits = np.zeros((p, ctl.bitmask_words(self.vocab_size)), np.uint32)
            for row, req in enumerate(requests):
                if req.repetition_penalty != 1:
                    bits[row] = ctl.pack_tokens(req.prompt_ids, self.vocab_size)
        plan = self._blank_plan(e)
        plan.prompts, plan.starts, plan.states = prompts, starts, states
        plan.controls = plan.controls._replace(prompt_bits=bits)
        if m == len(requests):  # no request with n > 1: entry i is request i's only sample
            ents = requests
            plan.source[:m] = range(m)
            plan.seed[:m] = [int(req.seed) & 0x7FFFFFFF for req in ents]  # sample_seed(seed, 0)
            groups: list[_Group | None] = [None] * m
        else:
            ents = [requests[row] for row, _ in entries]
            plan.source[:m] = [row for row, _ in entries]
            plan.seed[:m] = [ctl.sample_seed(ents[i].seed, s) for i, (_, s) in enumerate(entries)]
            by_row = [_Group([None] * req.n) if req.n > 1 else None for req in requests]
            groups = [by_row[row] for row, _ in entries]
        slots = targets[:m]
        at = np.asarray(slots)  # one conversion for the assignments below
        plan.slots[:m] = at
        plan.prompt_len[:m] = [len(req.prompt_ids) for req in ents]
        plan.budget[:m] = [req.max_new_tokens for req in ents]
        plan.temperature[:m] = [req.temperature for req in ents]
        plan.top_k[:m] = [req.top_k for req in ents]
        plan.top_p[:m] = [req.top_p for req in ents]
        for entry, req in enumerate(ents):
            if req.stop_ids:
                plan.stop_ids[entry, : len(req.stop_ids)] = req.stop_ids
        ctl.fill_rows(plan.controls, ents)
        start = self._first_kept + len(self._history)
        runs = self._runs
        for slot, (row, sample), group in zip(slots, entries, groups, strict=True):
            runs[slot] = _Running(
                batch[row][0], requests[row], slot, start, sample=sample, group=group
            )
        self._start[at] = start
        self._live[at] = True
        self._cancel[at] = False
        self._generated[at] = 0
        self._budget[at] = plan.budget[:m]
        self._logprobs[at] = plan.controls.logprobs[:m] >= 0
        if any(req.grammar is not None for req in requests):  # each sample: its own matcher
            grammars = self._grammar_slots()
            plan.mask = np.full((e, grammars.words), -1, np.int32)
            for entry, slot in enumerate(plan.slots.tolist()):
                run = self._runs[slot] if slot < len(self._runs) else None
                if run is not None and run.request.grammar is not None:
                    grammars.start(slot, run.request.grammar)
                    grammars.fill(slot, plan.mask[entry])
        return plan

    def _blank_plan(self, entries: int) -> AdmitPlan:
        """A plan of ``entries`` rows, every row padding (copies of one template per size: the
        arrays go to the device, so each plan has its own)."""
        t = self._plan_templates.get(entries)
        if t is None:
            ec = self.engine_config
            t = AdmitPlan(
                prompts=[],
                starts=None,
                states=None,
                slots=np.full((entries,), ec.max_slots, np.int32),  # out of range: rows drop
                prompt_len=np.zeros((entries,), np.int32),
                budget=np.ones((entries,), np.int32),
                stop_ids=np.full((entries, ec.max_stop_ids), -1, np.int32),
                temperature=np.zeros((entries,), np.float32),
                top_k=np.zeros((entries,), np.int32),
                top_p=np.ones((entries,), np.float32),
                seed=np.zeros((entries,), np.int32),
                source=np.zeros((entries,), np.int32),
                controls=ctl.empty_controls(
                    entries, (ec.max_stop_sequences, ec.max_stop_length), 1
                )._replace(prompt_bits=None),
            )
            self._plan_templates[entries] = t
        return AdmitPlan(
            prompts=[],
            starts=None,
            states=None,
            slots=t.slots.copy(),
            prompt_len=t.prompt_len.copy(),
            budget=t.budget.copy(),
            stop_ids=t.stop_ids.copy(),
            temperature=t.temperature.copy(),
            top_k=t.top_k.copy(),
            top_p=t.top_p.copy(),
            seed=t.seed.copy(),
            source=t.source.copy(),
            controls=Controls(*(None if x is None else x.copy() for x in t.controls)),
        )

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

    def logprobs_running(self) -> bool:
        """Whether a running request asks for log-probabilities (the next decode call's are
        read back only then)."""
        return bool((self._logprobs & self._live).any())

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
        request with stop strings or a grammar)."""
        if output.slots is None:  # a decode call: row i is slot i
            busy = np.flatnonzero((output.emitted | output.stopped).any(axis=0))
            stats = self.stats
            stats.decode_calls += 1
            stats.decode_steps += int(busy[-1]) + 1 if busy.size else 0
            stats.generated_tokens += int(output.emitted.sum())
            index = self._first_kept + len(self._history)
            self._history.append(output)
            self._generated += output.emitted.sum(axis=1) * self._live
            slots = self._slot_ids
            tokens, emitted = output.tokens, output.emitted
            stopped = output.stopped.any(axis=1)
            code = None if output.ended is None else output.ended.max(axis=1)
            live, generated, budget = self._live, self._generated, self._budget
        else:  # an insert: row i went to slot output.slots[i] (padding rows past max_slots)
            index = -1
            rows = np.flatnonzero(output.slots < len(self._runs))
            slots = output.slots[rows]
            tokens, emitted = output.tokens[rows], output.emitted[rows]
            stopped = output.stopped[rows, 0]
            code = None if output.ended is None else output.ended[rows, 0]
            self._generated[slots] = emitted[:, 0]
            self._take_first(output, rows, slots, emitted[:, 0])
            live = self._live[slots]
            generated, budget = self._generated[slots], self._budget[slots]
        # From here on, position i stands for slot slots[i].
        ended = stopped | (generated >= budget)
        if code is not None:
            ended |= code > 0
        done = live & ended
        limits: dict[int, int] = {}
        if self.grammars is not None or self.detokenize is not None:
            self._host_checks(slots, tokens, emitted, live, done, limits)
        finished = []
        where = np.flatnonzero(done)
        if where.size:
            done_slots = slots[where].tolist()
            done_stopped = stopped[where].tolist()
            done_code = [0] * len(where) if code is None else code[where].tolist()
            runs = self._runs
            for slot, stop, why in zip(done_slots, done_stopped, done_code, strict=True):
                run = runs[slot]
                assert run is not None
                if slot in limits:
                    run.reason, run.limit = "stop", limits[slot]
                elif why == ENDED_LOOP:
                    run.reason = "loop"
                elif stop or why == ENDED_STOP_SEQUENCE:
                    run.reason = "stop"
                else:
                    run.reason = "length"
                run.end = index if index >= 0 else run.start - 1
                if self.grammars is not None and self.grammars.matchers[slot] is not None:
                    run.error = self.grammars.release(slot)
                runs[slot] = None
                finished.append(run)
            self._live[done_slots] = False
        return Retired(finished)

    def _take_first(
        self, output: CallOutput, rows: np.ndarray, slots: np.ndarray, emitted: np.ndarray
    ) -> None:
        """Each inserted request's first token (and its logprobs), if emitted."""
        runs = self._runs
        tokens = output.tokens[rows, 0].tolist()
        for i, (slot, emit) in enumerate(zip(slots.tolist(), emitted.tolist(), strict=True)):
            run = runs[slot]
            if emit and run is not None:
                run.first.append(tokens[i])
                if run.request.logprobs is not None:
                    row = int(rows[i])
                    run.first_logprobs = output.row_logprobs(row, run.request.logprobs, [0])

    def _host_checks(
        self,
        slots: np.ndarray,
        tokens: np.ndarray,
        emitted: np.ndarray,
        live: np.ndarray,
        done: np.ndarray,
        limits: dict[int, int],
    ) -> None:
        """What the host checks per running request in one call's output (position i: slot
        ``slots[i]``): each constrained slot's matcher sees its new tokens, and a stop string in
        the text ends a request (``limits[slot]``: the tokens it keeps; ``done`` set, and the
        slot cancelled on the device if it would run on)."""
        grammars = self.grammars
        positions = np.flatnonzero(live).tolist()
        slot_of = slots.tolist()
        if grammars is not None:
            for i in positions:
                if grammars.matchers[slot_of[i]] is not None:
                    grammars.accept(slot_of[i], tokens[i][emitted[i]].tolist())
        if self.detokenize is None:
            return
        for i in positions:
            slot = slot_of[i]
            run = self._runs[slot]
            if run is None or not run.request.stop_strings or run.request.grammar is not None:
                continue
            cut = self._text_stop(run, tokens[i][emitted[i]].tolist())
            if cut is not None:
                limits[slot] = cut
                self.stats.wasted_tokens += int(self._generated[slot]) - cut
                if not done[i]:
                    done[i] = True
                    self._cancel[slot] = True

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
        decode outputs it took part in (all of them together: numpy per call, Python per
        request); outputs no running request needs are dropped. A request with n > 1 comes
        once all its samples are done."""
        runs = [run for item in retired for run in item.finished]
        done: list[tuple[Any, GenerationResult]] = []
        for run, result in zip(runs, self._results(runs), strict=True):
            if run.group is None:
                done.append((run.key, result))
                continue
            run.group.results[run.sample] = result
            if all(r is not None for r in run.group.results):
                samples = tuple(run.group.results)  # type: ignore[arg-type]
                done.append((run.key, dataclasses.replace(samples[0], samples=samples)))
        starts = self._start[self._live]
        keep_from = int(starts.min()) if starts.size else self._first_kept + len(self._history)
        del self._history[: keep_from - self._first_kept]
        self._first_kept = keep_from
        return done

    def _results(self, runs: list[_Running]) -> list[GenerationResult]:
        """The finished ``runs``' results: their tokens from the decode calls each took part in
        (``start .. end``), gathered for all of them at once."""
        if not runs:
            return []
        ids = [list(run.first) for run in runs]
        low, high = min(run.start for run in runs), max(run.end for run in runs)
        if high >= low:
            slots = np.array([run.slot for run in runs])
            starts = np.array([run.start for run in runs])
            ends = np.array([run.end for run in runs])
            tokens, picked = [], []
            for call in range(low, high + 1):
                out = self._history[call - self._first_kept]
                tokens.append(out.tokens[slots])
                inside = (starts <= call) & (call <= ends)
                picked.append(out.emitted[slots] & inside[:, None])
            kept = np.concatenate(picked, axis=1)
            flat = np.concatenate(tokens, axis=1)[kept].tolist()  # row by row, in call order
            ends_at = np.cumsum(kept.sum(axis=1)).tolist()
            begin = 0
            for row, end in enumerate(ends_at):
                ids[row] += flat[begin:end]
                begin = end
        results = []
        for run, run_ids in zip(runs, ids, strict=True):
            k = run.request.logprobs
            lps: list[float] = []
            tops: list[Any] = []
            if k is not None:
                lps, tops = list(run.first_logprobs[0]), list(run.first_logprobs[1])
                for call in range(run.start, run.end + 1):
                    out = self._history[call - self._first_kept]
                    more_lps, more_tops = out.row_logprobs(run.slot, k, out.emitted[run.slot])
                    lps += more_lps
                    tops += more_tops
            if run.limit is not None:
                run_ids, lps, tops = run_ids[: run.limit], lps[: run.limit], tops[: run.limit]
            results.append(
                GenerationResult(
                    run_ids,
                    "error" if run.error is not None else run.reason,
                    len(run.request.prompt_ids),
                    len(run_ids),
                    run.error,
                    logprobs=lps if k is not None else None,
                    top_logprobs=tops if k is not None else None,
                )
            )
        return results
