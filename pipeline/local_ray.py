"""A Ray instance of this process's own (``rgbatch run`` without ``run.ray_address``).

``ray.init(address="local")`` always starts a fresh local instance: it never joins a head started
earlier on the machine, nor one a stale ``<ray temp dir>/ray_current_cluster`` names.

Ray gives a new raylet a fixed 30 s to register with its GCS (not configurable in Ray 2.60). On
a machine busy with other work (a laptop compiling, a CI runner with two cores and several test
processes) that wait can run out although nothing is wrong, and the start fails with "The current
node timed out during startup". Such a start is shut down and tried again, at most
``attempts`` times in all; every other error is raised at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

# The message of the exception Ray raises when the new node did not register in time.
STARTUP_TIMEOUT = "timed out during startup"


def start_local_ray(num_cpus: int, *, attempts: int = 3, **kwargs: Any) -> Any:
    """Start a fresh local Ray instance with ``num_cpus`` logical CPUs and no dashboard.

    Extra keyword arguments go to ``ray.init``. Returns its context.
    """
    import ray

    kwargs.setdefault("include_dashboard", False)
    for attempt in range(1, attempts + 1):
        try:
            return ray.init(address="local", num_cpus=num_cpus, **kwargs)
        except Exception as exc:
            if STARTUP_TIMEOUT not in str(exc) or attempt == attempts:
                raise
            log.warning(
                "the local Ray instance did not start in time (attempt %d of %d): %s; "
                "starting it again",
                attempt,
                attempts,
                exc,
            )
            ray.shutdown()  # stops what the failed start left running
            time.sleep(1.0)
    raise AssertionError("unreachable")
