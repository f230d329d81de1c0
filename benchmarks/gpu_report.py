"""The bookkeeping of benchmarks/gpu_all.sh: a preflight, each part's status, the summary.

  preflight  versions of what the GPU benchmarks need (from package metadata, nothing heavy
             imported), whether the official package imports on this jax, and that importing
             every GPU benchmark module pulls in neither ray nor the pipeline    -> preflight.json
  record     after a part: its exit code, seconds and limit go into its JSON under "run", with
             a status (ok, partial: some sub-part failed, timeout, failed, skipped) and, unless
             ok, the error and the end of its log. A part that wrote nothing gets a JSON holding
             just that, so every part always has its file.
  summary    the key figures of every part and their statuses                   -> summary.json

Only the preflight imports more than the standard library.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python benchmarks/gpu_report.py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "numpy",
    "ml_dtypes",
    "torch",
    "transformers",
    "safetensors",
    "sentencepiece",
    "fsspec",
    "orbax-checkpoint",
    "recurrentgemma",
    "typeguard",
    "jaxtyping",
    "wadler-lindig",
    "einops",
    "absl-py",
)
TIMED_OUT = (124, 137)  # timeout's exit code, and SIGKILL's after --kill-after


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else {"content": data}


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# preflight ----------------------------------------------------------------------------------------
def preflight(json_path: Path) -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = dict(
        part="preflight",
        python=platform.python_version(),
        packages={name: version(name) for name in PACKAGES},
        errors={},
    )
    info["missing"] = [name for name, v in info["packages"].items() if v is None]
    for module in ("benchmarks.gpu_engine", "benchmarks.gpu_numerics", "benchmarks.gpu_reference"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            info["errors"][module] = f"{type(exc).__name__}: {exc}"
    try:
        from benchmarks.gpu_reference import import_official

        info["official_aliased_for_this_jax"] = import_official()
        info["official_imports"] = True
    except Exception as exc:
        info["official_imports"] = False
        info["errors"]["recurrentgemma.jax"] = f"{type(exc).__name__}: {exc}"
    info["ray_imported"] = "ray" in sys.modules
    info["pipeline_imported"] = any(m.split(".")[0] == "pipeline" for m in sys.modules)
    problems = [f"{k}: {v}" for k, v in info["errors"].items()]
    if info["ray_imported"] or info["pipeline_imported"]:
        problems.append("the GPU benchmarks import ray or the pipeline")
    if problems:
        info["error"] = "; ".join(problems)
    info["complete"] = True
    _write(json_path, info)
    print(f"[gpu-preflight] python {info['python']}; missing {info['missing'] or 'nothing'}")
    for problem in problems:
        print(f"[gpu-preflight] {problem}")
    return info


# record -------------------------------------------------------------------------------------------
def record(
    json_path: Path, part: str, rc: int, seconds: float, limit: float, log_path: Path | None
) -> dict[str, Any]:
    data = _load(json_path)
    wrote = data is not None
    data = data if wrote else {"part": part}
    data.setdefault("part", part)
    if rc in TIMED_OUT:
        status, error = "timeout", f"timed out after {limit:.0f} s (exit code {rc})"
    elif rc == -1:
        status, error = "skipped", "no time left in the budget"
    elif rc != 0:
        status, error = "failed", f"exit code {rc}"
    elif not wrote:
        status, error = "failed", "exited 0 but wrote no JSON"
    elif "error" in data:
        status, error = "partial", None
    else:
        status, error = "ok", None
    if error is not None:
        if data.get("error"):
            error = f"{error}; {data['error']}"
        data["error"] = error
        data["complete"] = False
    run: dict[str, Any] = dict(
        status=status, exit_code=rc, seconds=seconds, limit_s=limit, wrote_json=wrote
    )
    if status != "ok" and log_path is not None and log_path.is_file():
        run["log_tail"] = log_path.read_text(errors="replace").splitlines()[-40:]
    data["run"] = run
    _write(json_path, data)
    print(f"[gpu-all] part {part}: {status} in {seconds:.0f} s" + (f" ({error})" if error else ""))
    return data


# summary ------------------------------------------------------------------------------------------
def _engine_figures(data: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for row in data.get("rows", []):
        if "error" in row:
            rows.append(dict(slots=row.get("slots"), error=row["error"]))
        else:
            rows.append(
                {
                    k: row.get(k)
                    for k in (
                        "slots",
                        "tokens_per_s_decode",
                        "tokens_per_s_total",
                        "roofline_fraction",
                        "decode_step_s",
                        "compile_s",
                    )
                }
            )
    return dict(
        device=data.get("device"),
        preset=data.get("preset"),
        bandwidth_gb_per_s=_scale(data.get("bandwidth_bytes_per_s"), 1e-9),
        matmul_tflop_per_s=_scale(data.get("matmul_flops_per_s"), 1e-12),
        rows=rows,
        target=data.get("target"),
    )


def _reference_figures(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("ours", "official", "hf"):
        row = data.get(key)
        if isinstance(row, dict):
            out[f"{key}_warm_tokens_per_s"] = row.get("warm_tokens_per_s", row.get("error"))
    out["ratios"] = data.get("ratios")
    out["target"] = data.get("target")
    checks = data.get("token_checks") or {}
    out["identical_rows"] = {k: f"{v['identical']}/{v['compared']}" for k, v in checks.items()}
    return out


def _numerics_figures(data: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "max_abs_diff",
        "mean_abs_diff",
        "greedy_agreement_teacher_forced",
        "greedy_agreement_free_running",
    )
    out = {k: data.get(k) for k in keys}
    tf = data.get("teacher_forced") or {}
    out["reference_logit_std"] = tf.get("reference_logit_std")
    out["reference_top1_top2_margin_mean"] = tf.get("reference_top1_top2_margin_mean")
    return out


def _preflight_figures(data: dict[str, Any]) -> dict[str, Any]:
    return {k: data.get(k) for k in ("python", "missing", "official_imports", "ray_imported")}


def _host_figures(data: dict[str, Any]) -> dict[str, Any]:
    engine = {
        f"{row['slots']}x{row['new_tokens']}": {
            "host_us_per_decode_step": row["ours"]["host_us_per_decode_step"],
            "device_waits_share": row["ours"]["device_waits_share"],
            **row.get("ratios", {}),
        }
        for row in data.get("engine", [])
    }
    sampling = data.get("sampling", {})
    return {
        "engine": engine,
        "sampling_over_temperature": sampling.get("ours", {}).get("over_temperature"),
    }


FIGURES = {
    "preflight": _preflight_figures,
    "engine": _engine_figures,
    "reference": _reference_figures,
    "numerics": _numerics_figures,
    "engine9b": _engine_figures,
    "host": _host_figures,
}


def _scale(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def summary(out: Path, parts: list[str], total_s: float, small: bool) -> dict[str, Any]:
    result: dict[str, Any] = dict(small=small, total_s=total_s, parts={})
    for part in parts:
        data = _load(out / f"{part}.json") or {"error": "no JSON"}
        run = data.get("run", {})
        entry = dict(status=run.get("status", "unknown"), seconds=run.get("seconds"))
        if data.get("error"):
            entry["error"] = data["error"]
        try:
            entry["figures"] = FIGURES.get(part, lambda d: {})(data)
        except Exception as exc:  # a malformed part file must not hide the others
            entry["figures_error"] = f"{type(exc).__name__}: {exc}"
        result["parts"][part] = entry
    _write(out / "summary.json", result)
    print(f"[gpu-all] summary ({total_s:.0f} s in all) -> {out / 'summary.json'}")
    for part, entry in result["parts"].items():
        print(f"  {part:10s} {entry['status']:8s} {entry['seconds']} s")
        for key, value in (entry.get("figures") or {}).items():
            print(f"      {key}: {json.dumps(value)[:300]}")
        if entry.get("error"):
            print(f"      error: {str(entry['error'])[:300]}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preflight")
    p.add_argument("--json", type=Path, required=True)
    r = sub.add_parser("record")
    r.add_argument("--json", type=Path, required=True)
    r.add_argument("--part", required=True)
    r.add_argument("--rc", type=int, required=True)
    r.add_argument("--seconds", type=float, required=True)
    r.add_argument("--limit", type=float, required=True)
    r.add_argument("--log", type=Path, default=None)
    s = sub.add_parser("summary")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--parts", required=True)
    s.add_argument("--total-s", type=float, default=float("nan"))
    s.add_argument("--small", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "preflight":
        start = time.perf_counter()
        info = preflight(args.json)
        info["wall_s"] = time.perf_counter() - start
        _write(args.json, info)
    elif args.command == "record":
        record(args.json, args.part, args.rc, args.seconds, args.limit, args.log)
    else:
        parts = [p for p in args.parts.split(",") if p]
        summary(args.out, parts, args.total_s, bool(args.small))


if __name__ == "__main__":
    main()
