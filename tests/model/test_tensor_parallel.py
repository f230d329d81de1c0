"""Tensor parallelism inside one replica: N=2 and N=4 virtual CPU devices against one device.

The engine runs in a subprocess (``_tp_check.py``) because the virtual device count must be set
before JAX is imported; the errors that need no devices are checked here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from model.config import ModelConfig
from model.engine import Engine
from model.sharding import check_tensor_parallel, make_mesh
from testkit.tiny_model import random_params, tiny_config

HELPER = Path(__file__).with_name("_tp_check.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(HELPER)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert result["device_count"] == 4
    return result


@pytest.mark.slow
@pytest.mark.parametrize("n", ["2", "4"])
def test_logits_equal_one_device(report: dict, n: str) -> None:
    one = np.asarray(report["runs"]["1"]["logits"])
    split = np.asarray(report["runs"][n]["logits"])
    assert split.shape == one.shape == (5, tiny_config().vocab_size)
    assert np.max(np.abs(split - one)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("n", ["2", "4"])
def test_tokens_equal_one_device_on_a_mixed_batch(report: dict, n: str) -> None:
    lengths, shapes = report["greedy_prompt_lengths"], report["shapes"]
    assert len(lengths) > shapes["max_slots"] and max(lengths) > 2 * shapes["prefill_chunk"]
    assert min(lengths) < shapes["prefill_chunk"]
    one, split = report["runs"]["1"], report["runs"][n]
    assert split["greedy"] == one["greedy"]
    assert sum(map(len, one["greedy"])) > 3 * len(lengths)  # not vacuous: tokens came out
    assert split["sampled"] == one["sampled"]  # top-k/top-p sort over the vocab-split logits
    assert split["constrained"] == one["constrained"]  # grammar masks over the split logits
    assert all(one["constrained"][1::2])  # the constrained rows drew under their masks


@pytest.mark.slow
def test_weights_and_state_are_split_across_devices(report: dict) -> None:
    params, state = report["runs"]["4"]["params"], report["runs"]["4"]["state"]
    split = {  # name -> (global shape, shard shape) on 4 devices
        "embedding": ([512, 64], [128, 64]),  # by vocab
        "linear_x": ([64, 64], [64, 16]),
        "linear_y": ([64, 64], [64, 16]),
        "linear_out": ([64, 64], [16, 64]),  # by input
        "conv_1d": ([4, 64], [4, 16]),
        "a_gate": ([4, 16, 16], [1, 16, 16]),  # one head's block each
        "proj_q": ([64, 64], [64, 16]),  # one head each
        "proj_final": ([64, 64], [16, 64]),
        "ffw_gate": ([64, 96], [64, 24]),
        "ffw_down": ([96, 64], [24, 64]),
    }
    for name, (shape, shard) in split.items():
        got = params[name]
        assert got["shape"] == shape, name
        assert got["shard_shapes"] == [shard] * 4, name
        assert len(set(got["shard_index"])) == 4, name  # four different pieces
        assert got["devices"] == [0, 1, 2, 3], name
    for name in ("proj_k", "final_norm"):  # the shared K/V head and the norms: whole copies
        assert params[name]["shard_shapes"] == [params[name]["shape"]] * 4
    assert state["rg_lru_state"]["shard_shapes"] == [[4, 16]] * 4
    assert state["conv1d_state"]["shard_shapes"] == [[4, 3, 16]] * 4
    assert state["keys"]["shard_shapes"] == [[4, 8, 16]] * 4  # one K/V head: replicated


@pytest.mark.slow
def test_devices_argument_picks_the_devices(report: dict) -> None:
    placed = report["last_two_devices"]
    assert placed["proj_q"]["devices"] == [2, 3]
    assert placed["proj_q"]["shard_shapes"] == [[64, 32], [64, 32]]
    assert placed["rg_lru_state"]["devices"] == [2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("n", ["1", "2", "4"])
def test_nothing_compiles_after_warmup(report: dict, n: str) -> None:
    run = report["runs"][n]
    # prefill, insert, decode; with tensor parallelism also the two sharded empty caches
    assert run["compiled_after_warmup"] == (3 if n == "1" else 5)
    assert run["compiled_after_batches"] == run["compiled_after_warmup"]


@pytest.mark.slow
def test_decode_moves_no_activations_between_blocks(report: dict) -> None:
    """Megatron-style splits communicate by all-reduce; a layout whose fused projections
    straddle devices shows up as collective-permutes (60 per decode step on this model)."""
    ops = report["runs"]["4"]["decode_collectives"]
    assert ops["collective-permute"] == 0
    assert ops["all-reduce"] >= 2 * len(tiny_config().block_types)


def test_divisibility_error_names_the_number() -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel=4 does not divide num_heads \(10\)"):
        check_tensor_parallel(ModelConfig.from_preset("2b"), 4)
    with pytest.raises(ValueError, match=r"valid tensor_parallel values for this model: 1, 2, 5"):
        check_tensor_parallel(ModelConfig.from_preset("2b"), 4)
    check_tensor_parallel(ModelConfig.from_preset("9b"), 16)
    config = tiny_config()
    with pytest.raises(ValueError, match=r"tensor_parallel=3 does not divide num_heads \(4\)"):
        Engine(config, random_params(config), tensor_parallel=3)
    with pytest.raises(ValueError, match=r"does not divide mlp_expanded_width \(100\)"):
        check_tensor_parallel(tiny_config(num_heads=8, mlp_expanded_width=96 + 4), 8)


def test_too_few_devices_names_how_many_jax_sees() -> None:
    seen = len(jax.devices())
    with pytest.raises(ValueError, match=rf"needs {seen + 1} devices, but JAX sees {seen} "):
        make_mesh(seen + 1)
    # A power of two above the devices seen divides the tiny widths (64, 96, 512) up to 32.
    n = 2 ** max(1, seen.bit_length())
    config = tiny_config(num_heads=n)
    with pytest.raises(
        ValueError, match=rf"tensor_parallel={n} needs {n} devices, but JAX sees {seen}"
    ):
        Engine(config, random_params(config), tensor_parallel=n)
