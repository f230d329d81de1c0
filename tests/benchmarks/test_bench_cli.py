"""Every benchmark starts both as a module (``python -m benchmarks.X``, as ``make bench`` runs it)
and as a script (``python benchmarks/X.py``, from any directory), and shares the harness's flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = (
    "prefill",
    "engine_vs_reference",
    "pipeline_efficiency",
    "pipeline_scale",
    "prefix_reuse",
    "controls",
    "grammar",
    "grammar_libraries",
    "fault_soak",
    "gpu_engine",
    "gpu_reference",
    "gpu_numerics",
)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_starts_as_module_and_as_script(name: str, tmp_path: Path) -> None:
    commands = {
        ROOT: [sys.executable, "-m", f"benchmarks.{name}", "--help"],
        tmp_path: [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"],
    }
    for cwd, cmd in commands.items():
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{cmd}:\n{proc.stderr[-2000:]}"
        assert "--small" in proc.stdout and "--json PATH" in proc.stdout, proc.stdout
