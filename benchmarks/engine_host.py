"""The engine's host work and its sampling step, against a baseline engine in the same run.

Parts (``--parts``):

  engine    the tiny test model (testkit.tiny_model, vocab 512), greedy, no stop ids, requests
            = 2 x slots with prompts of 4..32 tokens, at each of ``--slots`` (128, 256) and
            ``--new-tokens`` (1, 128), engine defaults otherwise (prefill_batch 8, chunk 128,
            decode_steps 16). Each engine is warmed up, then runs the requests: once
            instrumented (every jitted call waited for and timed: the device seconds D, and the
            host's work, then serial: H = the engine thread's CPU seconds outside the jitted
            calls, which a loaded machine does not inflate as it does wall time; also wall - D)
            and plain (wall W, the best of PLAIN_RUNS runs, the tokens/s). Reported: host us
            per request (H / requests) and per decode step (H / decode steps; and the host work
            decoding adds per step, (H(n new) - H(1 new)) / steps, the requests being the same),
            the share of the plain run's wall time the device waits on the host (1 - D / W, the
            device work being the same calls), tok/s.
  sampling  ``model.sampling.sample`` jitted on float32 logits [128, 256000] drawn from a
            standard normal (a flat distribution: top_p 0.9 then needs most of the vocabulary,
            the exact fallback's worst case), for greedy, temperature 0.7, temperature 0.7 with
            top_p 0.9 and with top_k 50: milliseconds per call (median of ``--repeats`` after
            one untimed call) and each as a multiple of the temperature-only call.

The baseline is the engine and sampler of commit ``--baseline-ref`` (default 7da69c4, before
sampling without sorts and the scheduler/runner split): ``git show REF:model/engine.py`` and
``REF:model/sampling.py`` into a temporary package, the rest of ``model`` shared. Every figure
comes as ours / baseline. ``--no-baseline`` runs ours only (a clone without that history).

Run:
  .venv/bin/python -m benchmarks.engine_host --json out/bench/engine_host.json
  .venv/bin/python -m benchmarks.engine_host --small      # smoke run: tiny sizes, [8, 4096]
  .venv/bin/python -m benchmarks.engine_host --parts sampling --repeats 3
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/...py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from model import engine as ours_engine
from model import sampling as ours_sampling
from testkit.tiny_model import random_params, tiny_config

PARTS = ("engine", "sampling")
BASELINE_REF = "7da69c4"
PLAIN_RUNS = 3  # the plain run's wall time (tok/s, device waits) is the best of these
FULL = dict(slots=(128, 256), new_tokens=(1, 128), sample_rows=128, vocab=256000, repeats=2)
SMALL = dict(slots=(4, 8), new_tokens=(1, 8), sample_rows=8, vocab=4096, repeats=1)
SETTINGS = {
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0),
    "temperature 0.7": dict(temperature=0.7, top_k=0, top_p=1.0),
    "top_p 0.9": dict(temperature=0.7, top_k=0, top_p=0.9),
    "top_k 50": dict(temperature=0.7, top_k=50, top_p=1.0),
}


def load_baseline(ref: str, workdir: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """(engine, sampling) modules of commit ``ref``, its engine importing its own sampling."""
    package = workdir / "baseline_model"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("sampling", "engine"):
        source = subprocess.run(
            ["git", "show", f"{ref}:model/{name}.py"],
            cwd=harness.REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        source = source.replace("from model.sampling import", "from baseline_model.sampling import")
        (package / f"{name}.py").write_text(source)
    modules = []
    for name in ("sampling", "engine"):
        spec = importlib.util.spec_from_file_location(
            f"baseline_model.{name}", package / f"{name}.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[1], modules[0]


# The engine -----------------------------------------------------------------------------------------
class _Timed:
    """One jitted function, each call waited for and timed: wall seconds, and the CPU seconds
    of the calling thread (dispatch) inside it."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.seconds, self.cpu_seconds = fn, 0.0, 0.0

    def __call__(self, *args: Any) -> Any:
        cpu = time.thread_time()
        out, seconds = harness.time_call(self.fn, *args)
        self.cpu_seconds += time.thread_time() - cpu
        self.seconds += seconds
        return out


def make_requests(module: types.ModuleType, slots: int, new_tokens: int, vocab: int) -> list:
    rs = np.random.RandomState(slots)  # the same prompts whatever new_tokens
    lengths = rs.randint(4, 33, size=2 * slots)
    return [
        module.GenerationRequest(rs.randint(2, vocab, n).tolist(), new_tokens, stop_ids=())
        for n in lengths
    ]


def run_engine(module: types.ModuleType, params: Any, slots: int, new_tokens: int) -> dict:
    """Warm-up, an instrumented run and a plain run of one engine; the figures and tokens."""
    config = tiny_config()
    engine = module.Engine(config, params, max_slots=slots)
    engine.warmup()
    requests = make_requests(module, slots, new_tokens, config.vocab_size)
    names = ("_prefill", "_insert", "_decode")
    timers = {name: _Timed(getattr(engine, name)) for name in names}
    for name, timer in timers.items():
        setattr(engine, name, timer)
    engine.stats = type(engine.stats)()
    start, cpu = time.perf_counter(), time.thread_time()
    instrumented = engine.generate(requests)
    wall_i, cpu = time.perf_counter() - start, time.thread_time() - cpu
    for name, timer in timers.items():
        setattr(engine, name, timer.fn)
    steps = engine.stats.decode_steps
    wall = math.inf
    for _ in range(PLAIN_RUNS):  # best of: one short run's wall time is mostly the machine's noise
        start = time.perf_counter()
        plain = engine.generate(requests)
        wall = min(wall, time.perf_counter() - start)
    device = sum(t.seconds for t in timers.values())
    host = wall_i - device
    host_cpu = cpu - sum(t.cpu_seconds for t in timers.values())
    generated = sum(r.output_tokens for r in plain)
    return dict(
        requests=len(requests),
        generated_tokens=generated,
        decode_steps=steps,
        device_s=device,
        host_s=host,
        host_cpu_s=host_cpu,
        wall_s=wall,
        host_us_per_request=host_cpu / len(requests) * 1e6,
        host_us_per_decode_step=host_cpu / steps * 1e6 if steps else None,
        host_wall_us_per_decode_step=host / steps * 1e6 if steps else None,
        device_waits_share=max(0.0, 1.0 - device / wall),
        tokens_per_s=generated / wall,
        compiled_after=engine.compiled_shapes(),
        tokens=[r.token_ids for r in plain],
        instrumented_equal_plain=[r.token_ids for r in instrumented]
        == [r.token_ids for r in plain],
    )


def engine_part(args: Any, baseline: types.ModuleType | None, log: harness.Log) -> list[dict]:
    params = random_params(tiny_config(), seed=0)
    rows = []
    for slots in args.sizes["slots"]:
        for new_tokens in args.sizes["new_tokens"]:
            row: dict[str, Any] = dict(slots=slots, new_tokens=new_tokens)
            for label, module in (("ours", ours_engine), ("baseline", baseline)):
                if module is None:
                    continue
                log(f"engine {label}: {slots} slots, {new_tokens} new tokens ...")
                row[label] = run_engine(module, params, slots, new_tokens)
            if "baseline" in row:
                ours, base = row["ours"], row["baseline"]
                row["tokens_equal"] = ours["tokens"] == base["tokens"]
                row["ratios"] = {
                    "tokens_per_s ours/baseline": ours["tokens_per_s"] / base["tokens_per_s"],
                    "host_us_per_request ours/baseline": ours["host_us_per_request"]
                    / base["host_us_per_request"],
                }
                if ours["host_us_per_decode_step"] and base["host_us_per_decode_step"]:
                    row["ratios"]["host_us_per_decode_step ours/baseline"] = (
                        ours["host_us_per_decode_step"] / base["host_us_per_decode_step"]
                    )
            for label in ("ours", "baseline"):
                if label in row:
                    del row[label]["tokens"]
            rows.append(row)
    _marginal(rows)
    return rows


def _marginal(rows: list[dict]) -> None:
    """Adds the host work decoding adds per step: (H(n new) - H(1 new)) / steps, from the rows
    with the same slots (the same requests and prompts) and 1 new token, where all the host
    work is per request (admission, first token, result)."""
    for row in rows:
        one = next((r for r in rows if r["slots"] == row["slots"] and r["new_tokens"] == 1), None)
        if one is None or row["new_tokens"] == 1:
            continue
        for label in ("ours", "baseline"):
            if label in row:
                run, base = row[label], one[label]
                extra = run["host_cpu_s"] - base["host_cpu_s"]
                run["decode_host_us_per_step"] = extra / run["decode_steps"] * 1e6


# Sampling -------------------------------------------------------------------------------------------
def sampling_part(args: Any, baseline: types.ModuleType | None, log: harness.Log) -> dict:
    rows, vocab = args.sizes["sample_rows"], args.sizes["vocab"]
    logits = jax.random.normal(jax.random.key(0), (rows, vocab), jnp.float32)
    index = jnp.zeros((rows,), jnp.int32)
    out: dict[str, Any] = dict(shape=[rows, vocab], repeats=args.repeats)
    for label, module in (("ours", ours_sampling), ("baseline", baseline)):
        if module is None:
            continue
        fn = jax.jit(module.sample)
        figures: dict[str, float] = {}
        for name, setting in SETTINGS.items():
            params = module.SamplingParams(
                jnp.full((rows,), setting["temperature"], jnp.float32),
                jnp.full((rows,), setting["top_k"], jnp.int32),
                jnp.full((rows,), setting["top_p"], jnp.float32),
                jnp.arange(rows, dtype=jnp.int32),
            )
            times = harness.repeat_timings(fn, logits, params, index, repeats=args.repeats)
            figures[name] = statistics.median(times) * 1e3
            log(f"sampling {label} {name}: {figures[name]:.0f} ms")
        temperature = figures["temperature 0.7"]
        out[label] = dict(
            ms=figures, over_temperature={k: v / temperature for k, v in figures.items()}
        )
    if "baseline" in out:
        out["ours/baseline"] = {
            k: v / out["baseline"]["ms"][k] for k, v in out["ours"]["ms"].items()
        }
    return out


# Report ---------------------------------------------------------------------------------------------
def report(results: dict[str, Any]) -> str:
    lines = ["", "engine host work (tiny model, greedy)"]
    for row in results.get("engine", []):
        for label in ("ours", "baseline"):
            if label not in row:
                continue
            r = row[label]
            per_step = r["host_us_per_decode_step"]
            step_text = "     n/a" if per_step is None else f"{per_step:8.1f}"
            if "decode_host_us_per_step" in r:
                step_text += f" ({r['decode_host_us_per_step']:.1f} for decoding)"
            lines.append(
                f"  {label:8s} {row['slots']:4d} slots x {row['new_tokens']:3d} new: host "
                f"{r['host_us_per_request']:8.1f} us/request {step_text} us/decode step, device "
                f"waits {r['device_waits_share']:5.1%}, {r['tokens_per_s']:9.1f} tok/s"
            )
        for name, value in row.get("ratios", {}).items():
            lines.append(f"    {name}: {value:.2f}")
        if "tokens_equal" in row:
            lines.append(f"    greedy tokens equal: {row['tokens_equal']}")
    sampling = results.get("sampling")
    if sampling:
        lines.append(f"sampling step, logits {sampling['shape']}")
        for label in ("ours", "baseline"):
            if label in sampling:
                cells = ", ".join(
                    f"{k} {v:.0f} ms ({sampling[label]['over_temperature'][k]:.2f}x temp)"
                    for k, v in sampling[label]["ms"].items()
                )
                lines.append(f"  {label:8s} {cells}")
    lines.append(harness.load_line(results["environment"]))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = harness.parser(__doc__)
    harness.add_output_args(parser, "tiny sizes (a smoke run)")
    harness.add_subset_arg(parser, "--parts", PARTS)
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git commit of the baseline")
    parser.add_argument("--no-baseline", action="store_true", help="ours only")
    parser.add_argument("--repeats", type=int, default=None, help="timed sampling calls")
    args = parser.parse_args(argv)
    args.parts = harness.parse_subset(parser, "--parts", args.parts, PARTS)
    args.sizes = SMALL if args.small else FULL
    args.repeats = args.repeats or args.sizes["repeats"]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    log = harness.Log("engine_host", clock=True)
    results: dict[str, Any] = dict(environment=harness.environment(), small=args.small)
    with tempfile.TemporaryDirectory(prefix="rg-batch-baseline-") as workdir:
        baseline_engine = baseline_sampling = None
        if not args.no_baseline:
            baseline_engine, baseline_sampling = load_baseline(args.baseline_ref, Path(workdir))
            results["baseline_ref"] = args.baseline_ref
        if "engine" in args.parts:
            results["engine"] = engine_part(args, baseline_engine, log)
        if "sampling" in args.parts:
            results["sampling"] = sampling_part(args, baseline_sampling, log)
    harness.record_load_after(results["environment"])
    return harness.finish(results, report(results), args.json, "engine_host")


if __name__ == "__main__":
    main()
