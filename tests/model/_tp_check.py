"""Runs the tensor-parallel engine on 4 virtual CPU devices and prints what it saw as JSON.

Run by ``test_tensor_parallel.py`` in a fresh interpreter: the device count has to be set
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``) before JAX is first imported, and the
test session has imported it long before. Every engine gets the same tiny model and requests.
"""

from __future__ import annotations

import json
import re
import sys
import time

import jax
import numpy as np

from model.engine import Engine, GenerationRequest
from testkit.tiny_model import random_params, tiny_config

CONFIG = tiny_config()  # 4 heads, widths 64 (lru) and 96 (MLP), vocab 512: all divide by 4
SHAPES = dict(max_slots=4, prefill_batch=2, prefill_chunk=8, decode_steps=3)
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def requests(rng_seed: int, n: int, **overrides) -> list[GenerationRequest]:
    rng = np.random.default_rng(rng_seed)
    out = []
    for _ in range(n):
        values = dict(
            prompt_ids=rng.integers(2, CONFIG.vocab_size, int(rng.integers(1, 30))).tolist(),
            max_new_tokens=int(rng.integers(1, 16)),
            stop_ids=(),
        )
        values.update(overrides)
        out.append(GenerationRequest(**values))
    return out


def shards(array: jax.Array) -> dict:
    return {
        "shape": list(array.shape),
        "spec": str(array.sharding.spec) if hasattr(array.sharding, "spec") else None,
        "shard_shapes": [list(s.data.shape) for s in array.addressable_shards],
        "shard_index": [str(s.index) for s in array.addressable_shards],
        "devices": sorted(s.device.id for s in array.addressable_shards),
    }


def collectives(engine: Engine) -> dict:
    hlo = (
        engine._decode.lower(
            engine.params,
            engine._state,
            np.int32(1),
            np.zeros(engine.engine_config.max_slots, bool),
        )
        .compile()
        .as_text()
    )
    return {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}


def run(n: int, params, prompts, greedy, sampled) -> dict:
    start = time.perf_counter()
    engine = Engine(CONFIG, params, tensor_parallel=n, **SHAPES)
    engine.warmup()
    warm = engine.compiled_shapes()
    logits = engine.next_token_logits(prompts)
    tokens = [r.token_ids for r in engine.generate(greedy)]
    drawn = [r.token_ids for r in engine.generate(sampled)]
    for seed in (40, 41):  # more batches of other sizes and mixes: nothing may compile
        engine.generate(requests(seed, 3 + seed % 7, temperature=0.7))
    out = {
        "logits": np.asarray(logits).tolist(),
        "greedy": tokens,
        "sampled": drawn,
        "compiled_after_warmup": warm,
        "compiled_after_batches": engine.compiled_shapes(),
        "seconds": time.perf_counter() - start,
    }
    if n > 1:
        blocks = engine.params
        rec, att = blocks["blocks.0"], blocks["blocks.1"]
        out["params"] = {
            "embedding": shards(blocks["embedder"]["input_embedding"]),
            "linear_x": shards(rec["recurrent_block"]["linear_x"]["kernel"]),
            "linear_y": shards(rec["recurrent_block"]["linear_y"]["kernel"]),
            "linear_out": shards(rec["recurrent_block"]["linear_out"]["kernel"]),
            "conv_1d": shards(rec["recurrent_block"]["conv_1d"]["w"]),
            "a_gate": shards(rec["recurrent_block"]["rg_lru"]["a_gate"]["w"]),
            "proj_q": shards(att["attention_block"]["proj_q"]["kernel"]),
            "proj_k": shards(att["attention_block"]["proj_k"]["kernel"]),
            "proj_final": shards(att["attention_block"]["proj_final"]["kernel"]),
            "ffw_gate": shards(att["mlp_block"]["ffw_up"]["w_gate"]),
            "ffw_down": shards(att["mlp_block"]["ffw_down"]["kernel"]),
            "final_norm": shards(blocks["final_norm"]["scale"]),
        }
        cache = engine._state.cache
        out["state"] = {
            "rg_lru_state": shards(cache["blocks.0"].rg_lru_state),
            "conv1d_state": shards(cache["blocks.0"].conv1d_state),
            "keys": shards(cache["blocks.1"].keys),
        }
        if n == 4:
            out["decode_collectives"] = collectives(engine)
    return out


def main() -> None:
    params = random_params(CONFIG, seed=21)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(2, CONFIG.vocab_size, n).tolist() for n in (1, 7, 9, 20, 33)]
    greedy = requests(0, 12)  # more than the 4 slots; lengths 1..29 against 8-token chunks
    sampled = requests(1, 6, temperature=0.8, top_k=20, top_p=0.9, seed=5)
    report = {
        "device_count": jax.device_count(),
        "greedy_prompt_lengths": [len(r.prompt_ids) for r in greedy],
        "shapes": SHAPES,
        "runs": {str(n): run(n, params, prompts, greedy, sampled) for n in (1, 2, 4)},
    }
    # devices= picks the replica's devices (no compile needed to see where things went).
    last_two = Engine(CONFIG, params, tensor_parallel=2, devices=jax.devices()[2:4], **SHAPES)
    report["last_two_devices"] = {
        "proj_q": shards(last_two.params["blocks.1"]["attention_block"]["proj_q"]["kernel"]),
        "rg_lru_state": shards(last_two._state.cache["blocks.0"].rg_lru_state),
    }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
