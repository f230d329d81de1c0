"""The reference implementations on the workload: the official Sampler and HF generate.

Both run the requests in batches of ``ref_batch`` in the given order, each batch left-padded and
run for its largest max_new_tokens; only the requested tokens count (useful tokens/s).

official  recurrentgemma.jax.Sampler (1.0.1). ``Sampler.__call__`` takes strings and a
          SentencePiece vocab, so it is bypassed: we build the left-padded id array ourselves and
          call exactly what ``__call__`` calls after tokenizing, ``sampler.prompt_processing_fn(
          params, tokens, None, input_lengths, steps, False, False)`` then ``sampler.sample_fn(
          params, state, False)`` (end_sampling_at_eos_token=False: eos cannot end a row early,
          and no logit is masked), and read ``state.tokens_buffer[:, :max_new_tokens]`` (not
          ``__call__``'s ``tokens[pad_length:]``, which drops tokens of shorter prompts when
          echo=False). The vocab is a stub giving pad 0, eos 1, bos 2. Each new (batch, padded
          prompt length, steps) shape compiles: cold = first pass over the batches (compiles
          included), warm = the same batches again.
hf        transformers RecurrentGemmaForCausalLM (torch, float32, ``torch.set_num_threads``), same
          weights via model.hf.params_to_hf_state_dict, left padded with an attention_mask,
          ``generate(max_new_tokens=m, min_new_tokens=m, do_sample=False)`` with
          ``generation_config.eos_token_id = None`` (so no eos stop and no eos masking). cold =
          first pass, warm = second pass (torch compiles nothing; the difference is allocator and
          first-touch effects).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.engine.workload import BOS_ID, EOS_ID, PAD_ID, batches, left_pad
from model import ModelConfig
from tests.oracle import official_griffin_config

# A pass over the batches: (seconds, greedy tokens per request, token slots computed).
Pass = tuple[float, list[list[int]], int]


def cold_and_warm(
    label: str,
    one_pass: Callable[[list[list[int]], list[int], int], Pass],
    prompts: list[list[int]],
    max_new: list[int],
    batch: int,
    *,
    compiled_shapes: Callable[[], int] | None = None,
    **extra: Any,
) -> tuple[dict[str, Any], list[list[int]]]:
    """(result row, cold pass's tokens) of a reference run twice over the same fixed batches:
    cold (first pass, compilation included) then warm; ``compiled_shapes`` counts executables."""
    cold_s, tokens, computed = one_pass(prompts, max_new, batch)
    shapes = {}
    if compiled_shapes is not None:
        shapes["compiled_shapes_after_cold"] = compiled_shapes()
    warm_s, warm_tokens, _ = one_pass(prompts, max_new, batch)
    if compiled_shapes is not None:
        shapes["compiled_shapes_after_warm"] = compiled_shapes()
    useful = sum(max_new)
    row = dict(
        label=label,
        batch=batch,
        batches=len(batches(len(prompts), batch)),
        useful_tokens=useful,
        computed_token_slots=computed,
        cold_s=cold_s,
        warm_s=warm_s,
        cold_tokens_per_s=useful / cold_s,
        warm_tokens_per_s=useful / warm_s,
        warm_tokens_equal_cold=warm_tokens == tokens,
        **shapes,
        **extra,
    )
    return row, tokens


def _batched_pass(
    prompts: list[list[int]],
    max_new: list[int],
    batch: int,
    generate: Callable[[np.ndarray, np.ndarray, list[int], int], np.ndarray],
) -> Pass:
    """Runs ``generate(ids, mask, lengths, steps) -> new tokens [b, >= steps]`` per left-padded
    batch, ``steps`` its largest max_new_tokens, and keeps each request's max_new_tokens."""
    out: list[list[int]] = []
    computed = 0
    start = time.perf_counter()
    for rows in batches(len(prompts), batch):
        ids, mask = left_pad([prompts[i] for i in rows])
        steps = max(max_new[i] for i in rows)
        new = generate(ids, mask, [len(prompts[i]) for i in rows], steps)
        out += [new[row, : max_new[i]].tolist() for row, i in enumerate(rows)]
        computed += len(rows) * steps
    return time.perf_counter() - start, out, computed


# Official sampler ---------------------------------------------------------------------------------
class _StubVocab:
    """What Sampler touches on the path we call: pad and eos ids (eos unused: no eos stop)."""

    def pad_id(self) -> int:
        return PAD_ID

    def eos_id(self) -> int:
        return EOS_ID

    def bos_id(self) -> int:
        return BOS_ID


def official_sampler(config: ModelConfig, params: Any) -> Any:
    import recurrentgemma.jax as official

    griffin_config = official_griffin_config(config)
    model = official.Griffin(griffin_config, gradient_checkpointing=False)
    return official.Sampler(model=model, vocab=_StubVocab(), params=jax.device_put(params))


def official_pass(sampler: Any, prompts: list[list[int]], max_new: list[int], batch: int) -> Pass:
    def generate(ids: np.ndarray, _: np.ndarray, lengths: list[int], steps: int) -> np.ndarray:
        state = sampler.prompt_processing_fn(
            sampler.params,
            jnp.asarray(ids),
            None,
            jnp.asarray(lengths, jnp.int32),
            steps,
            False,
            False,
        )
        if steps > 1:
            state = sampler.sample_fn(sampler.params, state, False)
        return np.asarray(state.tokens_buffer)

    return _batched_pass(prompts, max_new, batch, generate)


def run_official(
    config: ModelConfig, params: Any, prompts: list[list[int]], max_new: list[int], batch: int
) -> tuple[dict[str, Any], list[list[int]]]:
    sampler = official_sampler(config, params)

    def compiled_shapes() -> int:
        fns = (sampler._compiled_prompt_processing_fn, sampler._compiled_sample_fn)
        return int(sum(f._cache_size() for f in fns))

    return cold_and_warm(
        "official Sampler",
        functools.partial(official_pass, sampler),
        prompts,
        max_new,
        batch,
        compiled_shapes=compiled_shapes,
        called="Sampler.prompt_processing_fn(params, ids, None, lengths, steps, False, False); "
        "Sampler.sample_fn(params, state, False); tokens_buffer[:, :max_new]",
    )


# Hugging Face -------------------------------------------------------------------------------------
def hf_model(config: ModelConfig, params: Any, threads: int) -> Any:
    import torch
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    from model import hf

    torch.set_num_threads(threads)
    model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**hf.model_config_to_hf_config(config)))
    model = model.float().eval()
    state = {k: torch.from_numpy(v) for k, v in hf.params_to_hf_state_dict(params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF weights: missing {missing}, unexpected {unexpected}")
    if not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
        raise RuntimeError("HF lm_head is not tied to the embeddings")
    model.generation_config.eos_token_id = None  # nothing may end a row early
    model.generation_config.pad_token_id = PAD_ID
    return model


def hf_pass(model: Any, prompts: list[list[int]], max_new: list[int], batch: int) -> Pass:
    import torch

    def generate(ids: np.ndarray, mask: np.ndarray, _: list[int], steps: int) -> np.ndarray:
        with torch.no_grad():
            generated = model.generate(
                input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long(),
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
            )
        if generated.shape[1] != ids.shape[1] + steps:
            raise RuntimeError(f"HF generated {generated.shape[1] - ids.shape[1]} of {steps}")
        return generated[:, ids.shape[1] :].numpy()

    return _batched_pass(prompts, max_new, batch, generate)


def run_hf(
    config: ModelConfig,
    params: Any,
    prompts: list[list[int]],
    max_new: list[int],
    batch: int,
    threads: int,
) -> tuple[dict[str, Any], list[list[int]]]:
    import torch
    import transformers

    model = hf_model(config, params, threads)
    return cold_and_warm(
        "HF generate",
        functools.partial(hf_pass, model),
        prompts,
        max_new,
        batch,
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
    )
