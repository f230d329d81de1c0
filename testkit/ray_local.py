"""Start a Ray of the caller's own, the way the driver does, for tests and benchmarks.

``ray.init()`` without an address joins whatever ``<ray temp dir>/ray_current_cluster`` names (a
head started earlier on the machine, or a stale address a killed head left behind) and then
refuses ``num_cpus``. :func:`pipeline.local_ray.start_local_ray` always starts a fresh local
instance (``address="local"``), as ``rgbatch run`` does when no ``run.ray_address`` is
configured, and starts it again when Ray's node start-up wait runs out on a busy machine. Every
test and benchmark that starts Ray goes through it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.local_ray import start_local_ray

__all__ = ["local_ray", "start_local_ray"]


@contextmanager
def local_ray(num_cpus: int, **kwargs: Any) -> Iterator[None]:
    """:func:`start_local_ray` for the body of a ``with`` block, shut down at its end."""
    import ray

    start_local_ray(num_cpus, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()
