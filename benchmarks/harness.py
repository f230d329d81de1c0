"""What every benchmark here repeats: arguments, timing, environment facts, the JSON and the log.

- arguments: ``parser(doc)`` and ``add_output_args`` (``--small`` and ``--json PATH`` everywhere);
  the integer workload options with a full-size and a ``--small`` preset (``add_workload_args`` /
  ``resolve_workload_args``); comma-separated subsets (``add_subset_arg`` / ``parse_subset``);
- the model both CPU benchmarks build from those options (``MODEL_DEFAULTS``, ``MODEL_SMALL``,
  ``griffin_config``, ``model_fields``, ``model_summary``);
- timing: ``time_call`` (one call, waited for), ``repeat_timings`` (a warm-up, then ``repeats``
  timed calls), ``median_min``;
- environment facts (``environment``, ``environment_line``, ``load_line``, ``usable_cpus``);
- output: ``Log`` (tagged, optionally timed progress lines), ``error_text`` (a failing part is
  reported and the rest still measured), ``with_rule`` (a table header and its rule), and
  ``finish`` (print the report, write the JSON, return what the JSON holds);
- ``run_module_json``: a measurement in a fresh interpreter (``python -m benchmarks.X ...``)
  that prints its result as JSON on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from model import ModelConfig
from model.config import griffin_pattern

REPO_ROOT = Path(__file__).resolve().parents[1]

# The model of the CPU benchmarks (prefill, engine vs reference): full size and --small.
MODEL_DEFAULTS: dict[str, int] = dict(
    width=512, layers=6, heads=4, mlp=1536, vocab=8192, window=256
)
MODEL_SMALL: dict[str, int] = dict(width=64, layers=3, heads=2, mlp=96, vocab=256, window=8)


# Arguments ----------------------------------------------------------------------------------------
def parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the benchmark's docstring."""
    return argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_output_args(parser: argparse.ArgumentParser, small_help: str, *small_flags: str) -> None:
    """``--small`` (plus any other spellings, the first one naming it) and ``--json PATH``."""
    parser.add_argument(*(small_flags or ("--small",)), action="store_true", help=small_help)
    parser.add_argument(
        "--json", metavar="PATH", type=Path, default=None, help="also write the results as JSON"
    )


def add_workload_args(
    parser: argparse.ArgumentParser, defaults: Mapping[str, int], small: Mapping[str, int]
) -> None:
    """One integer option per preset entry (``mem_long`` -> ``--mem-long``) and ``--lru-width``."""
    for name, value in defaults.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=int,
            default=None,
            help=f"default {value} (--small: {small[name]})",
        )
    parser.add_argument("--lru-width", type=int, default=None, help="default: --width")


def resolve_workload_args(
    args: argparse.Namespace, defaults: Mapping[str, int], small: Mapping[str, int]
) -> None:
    """Fills the options not given from the preset (``small`` under ``--small``)."""
    for name, value in (small if args.small else defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lru_width is None:
        args.lru_width = args.width


def add_subset_arg(parser: argparse.ArgumentParser, flag: str, choices: Sequence[str]) -> None:
    parser.add_argument(
        flag,
        default=",".join(choices),
        help=f"comma-separated subset of {','.join(choices)} (default: all)",
    )


def parse_subset(
    parser: argparse.ArgumentParser, flag: str, text: str, choices: Sequence[str]
) -> list[str]:
    """The items of a comma-separated ``text``, in the order given, once each; exits on others."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = sorted(set(items) - set(choices))
    if unknown or not items:
        parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(choices)}")
    return list(dict.fromkeys(items))


# The model ----------------------------------------------------------------------------------------
def griffin_config(args: argparse.Namespace) -> ModelConfig:
    """The released models' layout at the size of ``args`` (width, layers, ... lru_width)."""
    return ModelConfig(
        vocab_size=args.vocab,
        width=args.width,
        mlp_expanded_width=args.mlp,
        num_heads=args.heads,
        block_types=griffin_pattern(args.layers),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=args.window,
        logits_soft_cap=30.0,
        lru_width=args.lru_width,
    )


def model_fields(args: argparse.Namespace, config: ModelConfig) -> dict[str, Any]:
    """The model's size as the results' ``workload`` records it."""
    return dict(
        width=args.width,
        layers=args.layers,
        block_types=list(config.block_types),
        heads=args.heads,
        mlp=args.mlp,
        vocab=args.vocab,
        window=args.window,
        lru_width=args.lru_width,
    )


def model_summary(workload: Mapping[str, Any]) -> str:
    """'width 512, layers 6 (R/R/A/R/R/A), heads 4, ...' from ``model_fields``."""
    blocks = "/".join(b[0].upper() for b in workload["block_types"])
    return (
        f"width {workload['width']}, layers {workload['layers']} ({blocks}), "
        f"heads {workload['heads']}, mlp {workload['mlp']}, vocab {workload['vocab']}, "
        f"window {workload['window']}, lru {workload['lru_width']}"
    )


# Timing -------------------------------------------------------------------------------------------
def time_call(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """(result, seconds) of one call, its result waited for (``jax.block_until_ready``)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def repeat_timings(fn: Callable[..., Any], *args: Any, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls after one untimed warm-up call (compilation, first touch)."""
    jax.block_until_ready(fn(*args))
    return [time_call(fn, *args)[1] for _ in range(repeats)]


def median_min(times: Sequence[float]) -> tuple[float, float]:
    return statistics.median(times), min(times)


# Environment --------------------------------------------------------------------------------------
def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def environment() -> dict[str, Any]:
    """Versions, devices, CPUs and the load average before the run (``load_avg_before``)."""
    return dict(
        jax_version=jax.__version__,
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        cpu_count=os.cpu_count(),
        cpus_usable=usable_cpus(),
        python=platform.python_version(),
        machine=platform.machine(),
        load_avg_before=list(os.getloadavg()),
    )


def record_load_after(env: dict[str, Any]) -> None:
    env["load_avg_after"] = list(os.getloadavg())


def environment_line(env: Mapping[str, Any], *, devices: bool = True) -> str:
    torch = f"  torch {env['torch_version']}" if "torch_version" in env else ""
    devices_text = f"  devices {', '.join(env['devices'])}" if devices else ""
    return (
        f"jax {env['jax_version']}{torch}  backend {env['backend']}{devices_text}  "
        f"CPUs {env['cpu_count']} ({env['cpus_usable']} usable)  python {env['python']}"
    )


def load_line(env: Mapping[str, Any]) -> str:
    """The load average before and after: on a shared machine, compare only within one run."""

    def load(when: str) -> str:
        values = env.get(f"load_avg_{when}")
        return "n/a" if values is None else "/".join(f"{v:.2f}" for v in values)

    return f"load average (1/5/15 min) before {load('before')}, after {load('after')}"


# Output -------------------------------------------------------------------------------------------
class Log:
    """Progress lines ``[tag] message``, or ``[tag   12.3s] message`` with ``clock``."""

    def __init__(self, tag: str, *, clock: bool = False) -> None:
        self.tag, self.clock, self.start = tag, clock, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        when = f" {self.elapsed():6.1f}s" if self.clock else ""
        print(f"[{self.tag}{when}] {message}", flush=True)


def error_text(exc: BaseException) -> str:
    """Prints the traceback; returns 'Type: message' for the failing part's result row."""
    traceback.print_exc()
    return f"{type(exc).__name__}: {exc}"


def with_rule(header: str) -> list[str]:
    """A table's header line and a rule under it."""
    return [header, "-" * len(header)]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def finish(
    results: dict[str, Any], report: str | None, json_path: str | Path | None, tag: str
) -> dict[str, Any]:
    """Prints ``report``, writes ``results`` to ``json_path`` if given (numpy scalars as numbers)
    and returns them as the JSON holds them."""
    if report is not None:
        print(report, flush=True)
    text = json.dumps(results, indent=2, default=_json_default)
    if json_path:
        Path(json_path).write_text(text + "\n")
        print(f"[{tag}] wrote {json_path}")
    return json.loads(text)


def run_module_json(
    module: str, *args: str, env: Mapping[str, str] | None = None, label: str | None = None
) -> Any:
    """Runs ``python -m module *args`` in a fresh interpreter importing from this checkout (with
    ``env`` added to the environment) and returns the JSON of its last stdout line; raises
    RuntimeError with the end of its stderr if it fails."""
    child_env = dict(os.environ)
    path = child_env.get("PYTHONPATH")
    child_env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    child_env.update(env or {})
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env, check=False)
    if proc.returncode != 0:
        what = label or f"python -m {module}"
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
