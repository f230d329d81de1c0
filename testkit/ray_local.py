"""Start a Ray of the caller's own, the way the driver does, for tests and benchmarks.

``ray.init()`` without an address joins whatever ``<ray temp dir>/ray_current_cluster`` names (a
head started earlier on the machine, or a stale address a killed head left behind) and then
refuses ``num_cpus``. ``address="local"`` always starts a fresh local instance, which is what
``rgbatch run`` does when no ``run.ray_address`` is configured. Every test and benchmark that
starts Ray goes through :func:`start_local_ray`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def start_local_ray(num_cpus: int, **kwargs: Any) -> None:
    """Start a fresh local Ray instance with ``num_cpus`` logical CPUs and no dashboard.

    Extra keyword arguments go to ``ray.init`` (``runtime_env``, ``log_to_driver``, ...).
    """
    import ray

    kwargs.setdefault("include_dashboard", False)
    ray.init(address="local", num_cpus=num_cpus, **kwargs)


@contextmanager
def local_ray(num_cpus: int, **kwargs: Any) -> Iterator[None]:
    """:func:`start_local_ray` for the body of a ``with`` block, shut down at its end."""
    import ray

    start_local_ray(num_cpus, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()
