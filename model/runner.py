"""The engine's device side: the jitted functions, the slot state and the sharding.

:class:`DeviceRunner` decides nothing: it runs what :class:`model.scheduler.Scheduler` plans
(an :class:`model.scheduler.AdmitPlan`, a decode call's ``refill_at``) and hands back device
arrays, without waiting for them (JAX dispatches asynchronously), so the host can plan the next
call while the device runs this one; :func:`fetch` turns one into a
:class:`model.scheduler.CallOutput` on the host. Every jitted function has one fixed shape:
prefill [prefill_rows, prefill_chunk], insert [prefill_rows] and decode [max_slots], wired in one
place (:meth:`DeviceRunner._wire`), with or without a tensor-parallel mesh (two more executables
then make the sharded empty caches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from model import control_ops
from model.config import ModelConfig
from model.controls import Controls, bitmask_words, empty_controls
from model.engine_config import EngineConfig
from model.griffin import Cache, RecurrentGemma, fuse_params, init_cache
from model.sampling import SamplingParams, apply_mask, sample
from model.scheduler import AdmitPlan, CallOutput
from model.sharding import (
    cache_specs,
    check_tensor_parallel,
    make_mesh,
    named_shardings,
    param_specs,
    stack_gated_up,
    unstack_gated_up,
)

Array = jax.Array


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
    recent: Array  # int32 [s, history_tokens]: generated ids, a ring at generated % h (-1 none)
    controls: Controls


class StepOutput(NamedTuple):
    """Per slot and step: the drawn token, whether it was emitted, whether it was a stop id,
    whether a stop sequence or loop ended the row (model.controls codes), and log-probabilities
    (the drawn token's, the top ids and theirs; zeros unless some row asked)."""

    tokens: Array
    emitted: Array
    stopped: Array
    ended: Array
    logprob: Array
    top_ids: Array
    top_logprobs: Array


def fetch(
    outs: Sequence[StepOutput],
    slots: Sequence[np.ndarray | None],
    logprobs: Sequence[bool] | None = None,
) -> list[CallOutput]:
    """Calls' outputs on the host (waits for the device); ``slots``: each call's insert target
    slots, or None for a decode call; ``logprobs``: whether each call's log-probabilities are
    wanted (None: all are), else they are not transferred (the CallOutput's are None).

    Every transfer is started before the first is waited for, except on the CPU, where the
    arrays are in host memory already: ``np.asarray`` reads each in place (starting a copy
    first, as ``jax.device_get`` does, costs several times more there)."""
    wanted = [out if logprobs is None or logprobs[i] else out[:4] for i, out in enumerate(outs)]
    if wanted and _device_platform(wanted[0][0]) != "cpu":
        for fields in wanted:
            for x in fields:
                x.copy_to_host_async()
    hosts = []
    for fields, where in zip(wanted, slots, strict=True):
        arrays = [np.asarray(x) for x in fields]
        if arrays[0].ndim == 1:  # an insert: one step per row
            arrays = [x[:, None] for x in arrays]
        hosts.append(CallOutput(*arrays[:3], where, *arrays[3:]))
    return hosts


def _device_platform(x: Array) -> str:
    return next(iter(x.devices())).platform


class DeviceRunner:
    """Params, slot state and the jitted prefill / insert / decode of one replica.

    ``prefill``, ``insert`` and ``decode`` are attributes (the jitted functions), so a benchmark
    may wrap them; ``compiled_shapes`` counts the executables of the originals.
    """

    def __init__(
        self,
        config: ModelConfig,
        params: Any,
        engine_config: EngineConfig,
        devices: Sequence[jax.Device] | None = None,
    ) -> None:
        self.config = config
        self.engine_config = ec = engine_config
        n = ec.tensor_parallel
        check_tensor_parallel(config, n)
        self.mesh = make_mesh(n, devices) if n > 1 or devices is not None else None
        self.prefill_rows = min(ec.prefill_batch, ec.max_slots)
        self.model = RecurrentGemma(config, dtype=ec.dtype, fused=n == 1)
        self._prefill_cache_sharding: Any = None  # set with tensor parallelism
        self._blank_row: Any = None  # one empty sequence's cache, host copy
        self._spare: Cache | None = None  # the last prefill cache, reused (emptied) by the next
        self._wire(params)
        self.state = self.empty_state()
        # All-ones packed masks (every token allowed), kept on the device for the calls
        # without a constrained row: the mask is always an input, so no call shape changes.
        words = bitmask_words(config.vocab_size)
        self._open_masks = {
            rows: self._replicated(np.full((rows, words), -1, np.int32))
            for rows in {self.prefill_rows, ec.max_slots}
        }
        # The prompt bitmask of admissions without a repetition penalty: none, on the device.
        self._no_bits = self._replicated(np.zeros((self.prefill_rows, words), np.uint32))

    # The jit wiring --------------------------------------------------------------------------------
    def _wire(self, params: Any) -> None:
        """Places the params and jits the device functions: on one device as they are, on a mesh
        with fixed in/out shardings (each device receiving only its shards, cast there)."""
        ec = self.engine_config
        if ec.tensor_parallel == 1:
            # The serving layout: one matmul per shared input (a copy of those weights; the
            # caller may drop its own tree once the engine is built).
            cast = jax.tree.map(lambda x: jnp.asarray(x, ec.dtype), params)
            self.params = fuse_params(self._committed(cast))
            shardings: dict[str, tuple[Any, Any]] = {}
        else:
            shardings = self._place_sharded(params)

        def jit(fn: Callable[..., Any], name: str, donate: tuple[int, ...] = ()) -> Any:
            if name not in shardings:
                return jax.jit(fn, donate_argnums=donate)
            in_sh, out_sh = shardings[name]
            if in_sh is None:  # no arguments
                return jax.jit(fn, donate_argnums=donate, out_shardings=out_sh)
            return jax.jit(fn, donate_argnums=donate, in_shardings=in_sh, out_shardings=out_sh)

        self.prefill = jit(self._prefill_fn, "prefill", (3,))  # the cache is donated
        self.insert = jit(self._insert_fn, "insert", (0,))
        self.decode = jit(self._decode_fn, "decode", (1,))
        self._jitted = [self.prefill, self.insert, self.decode]
        if shardings:
            # The empty caches are made on the mesh, split, never whole on one device.
            self._new_prefill_cache = jit(
                lambda: init_cache(self.config, self.prefill_rows, ec.dtype), "new_prefill_cache"
            )
            self._new_state = jit(self._zero_state, "new_state")
            self._jitted += [self._new_prefill_cache, self._new_state]

    def _place_sharded(self, params: Any) -> dict[str, tuple[Any, Any]]:
        """Puts the params on the mesh; returns each function's (in, out) shardings."""
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
        state = SlotState(slot_cache, *([rep] * (len(SlotState._fields) - 1)))
        logits = named_shardings(mesh, P(None, "tp"))  # split by vocab, like the embedding
        return {
            "prefill": ((param_sh, rep, rep, prefill_cache, rep), (logits, prefill_cache)),
            "insert": ((state, prefill_cache, logits, *[rep] * 8), (state, rep)),
            "decode": ((param_sh, state, *[rep] * 4), (state, rep)),
            "new_prefill_cache": (None, prefill_cache),
            "new_state": (None, state),
        }

    def compiled_shapes(self) -> int:
        return sum(f._cache_size() for f in self._jitted)

    # Device functions (one shape each) ------------------------------------------------------------
    def _model_params(self, params: Any) -> Any:
        """The tree the model reads, from what the runner stores (inside jit)."""
        return params if self.engine_config.tensor_parallel == 1 else stack_gated_up(params)

    def _prefill_fn(
        self, params: Any, tokens: Array, positions: Array, cache: Cache, fresh: Array
    ) -> tuple[Array, Cache]:
        """One chunk; ``fresh`` starts every row from an empty cache instead (so the host need
        not build one per batch: any spent prefill cache of the right shape will do)."""
        empty = init_cache(self.config, self.prefill_rows, self.engine_config.dtype)
        cache = jax.tree.map(lambda old, new: jnp.where(fresh, new, old), cache, empty)
        logits, cache = self.model.apply(
            {"params": self._model_params(params)}, tokens, positions, cache, last_logits_only=True
        )
        return logits[:, 0], cache

    def _insert_fn(
        self,
        state: SlotState,
        prefill_cache: Cache,
        logits: Array,
        source: Array,
        slots: Array,
        prompt_len: Array,
        budget: Array,
        stop_ids: Array,
        sampling: SamplingParams,
        controls: Controls,
        mask: Array,
    ) -> tuple[SlotState, StepOutput]:
        """Samples each entry's first token from prefill row ``source[i]`` (under its packed
        ``mask``) and moves that row's state into slot ``slots[i]`` (several entries may copy
        one row: the samples of n > 1)."""
        logits = jnp.take(logits, source, axis=0)
        cache = jax.tree.map(lambda x: jnp.take(x, source, axis=0), prefill_cache)
        controls = controls._replace(prompt_bits=jnp.take(controls.prompt_bits, source, axis=0))
        zero = jnp.zeros_like(prompt_len)
        recent = jnp.full((source.shape[0], state.recent.shape[1]), -1, jnp.int32)
        adjusted = control_ops.adjust_logits(logits, controls, recent, zero, stop_ids)
        first = sample(apply_mask(adjusted, mask), sampling, zero)
        stopped = jnp.any(first[:, None] == stop_ids, axis=-1)
        emitted = ~stopped
        recent = control_ops.record(recent, zero, first, emitted)
        ended = jnp.where(emitted, self._ended(recent, emitted.astype(jnp.int32), controls), 0)
        active = emitted & (budget > 1) & (ended == 0)
        lps = control_ops.logprob_outputs(
            logits, first, controls, emitted, self.engine_config.max_logprobs
        )

        def put(big: Array, small: Array) -> Array:
            return big.at[slots].set(small.astype(big.dtype), mode="drop")

        new_state = SlotState(
            cache=jax.tree.map(put, state.cache, cache),
            next_token=put(state.next_token, first),
            position=put(state.position, prompt_len),
            active=put(state.active, active),
            generated=put(state.generated, emitted.astype(jnp.int32)),
            budget=put(state.budget, budget),
            stop_ids=put(state.stop_ids, stop_ids),
            sampling=jax.tree.map(put, state.sampling, sampling),
            recent=put(state.recent, recent),
            controls=jax.tree.map(put, state.controls, controls),
        )
        return new_state, StepOutput(first, emitted, stopped, ended.astype(jnp.int8), *lps)

    def _ended(self, recent: Array, count: Array, controls: Controls) -> Array:
        return control_ops.ended(recent, count, controls, self.engine_config.max_loop_window)

    def _decode_fn(
        self,
        params: Any,
        state: SlotState,
        refill_at: Array,
        max_steps: Array,
        mask: Array,
        cancel: Array,
    ) -> tuple[SlotState, StepOutput]:
        """Up to ``min(decode_steps, max_steps)`` steps, each drawing under the packed ``mask``
        [slots, words] (the host passes one step while a constrained row runs); stops early
        once ``refill_at`` slots are free (so the host can admit a full prefill batch) or none
        is active. Steps not run are not emitted. ``cancel``: slots the host stopped (a stop
        string in the text), made inactive first."""
        ec = self.engine_config
        steps, slots, top = ec.decode_steps, ec.max_slots, ec.max_logprobs
        state = state._replace(active=state.active & ~cancel)

        def step(carry: tuple[SlotState, Array, StepOutput]) -> tuple[SlotState, Array, StepOutput]:
            state, i, out = carry
            positions = jnp.where(state.active, state.position, -1)
            logits, cache = self.model.apply(
                {"params": self._model_params(params)},
                state.next_token[:, None],
                positions[:, None],
                state.cache,
            )
            raw = logits[:, 0]
            adjusted = control_ops.adjust_logits(
                raw, state.controls, state.recent, state.generated, state.stop_ids
            )
            token = sample(apply_mask(adjusted, mask), state.sampling, state.generated)
            stopped = state.active & jnp.any(token[:, None] == state.stop_ids, axis=-1)
            emitted = state.active & ~stopped
            recent = control_ops.record(state.recent, state.generated, token, emitted)
            generated = state.generated + emitted
            ended = jnp.where(emitted, self._ended(recent, generated, state.controls), 0)
            active = emitted & (generated < state.budget) & (ended == 0)
            lps = control_ops.logprob_outputs(raw, token, state.controls, state.active, top)
            new_state = state._replace(
                cache=cache,
                next_token=jnp.where(emitted, token, state.next_token),
                position=state.position + emitted,
                active=active,
                generated=generated,
                recent=recent,
            )
            values = (token, emitted, stopped, ended.astype(jnp.int8), *lps)
            out = StepOutput(*(o.at[:, i].set(v) for o, v in zip(out, values, strict=True)))
            return new_state, i + 1, out

        def more(carry: tuple[SlotState, Array, StepOutput]) -> Array:
            state, i, _ = carry
            free = slots - jnp.sum(state.active)
            return (i < jnp.minimum(steps, max_steps)) & jnp.any(state.active) & (free < refill_at)

        empty = StepOutput(
            jnp.zeros((slots, steps), jnp.int32),
            jnp.zeros((slots, steps), bool),
            jnp.zeros((slots, steps), bool),
            jnp.zeros((slots, steps), jnp.int8),
            jnp.zeros((slots, steps), jnp.float32),
            jnp.zeros((slots, steps, top), jnp.int32),
            jnp.zeros((slots, steps, top), jnp.float32),
        )
        state, _, out = jax.lax.while_loop(more, step, (state, jnp.int32(0), empty))
        return state, out

    # Calls (dispatched, not waited for) ----------------------------------------------------------
    def run_decode(
        self,
        refill_at: int,
        max_steps: int | None = None,
        mask: np.ndarray | None = None,
        cancel: np.ndarray | None = None,
    ) -> StepOutput:
        """One decode call on the slot state: at most ``max_steps`` steps (default
        decode_steps), under ``mask`` (int32 [max_slots, words]; None allows every token);
        ``cancel``: slots to deactivate first."""
        self.state, out = self.decode(*self.decode_inputs(refill_at, max_steps, mask, cancel))
        return out

    def decode_inputs(
        self,
        refill_at: int,
        max_steps: int | None = None,
        mask: np.ndarray | None = None,
        cancel: np.ndarray | None = None,
    ) -> tuple[Any, ...]:
        """The arguments of one decode call (see :meth:`run_decode`), e.g. to lower it."""
        ec = self.engine_config
        steps = ec.decode_steps if max_steps is None else max_steps
        masks = self._mask_input(mask, ec.max_slots)
        if cancel is None:
            cancel = np.zeros((ec.max_slots,), bool)
        return self.params, self.state, np.int32(refill_at), np.int32(steps), masks, cancel

    def _mask_input(self, mask: np.ndarray | None, rows: int) -> Array:
        return self._open_masks[rows] if mask is None else self._replicated(mask)

    def _replicated(self, x: np.ndarray) -> Array:
        """A host array on the replica's device (every device of its mesh holding all of it)."""
        if self.engine_config.tensor_parallel > 1:
            return jax.device_put(x, named_shardings(self.mesh, P()))
        return self._committed(jax.device_put(x))

    def run_admit(self, plan: AdmitPlan) -> list[tuple[StepOutput, np.ndarray]]:
        """Prefills the plan's rows once and inserts its entries into their slots, prefill_rows
        entries per insert call; each call's first tokens and target slots."""
        logits, cache = self.prefill_prompts(plan.prompts, plan.starts, plan.states)
        bits = plan.controls.prompt_bits  # on the device like the "none" one: one executable
        bits = self._no_bits if bits is None else self._replicated(bits)
        outs = []
        p = self.prefill_rows
        for k in range(0, len(plan.slots), p):
            part = slice(k, k + p)
            sampling = SamplingParams(
                plan.temperature[part], plan.top_k[part], plan.top_p[part], plan.seed[part]
            )
            controls = Controls(*(x[part] for x in plan.controls[:-1]), prompt_bits=bits)
            mask = self._mask_input(None if plan.mask is None else plan.mask[part], p)
            self.state, first = self.insert(
                self.state, cache, logits, plan.source[part], plan.slots[part],
                plan.prompt_len[part], plan.budget[part], plan.stop_ids[part], sampling, controls,
                mask,
            )  # fmt: skip
            outs.append((first, plan.slots[part]))
        return outs

    def prefill_prompts(
        self,
        prompts: Sequence[Sequence[int]],
        starts: Sequence[int] | None = None,
        states: Sequence[Any] | None = None,
    ) -> tuple[Array, Cache]:
        """Right-aligned prompts in chunks of prefill_chunk; state carried across chunks. With
        ``states``, row i continues ``states[i]`` (a cached prefix state, or None for an empty
        one) from position ``starts[i]``."""
        p, c = self.prefill_rows, self.engine_config.prefill_chunk
        chunks = math.ceil(max(len(ids) for ids in prompts) / c)
        tokens = np.zeros((p, chunks * c), np.int32)
        positions = np.full((p, chunks * c), -1, np.int32)
        for row, ids in enumerate(prompts):
            start = starts[row] if starts else 0
            tokens[row, -len(ids) :] = ids
            positions[row, -len(ids) :] = np.arange(start, start + len(ids))
        loaded = states is not None and any(state is not None for state in states)
        if loaded:
            cache = self._loaded_prefill_cache(states)
        else:  # the last batch's spent cache (already read by its insert), emptied on device
            cache = self._spare if self._spare is not None else self._empty_prefill_cache()
        self._spare = None  # donated below
        for k in range(chunks):
            window = slice(k * c, (k + 1) * c)
            fresh = np.bool_(k == 0 and not loaded)
            logits, cache = self.prefill(
                self.params, tokens[:, window], positions[:, window], cache, fresh
            )
        self._spare = cache
        return logits, cache

    def prefix_states(self, prefixes: Sequence[Sequence[int]]) -> list[Any]:
        """Each prefix's state after prefill, as a host cache of one sequence (waits)."""
        _, cache = self.prefill_prompts(prefixes)
        host = jax.device_get(cache)
        return [
            jax.tree.map(lambda x, row=row: np.array(x[row]), host) for row in range(len(prefixes))
        ]

    # State ---------------------------------------------------------------------------------------
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
            recent=jnp.full((s, ec.history_tokens), -1, jnp.int32),
            controls=Controls(
                *(
                    jnp.asarray(x)
                    for x in empty_controls(
                        s, (ec.max_stop_sequences, ec.max_stop_length), self.config.vocab_size
                    )
                )
            ),
        )

    def _committed(self, tree: Any) -> Any:
        """One device named in ``devices``: arrays committed to it (jit runs where they are)."""
        return tree if self.mesh is None else jax.device_put(tree, self.mesh.devices.flat[0])

    def empty_state(self) -> SlotState:
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
