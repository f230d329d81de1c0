"""Fixtures of the pipeline tests: the offline checkpoints, and a local Ray cluster per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pipeline_helpers import build_fixtures

from testkit.ray_local import local_ray


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny model (Kaggle layout) and the tiny detoxify checkpoint, built once (read-only)."""
    return build_fixtures(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster for the tests of one module (8 logical CPUs)."""
    with local_ray(num_cpus=8):
        yield
