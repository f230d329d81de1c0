"""The same 2B workload through our Engine, the official Sampler and HF generate, on one device.

Useful tokens/s of each in the same run, and their ratios. Target (reported, not enforced): ours
>= 3x the official sampler, warm.

Workload: the 2B preset's shapes with random bfloat16 weights N(0, 0.02), made once on the
device and used by all three; 64 requests of 512 random ids (the prompts gpu_engine draws for 64
slots), 256 new tokens each, greedy, nothing stops early (no stop ids, eos masked nowhere).
Every prompt has the same length, so nothing is padded (HF does not mask left pads in its conv1d,
REFERENCE.md) and the official sampler gets its best case: one static batch.

  ours      model.engine.Engine(max_slots=64, prefill_batch 32, prefill_chunk 512, decode_steps
            16, bfloat16): gpu_engine's settings at 64 slots, so with a shared JAX compilation
            cache (JAX_COMPILATION_CACHE_DIR, as benchmarks/gpu_all.sh sets) its executables load
            instead of compiling. cold = a new Engine + generate; warm = generate again.
  official  recurrentgemma.jax.Sampler on the same bfloat16 params, one batch of 64, called as
            benchmarks/engine/references.py does (prompt_processing_fn, sample_fn with
            end_sampling_at_eos_token=False, tokens_buffer[:, :max_new]). cold = first pass (two
            compiles), warm = the same batch again. On a jax without jax.experimental.shard_map
            (which recurrentgemma 1.0.1 imports) that name is aliased to jax.shard_map first; the
            sharded scan that uses it is never called here.
  hf        transformers RecurrentGemmaForCausalLM in torch bfloat16 on CUDA (CPU if there is
            none), attention_window_size = W + 1 (what matches the official model), the same
            weights, generate(max_new_tokens = min_new_tokens = 256, do_sample=False) with
            eos_token_id None, one batch of 64. cold = first pass, warm = second. It runs in a
            child process (torch and JAX never share a process or a GPU memory pool): the parent
            writes the weights in HF layout to a temporary safetensors file, the child loads them.
            The parent's JAX takes at most XLA_PYTHON_CLIENT_MEM_FRACTION (default here 0.5) of
            the GPU, leaving the rest to torch.

Greedy tokens are compared between the three (informational: bfloat16 rounding differs between
implementations, and random weights give flat logits, so long continuations can part ways).
The JSON is rewritten after every implementation, so a run killed by a timeout keeps what it
measured; a failing implementation is an error row and the others still run.

  python -m benchmarks.gpu_reference                  # on a GPU: the 2B workload
  python -m benchmarks.gpu_reference --cpu-small      # anywhere: toy model, for CI (or --small)
"""

from __future__ import annotations

import os

# Before JAX starts: leave GPU memory for the HF child (JAX preallocates 75% by default).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import argparse
import functools
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/gpu_reference.py): import from the repo
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import gpu_engine, harness
from benchmarks.engine import compare, references
from benchmarks.engine.workload import PAD_ID
from model import ModelConfig
from model.engine import Engine, GenerationRequest

TAG = "gpu-reference"
PARTS = ("ours", "official", "hf")
TARGET_OVER_OFFICIAL = 3.0
FULL: dict[str, Any] = dict(
    requests=64,
    prompt_len=512,
    new_tokens=256,
    prefill_batch=32,
    prefill_chunk=512,
    decode_steps=16,
)
# --cpu-small: the engine settings of gpu_engine's --cpu-small (executables shared via the cache).
SMALL: dict[str, Any] = dict(
    requests=4, prompt_len=32, new_tokens=8, prefill_batch=4, prefill_chunk=32, decode_steps=4
)


# The official package on a newer jax ------------------------------------------------------------
_ALIASED: list[str] = []  # what import_official stood in for, in this process


def import_official() -> list[str]:
    """Imports recurrentgemma.jax; returns the names aliased so that it imports on this jax.

    recurrentgemma 1.0.1 imports ``jax.experimental.shard_map`` and ``jax.experimental.mesh_utils``
    at import time but calls them only for sharded scans and checkpoint loading, which this
    benchmark never does; where a newer jax lacks them, stand-ins take their place.
    """
    import jax.experimental

    aliased = _ALIASED

    def unavailable(name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(f"{name} is not in this jax (stand-in for recurrentgemma)")

        return fail

    stand_ins = {
        "shard_map": {"shard_map": getattr(jax, "shard_map", None) or unavailable("shard_map")},
        "mesh_utils": {"create_device_mesh": unavailable("mesh_utils.create_device_mesh")},
    }
    for name, attributes in stand_ins.items():
        full = f"jax.experimental.{name}"
        try:
            importlib.import_module(full)
        except ImportError:
            module = types.ModuleType(full)
            for attribute, value in attributes.items():
                setattr(module, attribute, value)
            sys.modules[full] = module
            setattr(jax.experimental, name, module)
            aliased.append(f"{full}: {', '.join(attributes)}")
    import recurrentgemma.jax  # noqa: F401

    return list(aliased)


def _count_executables(count: Any) -> Any:
    """``count()`` made safe: executables are counted through a private jax API (``_cache_size``
    of a jitted function), which may be gone from a newer jax; then the count is None."""

    def safe() -> int | None:
        try:
            return int(count())
        except Exception:
            return None

    return safe


# Ours ---------------------------------------------------------------------------------------------
def run_ours(
    config: ModelConfig,
    params: Any,
    prompts: list[list[int]],
    max_new: list[int],
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[list[int]]]:
    holder: dict[str, Engine] = {}
    options = gpu_engine.engine_options(args, len(prompts))
    requests = [GenerationRequest(p, m, stop_ids=()) for p, m in zip(prompts, max_new, strict=True)]

    def one_pass(prompts: list[list[int]], max_new: list[int], batch: int) -> references.Pass:
        start = time.perf_counter()
        if "engine" not in holder:
            holder["engine"] = Engine(config, params, **options)
        results = holder["engine"].generate(requests)
        tokens = [r.token_ids for r in results]
        return time.perf_counter() - start, tokens, sum(len(t) for t in tokens)

    row, tokens = references.cold_and_warm(
        "ours Engine",
        one_pass,
        prompts,
        max_new,
        len(prompts),
        compiled_shapes=_count_executables(lambda: holder["engine"].compiled_shapes()),
        engine={k: (str(v) if k == "dtype" else v) for k, v in options.items()},
    )
    if any(len(t) != m for t, m in zip(tokens, max_new, strict=True)):
        row["error"] = "some request did not generate exactly max_new_tokens"
    return row, tokens


def run_official(
    config: ModelConfig, params: Any, prompts: list[list[int]], max_new: list[int]
) -> tuple[dict[str, Any], list[list[int]]]:
    """benchmarks/engine/references.py's official run, one batch of all the requests."""
    aliased = import_official()
    sampler = references.official_sampler(config, params)
    row, tokens = references.cold_and_warm(
        "official Sampler",
        functools.partial(references.official_pass, sampler),
        prompts,
        max_new,
        len(prompts),
        compiled_shapes=_count_executables(
            lambda: (
                sampler._compiled_prompt_processing_fn._cache_size()
                + sampler._compiled_sample_fn._cache_size()
            )
        ),
        called="Sampler.prompt_processing_fn(params, ids, None, lengths, steps, False, False); "
        "Sampler.sample_fn(params, state, False); tokens_buffer[:, :max_new]",
        aliased_for_this_jax=aliased,
        params_dtype=str(jax.tree.leaves(params)[0].dtype),
    )
    return row, tokens


# HF, in a child process ---------------------------------------------------------------------------
def run_hf(
    config: ModelConfig,
    params: Any,
    prompts: list[list[int]],
    max_new: list[int],
    args: argparse.Namespace,
    deadline: float | None,
) -> tuple[dict[str, Any], list[list[int]]]:
    """Writes the weights (HF names and layout) and the requests to a temporary directory, runs
    ``python -m benchmarks.gpu_reference --hf-child DIR`` and reads its last stdout line."""
    import ml_dtypes
    from safetensors.numpy import save_file

    directory = Path(tempfile.mkdtemp(prefix="rg-batch-hf-"))
    try:
        state = hf_state_dict(params)  # host arrays, in the params' dtype
        bf16 = sorted(k for k, v in state.items() if v.dtype == ml_dtypes.bfloat16)
        arrays = {k: (v.view(np.int16) if k in bf16 else v) for k, v in state.items()}
        save_file(arrays, str(directory / "weights.safetensors"), {"bfloat16": json.dumps(bf16)})
        del state, arrays
        request = dict(
            config=config.to_dict(),
            prompts=prompts,
            max_new=max_new,
            batch=len(prompts),
            dtype=args.dtype,
            torch_threads=args.torch_threads,
        )
        (directory / "request.json").write_text(json.dumps(request))
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(harness.REPO_ROOT) + (os.pathsep + path if path else "")
        env["JAX_PLATFORMS"] = "cpu"  # the child never touches the GPU through JAX
        timeout = None if deadline is None else max(10.0, deadline - time.perf_counter())
        cmd = [sys.executable, "-m", "benchmarks.gpu_reference", "--hf-child", str(directory)]
        try:
            # stderr (the child's progress and any traceback) goes straight to our log.
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"HF child killed after {timeout:.0f} s (the part's budget)"
            ) from exc
        if proc.returncode != 0:
            raise RuntimeError(f"HF child exited with {proc.returncode} (traceback above)")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        return out["row"], out["tokens"]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def hf_state_dict(params: Any) -> dict[str, np.ndarray]:
    """model.hf.params_to_hf_state_dict, with the layout changes (transposes) made on the device
    before the copy to the host: 2.7e9 bf16 values transposed by numpy take 10-20 s. Falls back
    to the public function if model.hf's internals have moved."""
    from model import hf

    try:
        out = {}
        for spec in hf._specs(hf._block_kinds(params)):
            value = hf._get(params, spec.path)
            if spec.slot is not None:
                value = value[spec.slot]
            out[spec.hf_name] = np.asarray(hf._to_hf(jnp.asarray(value), spec.layout))
        return out
    except AttributeError:
        return hf.params_to_hf_state_dict(params)


def hf_child(directory: Path) -> None:
    """The HF side: loads the weights written by run_hf, runs generate cold and warm, prints
    {"row": ..., "tokens": ...} as its last stdout line (progress goes to stderr)."""
    import torch
    import transformers
    from safetensors import safe_open
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    from model import hf

    def log(message: str) -> None:
        print(f"[{TAG} hf] {message}", file=sys.stderr, flush=True)

    request = json.loads((directory / "request.json").read_text())
    config = ModelConfig.from_dict(request["config"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, request["dtype"])
    if device.type == "cpu":
        torch.set_num_threads(request["torch_threads"])
    log(f"torch {torch.__version__} on {device}, building the model in {dtype} ...")
    start = time.perf_counter()
    hf_config = RecurrentGemmaConfig(**hf.model_config_to_hf_config(config))
    with torch.device(device):
        model = RecurrentGemmaForCausalLM(hf_config)
    model = model.to(dtype).eval()
    with safe_open(str(directory / "weights.safetensors"), framework="np") as f:
        bf16 = set(json.loads(f.metadata()["bfloat16"]))
        state = {}
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            tensor = torch.from_numpy(f.get_tensor(name))
            state[name] = tensor.view(torch.bfloat16) if name in bf16 else tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    del state
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF weights: missing {missing}, unexpected {unexpected}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("HF lm_head is not tied to the embeddings")
    model.generation_config.eos_token_id = None  # nothing may end a row early
    model.generation_config.pad_token_id = PAD_ID
    load_s = time.perf_counter() - start
    log(f"model ready in {load_s:.1f} s; generate cold then warm ...")
    row, tokens = references.cold_and_warm(
        "HF generate",
        functools.partial(hf_pass, model, device),
        request["prompts"],
        request["max_new"],
        request["batch"],
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch_dtype=str(dtype),
        attention_window_size=hf_config.attention_window_size,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
        load_s=load_s,
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
    )
    log(f"cold {row['cold_s']:.1f} s, warm {row['warm_s']:.1f} s")
    print(json.dumps(dict(row=row, tokens=tokens)), flush=True)


def hf_pass(
    model: Any, device: Any, prompts: list[list[int]], max_new: list[int], batch: int
) -> references.Pass:
    import torch

    def generate(ids: np.ndarray, mask: np.ndarray, _: list[int], steps: int) -> np.ndarray:
        with torch.no_grad():
            generated = model.generate(
                input_ids=torch.from_numpy(ids).long().to(device),
                attention_mask=torch.from_numpy(mask).long().to(device),
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
            )
        generated = generated.cpu().numpy()  # waits for the device
        if generated.shape[1] != ids.shape[1] + steps:
            raise RuntimeError(f"HF generated {generated.shape[1] - ids.shape[1]} of {steps}")
        return generated[:, ids.shape[1] :]

    return references._batched_pass(prompts, max_new, batch, generate)


# Results ------------------------------------------------------------------------------------------
def _ok(results: dict[str, Any], key: str) -> bool:
    return isinstance(results.get(key), dict) and "error" not in results[key]


def ratios(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in ("official", "hf"):
        if _ok(results, "ours") and _ok(results, key):
            ours, ref = results["ours"], results[key]
            out[f"ours warm / {key} warm"] = ours["warm_tokens_per_s"] / ref["warm_tokens_per_s"]
            out[f"ours cold / {key} cold"] = ours["cold_tokens_per_s"] / ref["cold_tokens_per_s"]
    return out


def token_checks(tokens: dict[str, list[list[int]]]) -> dict[str, Any]:
    checks = {}
    for a, b in (("ours", "official"), ("ours", "hf"), ("official", "hf")):
        if a in tokens and b in tokens:
            checks[f"{a} vs {b}"] = compare.compare(tokens[a], tokens[b], range(len(tokens[a])))
    return checks


def report_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for key in PARTS:
        row = results.get(key)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"{key:9s} error: {row['error'].splitlines()[0][:200]}")
        else:
            lines.append(
                f"{key:9s} warm {row['warm_tokens_per_s']:10.1f} tok/s ({row['warm_s']:.2f} s), "
                f"cold {row['cold_tokens_per_s']:10.1f} tok/s ({row['cold_s']:.2f} s)"
            )
    lines += [f"{name}: {value:.2f}" for name, value in results["ratios"].items()]
    t = results["target"]
    lines.append(f"target ours/official >= {t['min_ratio']}: {t['ratio']} -> met {t['met']}")
    return lines


# Main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument("--preset", default="2b", choices=ModelConfig.presets())
    for name, value in FULL.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"default {value} (--cpu-small: {SMALL[name]})",
        )
    parser.add_argument("--dtype", default="bfloat16", help="of ours, official and HF alike")
    harness.add_subset_arg(parser, "--parts", PARTS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds this run may take: the HF child is killed when they run out",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch threads on CPU (default: usable)"
    )
    parser.add_argument("--hf-child", type=Path, default=None, help=argparse.SUPPRESS)
    harness.add_output_args(parser, "toy model and sizes, to run on CPU", "--cpu-small", "--small")
    args = parser.parse_args(argv)
    if args.hf_child is None:
        for name, value in (SMALL if args.cpu_small else FULL).items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        parts = harness.parse_subset(parser, "--parts", args.parts, PARTS)
        args.parts = [p for p in PARTS if p in parts]
        if args.torch_threads is None:
            # Toy sizes gain nothing from threads (and spin on a busy machine).
            args.torch_threads = 1 if args.cpu_small else harness.usable_cpus()
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.hf_child is not None:
        hf_child(args.hf_child)
        return None
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    start = time.perf_counter()
    deadline = None if args.budget_s is None else start + args.budget_s
    log = harness.Log(TAG, clock=True)
    config = gpu_engine.bench_config(args.preset, args.cpu_small)
    dtype = jnp.dtype(args.dtype)
    log(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    params = gpu_engine.random_device_params(config, dtype, args.seed)
    prompts = gpu_engine.make_prompts(config, args.requests, args.prompt_len, seed=args.requests)
    max_new = [args.new_tokens] * args.requests
    results: dict[str, Any] = dict(
        part="reference",
        preset=args.preset,
        small=args.cpu_small,
        environment=harness.environment(),
        workload=dict(
            requests=args.requests,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            useful_tokens=sum(max_new),
            dtype=args.dtype,
            config=config.to_dict(),
            seed=args.seed,
            weights="N(0, 0.02) on the device, shared by all three",
        ),
        parts=args.parts,
        complete=False,
    )
    tokens: dict[str, list[list[int]]] = {}

    def save() -> None:
        results["ratios"] = ratios(results)
        ratio = results["ratios"].get("ours warm / official warm")
        results["target"] = dict(
            min_ratio=TARGET_OVER_OFFICIAL,
            ratio=ratio,
            met=None if ratio is None else ratio >= TARGET_OVER_OFFICIAL,
        )
        results["token_checks"] = token_checks(tokens)
        results["wall_s"] = time.perf_counter() - start
        harness.finish(results, None, args.json, TAG)

    runs = {
        "ours": lambda: run_ours(config, params, prompts, max_new, args),
        "official": lambda: run_official(config, params, prompts, max_new),
        "hf": lambda: run_hf(config, params, prompts, max_new, args, deadline),
    }
    for key in args.parts:
        log(f"{key}: cold then warm ...")
        try:
            results[key], tokens[key] = runs[key]()
        except Exception as exc:  # reported; the others still run
            results[key] = dict(label=key, error=harness.error_text(exc))
        if "error" not in results[key]:
            row = results[key]
            log(f"{key}: warm {row['warm_tokens_per_s']:.1f} tok/s, cold {row['cold_s']:.1f} s")
        save()
    results["complete"] = True
    failed = [key for key in args.parts if "error" in results[key]]
    if failed:
        results["error"] = f"failed: {', '.join(failed)}"
    save()
    for line in report_lines(results):
        log(line)
    return results


if __name__ == "__main__":
    main()
