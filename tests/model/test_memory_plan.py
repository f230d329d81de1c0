"""The per-device memory plan on the released presets' shapes (eval_shape: nothing allocated)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from model.config import ModelConfig
from model.griffin import cache_bytes_per_sequence
from model.memory import (
    SLOT_SCALAR_BYTES,
    MemoryPlanError,
    device_memory_limit,
    max_slots_that_fit,
    plan_memory,
)

GB16 = 16 * 10**9
SERVING = dict(dtype=jnp.bfloat16, prefill_batch=8, prefill_chunk=128)
NINE_B = ModelConfig.from_preset("9b")
TWO_B = ModelConfig.from_preset("2b")


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def test_9b_bfloat16_on_one_16gb_device_is_refused_with_numbers_and_fix() -> None:
    plan = plan_memory(NINE_B, max_slots=16, device_bytes=GB16, **SERVING)
    assert not plan.fits
    assert plan.weights_bytes == pytest.approx(8.580e9 * 2, rel=1e-3)
    with pytest.raises(MemoryPlanError) as caught:
        plan.check()
    message = str(caught.value)
    for figure in (
        f"{gb(plan.total_bytes)} per device at tensor_parallel=1",
        f"{gb(plan.weights_bytes)} weights",
        f"{gb(plan.slot_state_bytes)} slot state (16 slots)",
        "14.40 GB usable (16.00 GB limit less 10% headroom)",
    ):
        assert figure in message
    wider = plan_memory(NINE_B, max_slots=16, tensor_parallel=2, device_bytes=GB16, **SERVING)
    assert f"tensor_parallel=2: {gb(wider.total_bytes)} per device" in message
    assert "fewer slots" not in message  # the weights alone do not fit: slots cannot help


def test_9b_on_two_16gb_devices_fits() -> None:
    one = plan_memory(NINE_B, max_slots=16, device_bytes=GB16, **SERVING)
    plan = plan_memory(NINE_B, max_slots=16, tensor_parallel=2, device_bytes=GB16, **SERVING)
    assert plan.fits and plan.check() is plan and plan.advice == ""
    # Everything but the norms, the K/V projections and the row-parallel biases is halved.
    assert 0.5 < plan.weights_bytes / one.weights_bytes < 0.502
    assert plan.total_bytes <= plan.usable_bytes < plan.limit_bytes


def test_too_many_slots_names_the_slot_count_that_fits() -> None:
    plan = plan_memory(TWO_B, max_slots=4096, device_bytes=GB16, **SERVING)
    fit = max_slots_that_fit(TWO_B, device_bytes=GB16, **SERVING)
    assert not plan.fits and 16 < fit < 4096
    with pytest.raises(MemoryPlanError, match=rf"fewer slots \(max_slots={fit} fits at"):
        plan.check()


@pytest.mark.parametrize(
    ("config", "tensor_parallel", "limit"), [(TWO_B, 1, 8 * 10**9), (NINE_B, 2, GB16)]
)
def test_max_slots_that_fit_is_the_largest_that_fits(config, tensor_parallel, limit) -> None:
    slots = max_slots_that_fit(
        config, tensor_parallel=tensor_parallel, device_bytes=limit, headroom=0.1, **SERVING
    )
    plan = dict(tensor_parallel=tensor_parallel, device_bytes=limit, headroom=0.1, **SERVING)
    at = plan_memory(config, max_slots=slots, **plan)
    over = plan_memory(config, max_slots=slots + 1, **plan)
    assert at.fits and not over.fits
    assert at.total_bytes <= 0.9 * limit < over.total_bytes
    assert slots > 16


def test_not_one_slot_fits() -> None:
    with pytest.raises(MemoryPlanError, match=r"not even one slot fits.*larger tensor_parallel"):
        max_slots_that_fit(NINE_B, device_bytes=GB16, **SERVING)


def test_2b_bfloat16_weights() -> None:
    plan = plan_memory(TWO_B, max_slots=1, device_bytes=GB16, **SERVING)
    assert plan.weights_bytes == pytest.approx(2.683e9 * 2, rel=1e-3)
    float32 = plan_memory(TWO_B, max_slots=1, device_bytes=GB16, **{**SERVING, "dtype": "float32"})
    assert float32.weights_bytes == 2 * plan.weights_bytes


def test_slot_state_splits_the_recurrent_state_not_the_attention_window() -> None:
    one = plan_memory(NINE_B, max_slots=10, device_bytes=GB16, **SERVING)
    two = plan_memory(NINE_B, max_slots=10, tensor_parallel=2, device_bytes=GB16, **SERVING)
    per_sequence = cache_bytes_per_sequence(NINE_B, jnp.bfloat16)
    assert one.slot_state_bytes == 10 * (per_sequence + SLOT_SCALAR_BYTES)
    attention = NINE_B.block_types.count("attention")
    window = attention * NINE_B.attention_window_size * (2 * NINE_B.head_dim * 2 + 4)
    recurrent = per_sequence - window
    assert 0 < recurrent < window  # the ring buffer is most of a 9B cache
    assert two.slot_state_bytes == 10 * (window + recurrent // 2 + SLOT_SCALAR_BYTES)


def test_workspace_grows_with_the_prefill_chunk_and_the_slots() -> None:
    small = plan_memory(TWO_B, max_slots=8, device_bytes=GB16, **SERVING)
    longer = plan_memory(TWO_B, max_slots=8, device_bytes=GB16, **{**SERVING, "prefill_chunk": 512})
    more = plan_memory(TWO_B, max_slots=64, device_bytes=GB16, **SERVING)
    assert longer.prefill_workspace_bytes > small.prefill_workspace_bytes
    assert more.decode_workspace_bytes > small.decode_workspace_bytes
    assert small.total_bytes == (
        small.weights_bytes + small.slot_state_bytes + small.workspace_bytes
    )


def test_device_limit_is_read_where_the_backend_reports_it() -> None:
    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    assert device_memory_limit(Device({"bytes_limit": 123, "bytes_in_use": 7})) == 123
    assert device_memory_limit(Device(None)) is None
    assert device_memory_limit(Device({"bytes_in_use": 7})) is None
    if jax.default_backend() == "cpu":
        assert device_memory_limit() is None
        plan = plan_memory(NINE_B, max_slots=4, **SERVING)
        assert plan.limit_bytes is None and plan.fits  # nothing to check against
        with pytest.raises(ValueError, match="pass device_bytes"):
            max_slots_that_fit(NINE_B, **SERVING)


def test_divisibility_and_headroom_are_checked() -> None:
    with pytest.raises(ValueError, match=r"num_heads \(10\)"):
        plan_memory(TWO_B, max_slots=4, tensor_parallel=4, device_bytes=GB16, **SERVING)
    with pytest.raises(ValueError, match="headroom"):
        plan_memory(TWO_B, max_slots=4, device_bytes=GB16, headroom=1.0, **SERVING)
    plan = plan_memory(TWO_B, max_slots=4, device_bytes=GB16, headroom=0.0, **SERVING)
    assert dataclasses.replace(plan, headroom=0.5).usable_bytes == GB16 // 2


def test_a_prefill_workspace_that_does_not_fit_is_advised_before_fewer_slots() -> None:
    long_prompts = dict(dtype=jnp.bfloat16, prefill_batch=8, prefill_chunk=2048)
    at8 = plan_memory(TWO_B, max_slots=128, device_bytes=10**12, **long_prompts)
    at4 = plan_memory(
        TWO_B, max_slots=128, device_bytes=10**12, **{**long_prompts, "prefill_batch": 4}
    )
    assert at4.total_bytes < at8.total_bytes
    limit = int((at4.total_bytes + at8.total_bytes) / 2 / 0.9)  # 4 fits, 8 does not
    plan = plan_memory(TWO_B, max_slots=128, device_bytes=limit, headroom=0.1, **long_prompts)
    assert not plan.fits
    assert plan.advice.startswith(
        f"Fix: a smaller prefill workspace (prefill_batch=4 keeps all 128 slots: "
        f"{gb(at4.total_bytes)} per device)"
    )
    assert "fewer slots (max_slots=" in plan.advice  # still offered, after it
