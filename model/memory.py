"""Per-device memory plan of one engine replica, from shapes alone (nothing is allocated).

``plan_memory(config, dtype=..., max_slots=..., prefill_batch=..., prefill_chunk=...,
tensor_parallel=N)`` adds up what one device holds while serving:

- weights: every parameter in the compute dtype, split by the rules of :mod:`model.sharding`
  (everything but the norms, the row-parallel biases and the K/V projections is divided by N);
- slot state: ``max_slots`` caches (the RG-LRU and conv states divided by N, the replicated
  attention ring buffer not) and a few scalars per slot;
- workspace: the larger of one prefill call (the prefill cache of ``min(prefill_batch,
  max_slots)`` rows plus the activations of a ``[rows, prefill_chunk]`` chunk) and one decode
  call (activations of ``max_slots`` one-token rows, logits and top-k/top-p sampling, which sorts
  full float32 vocabulary rows). The two never run at once.

Activations are an estimate of what is live inside the largest block, not an XLA measurement:
the residual stream (4 arrays of [tokens, d]), then the largest of the recurrent branch (5
[tokens, r/N] arrays in the compute dtype and 8 float32 ones for the RG-LRU gates and the
associative scan), the attention scores (4 float32 [tokens, n/N, w + chunk] arrays: cached and
chunk scores, their concatenation, the softmax) and the MLP (3 [tokens, m/N] arrays), plus the
float32 logits. XLA fuses many of these, so the figure is meant to err high: against XLA's own
buffer assignment (``memory_analysis()``, CPU, float32, 2B and 9B widths, 8 x 128 prefill) it is
1.4x the temporaries at N=1 and N=2, and 1.1x for a 32-slot decode with top-k/top-p. The
headroom covers the runtime's own allocations and fragmentation.

Not modelled: XLA:CPU runs bfloat16 matmuls in float32 and converts the embedding table for the
logits (a 2.6 GB temporary for 2B); CPU reports no memory limit, so nothing is checked there.
Weights are the steady state: a one-device engine is built by casting the whole tree on the
device and then concatenating the fused projections, so it briefly holds most weights twice.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.griffin import init_cache, param_shapes
from model.sharding import bytes_per_device, cache_specs, check_tensor_parallel, param_specs

GB = 1e9
# next_token, position, generated, budget (int32), active (bool), 4 sampling values (32-bit) and
# the stop ids (int32, EngineConfig.max_stop_ids = 4 by default).
SLOT_SCALAR_BYTES = 4 * 4 + 1 + 4 * 4 + 4 * 4
_F32 = 4


class MemoryPlanError(ValueError):
    """The planned engine does not fit the device memory."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one engine replica while serving.

    Attributes:
      tensor_parallel: Devices the replica spans.
      max_slots: Slots planned for.
      weights_bytes: The parameters, in the compute dtype, as split across devices.
      slot_state_bytes: The caches and per-slot scalars of all ``max_slots`` slots.
      prefill_workspace_bytes: The prefill cache plus the activations of one prefill chunk.
      decode_workspace_bytes: Activations, logits and sampling buffers of one decode call.
      limit_bytes: The device's memory (None where unknown, as on CPU: then ``fits`` is True).
      headroom: Fraction of ``limit_bytes`` kept free.
      advice: What would fit instead (empty when the plan fits).
    """

    tensor_parallel: int
    max_slots: int
    weights_bytes: int
    slot_state_bytes: int
    prefill_workspace_bytes: int
    decode_workspace_bytes: int
    limit_bytes: int | None
    headroom: float
    advice: str = ""

    @property
    def workspace_bytes(self) -> int:
        return max(self.prefill_workspace_bytes, self.decode_workspace_bytes)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.slot_state_bytes + self.workspace_bytes

    @property
    def usable_bytes(self) -> int | None:
        """The limit less the headroom."""
        return None if self.limit_bytes is None else int(self.limit_bytes * (1 - self.headroom))

    @property
    def fits(self) -> bool:
        usable = self.usable_bytes
        return usable is None or self.total_bytes <= usable

    def summary(self) -> str:
        where = (
            "no device limit known"
            if self.limit_bytes is None
            else f"{_gb(self.usable_bytes)} usable ({_gb(self.limit_bytes)} limit less "
            f"{self.headroom:.0%} headroom)"
        )
        return (
            f"{_gb(self.total_bytes)} per device at tensor_parallel={self.tensor_parallel}: "
            f"{_gb(self.weights_bytes)} weights + {_gb(self.slot_state_bytes)} slot state "
            f"({self.max_slots} slots) + {_gb(self.workspace_bytes)} workspace; {where}"
        )

    def check(self) -> MemoryPlan:
        """Returns the plan if it fits; raises MemoryPlanError naming the numbers and the fix."""
        if not self.fits:
            raise MemoryPlanError(
                f"engine does not fit the device: {self.summary()}. {self.advice}"
            )
        return self


def _gb(n: int | None) -> str:
    return f"{(n or 0) / GB:.2f} GB"


def device_memory_limit(device: jax.Device | None = None) -> int | None:
    """``device.memory_stats()["bytes_limit"]`` (default: the first local device), or None where
    the backend does not report one (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory stats raise instead of returning None
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


@functools.lru_cache(maxsize=64)
def _weight_bytes(config: ModelConfig, itemsize: int, n: int) -> int:
    shapes = param_shapes(config)
    return bytes_per_device(shapes, param_specs(shapes), n, itemsize)


@functools.lru_cache(maxsize=64)
def _cache_bytes(config: ModelConfig, dtype: np.dtype, n: int) -> int:
    """One sequence's cache on one device."""
    shapes = jax.eval_shape(lambda: init_cache(config, 1, dtype))
    return bytes_per_device(shapes, cache_specs(shapes), n)


def _activation_bytes(config: ModelConfig, itemsize: int, rows: int, chunk: int, n: int) -> int:
    """Estimated live activations of one forward call on [rows, chunk] tokens (module doc)."""
    tokens, e = rows * chunk, itemsize
    d, r, m = config.width, config.recurrent_width // n, config.mlp_expanded_width // n
    heads = config.num_heads // n
    residual = 4 * tokens * d * e
    recurrent = 5 * tokens * r * e + 8 * tokens * r * _F32
    keys = config.attention_window_size + chunk
    attention = tokens * (d // n) * e + 2 * tokens * config.head_dim * e
    attention += 4 * tokens * heads * keys * _F32
    mlp = 3 * tokens * m * e
    logits = rows * (config.vocab_size // n) * _F32
    return residual + max(recurrent, attention, mlp) + logits


def _sampling_bytes(config: ModelConfig, slots: int) -> int:
    """Top-k/top-p sorts whole float32 rows (gathered across devices): about ten [s, v]
    buffers (logits, noise, sort keys and indices, softmax, cumsum, mask, inverse order)."""
    return 10 * slots * config.vocab_size * _F32


def plan_memory(
    config: ModelConfig,
    *,
    dtype: Any,
    max_slots: int,
    prefill_batch: int,
    prefill_chunk: int,
    tensor_parallel: int = 1,
    device_bytes: int | None = None,
    headroom: float = 0.1,
    advise: bool = True,
) -> MemoryPlan:
    """The per-device memory of an engine with these settings (see the module doc).

    ``device_bytes`` None reads the first local device's limit (:func:`device_memory_limit`).
    A plan that does not fit carries ``advice``: the most slots that fit at this
    ``tensor_parallel``, and the smallest ``tensor_parallel`` that fits ``max_slots``.
    """
    n = tensor_parallel
    check_tensor_parallel(config, n)
    if max_slots < 1 or prefill_batch < 1 or prefill_chunk < 1:
        raise ValueError("max_slots, prefill_batch and prefill_chunk must be >= 1")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    dtype = np.dtype(jnp.dtype(dtype))
    limit = device_memory_limit() if device_bytes is None else int(device_bytes)
    per_slot = _cache_bytes(config, dtype, n) + SLOT_SCALAR_BYTES
    rows = min(prefill_batch, max_slots)
    prefill = rows * _cache_bytes(config, dtype, n)
    prefill += _activation_bytes(config, dtype.itemsize, rows, prefill_chunk, n)
    decode = _activation_bytes(config, dtype.itemsize, max_slots, 1, n)
    decode += _sampling_bytes(config, max_slots)
    plan = MemoryPlan(
        tensor_parallel=n,
        max_slots=max_slots,
        weights_bytes=_weight_bytes(config, dtype.itemsize, n),
        slot_state_bytes=max_slots * per_slot,
        prefill_workspace_bytes=prefill,
        decode_workspace_bytes=decode,
        limit_bytes=limit,
        headroom=headroom,
    )
    if plan.fits or not advise:
        return plan
    settings = dict(dtype=dtype, prefill_batch=prefill_batch, prefill_chunk=prefill_chunk)
    settings.update(device_bytes=limit, headroom=headroom)
    return dataclasses.replace(plan, advice=_advice(config, plan, settings))


def _advice(config: ModelConfig, plan: MemoryPlan, settings: dict[str, Any]) -> str:
    fixes = []
    batch = settings["prefill_batch"] // 2
    while batch >= 1:  # the prefill workspace may be what does not fit: keep every slot
        smaller = plan_memory(
            config,
            max_slots=plan.max_slots,
            tensor_parallel=plan.tensor_parallel,
            advise=False,
            **{**settings, "prefill_batch": batch},
        )
        if smaller.fits:
            fixes.append(
                f"a smaller prefill workspace (prefill_batch={batch} keeps all "
                f"{plan.max_slots} slots: {_gb(smaller.total_bytes)} per device)"
            )
            break
        batch //= 2
    try:
        slots = max_slots_that_fit(config, tensor_parallel=plan.tensor_parallel, **settings)
        fixes.append(
            f"fewer slots (max_slots={slots} fits at tensor_parallel={plan.tensor_parallel})"
        )
    except MemoryPlanError:
        pass
    for n in range(plan.tensor_parallel + 1, 65):
        try:
            check_tensor_parallel(config, n)
        except ValueError:
            continue
        wider = plan_memory(
            config, max_slots=plan.max_slots, tensor_parallel=n, advise=False, **settings
        )
        if wider.fits:
            fixes.append(
                f"a larger tensor_parallel (tensor_parallel={n}: {_gb(wider.total_bytes)} per "
                f"device with {plan.max_slots} slots)"
            )
            break
    if not fixes:
        return "Nothing up to tensor_parallel=64 fits: use devices with more memory."
    return "Fix: " + ", or ".join(fixes) + "."


def max_slots_that_fit(
    config: ModelConfig,
    *,
    dtype: Any,
    prefill_batch: int,
    prefill_chunk: int,
    tensor_parallel: int = 1,
    device_bytes: int | None = None,
    headroom: float = 0.1,
) -> int:
    """The largest ``max_slots`` whose plan fits the device limit less ``headroom`` (what
    ``generation.max_slots: auto`` resolves to). Raises MemoryPlanError if not one slot fits,
    ValueError if no limit is known (CPU: pass ``device_bytes``)."""
    limit = device_memory_limit() if device_bytes is None else int(device_bytes)
    if limit is None:
        raise ValueError("no device memory limit is known (CPU backend): pass device_bytes")

    def plan(slots: int) -> MemoryPlan:
        return plan_memory(
            config,
            dtype=dtype,
            max_slots=slots,
            prefill_batch=prefill_batch,
            prefill_chunk=prefill_chunk,
            tensor_parallel=tensor_parallel,
            device_bytes=limit,
            headroom=headroom,
            advise=False,
        )

    one = plan(1)
    if not one.fits:
        raise MemoryPlanError(
            f"not even one slot fits: {one.summary()}. Fix: a larger tensor_parallel or "
            "devices with more memory."
        )
    low, high = 1, 2
    while plan(high).fits:  # total memory grows with the slot count
        low, high = high, 2 * high
    while high - low > 1:  # plan(low) fits, plan(high) does not
        mid = (low + high) // 2
        low, high = (mid, high) if plan(mid).fits else (low, mid)
    return low
