"""A stale ``ray_current_cluster`` file (what a killed head leaves) must not matter to the suite.

Each test points Ray's temp dir (``RAY_TMPDIR``) at a fresh directory holding a cluster file whose
address has nothing listening, then runs, in a child process, something that starts Ray the way
tests and benchmarks do (:mod:`testkit.ray_local`). Without ``address="local"`` Ray would join the
stale address and refuse ``num_cpus``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STALE_ADDRESS = "127.0.0.1:1"  # port 1: nothing listens there


@pytest.fixture
def stale_ray_tmpdir() -> Iterator[Path]:
    """A short temp dir (Ray's socket paths must stay under 108 bytes) with a stale cluster file."""
    root = Path(tempfile.mkdtemp(prefix="rgstale-", dir="/tmp"))
    (root / "ray").mkdir()
    (root / "ray" / "ray_current_cluster").write_text(STALE_ADDRESS)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(args: list[str], ray_tmpdir: Path, timeout: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_plain_ray_init_would_join_the_stale_address(stale_ray_tmpdir: Path) -> None:
    """The hazard is real: without an address, ``ray.init(num_cpus=...)`` refuses to start."""
    code = (
        "import ray\n"
        "try:\n"
        "    ray.init(num_cpus=2, include_dashboard=False)\n"
        "except ValueError as exc:\n"
        "    print('refused:', exc)\n"
    )
    result = _run(["-c", code], stale_ray_tmpdir, timeout=120)
    assert "refused: When connecting to an existing cluster" in result.stdout, result.stderr[-2000:]


def test_the_module_fixtures_ray_starts_its_own(stale_ray_tmpdir: Path) -> None:
    """The pipeline tests' ``ray_cluster`` fixture: :func:`testkit.ray_local.local_ray` with 8
    CPUs starts a Ray of its own beside the stale file, and runs a task on it."""
    code = (
        "import ray\n"
        "from testkit.ray_local import local_ray\n"
        "with local_ray(num_cpus=8):\n"
        "    print('cpus', int(ray.cluster_resources()['CPU']))\n"
        "    print('task', ray.get(ray.remote(lambda: 41 + 1).remote()))\n"
    )
    result = _run(["-c", code], stale_ray_tmpdir, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "cpus 8" in result.stdout and "task 42" in result.stdout


@pytest.mark.slow
def test_scale_benchmark_child_starts_its_own_ray(stale_ray_tmpdir: Path, tmp_path: Path) -> None:
    """Also the pipeline scale benchmark's smoke test: it runs end to end at a small size (in a
    child, as ``make bench`` runs it) and reports its driver figures."""
    out = tmp_path / "scale.json"
    args = ["-m", "benchmarks.pipeline_scale", "--sizes", "40", "80", "--json", str(out)]
    result = _run(args, stale_ray_tmpdir, 600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["sizes"]) == {"40", "80"}
    for rows, size in results["sizes"].items():
        assert size["rows"] == int(rows) and size["rows_per_s"] > 0
        assert size["driver_peak_rss_mb"] > 50 and size["driver_read_bytes"] > 0
        assert size["corpus_bytes"] > 20 * int(rows)  # 20 to 60 words per row
        assert "MapBatches(ModelStage)" in size["operator_us_per_row"]
    assert isinstance(results["meets_targets"], bool)
