"""What one actor of each stage asks of Ray, and whether the cluster can give it.

Every stage declares its Ray resources in its own Ray Data arguments (``num_cpus``, ``num_gpus``,
``resources``: :class:`pipeline.stage.Stage`); :func:`actor_requests` reads them from the plan's
stages, so nothing here repeats a stage's settings. A run needs one actor of each stage at once
(rows stream through all of them), so the requests are checked together.

- :func:`check_node_fits`: on the local cluster the CLI starts (one node, its resources fixed
  when it starts), a request that node can never meet (``model.gpus_per_replica=1`` on a machine
  without a GPU) is a :class:`~pipeline.config.ConfigError` naming the setting (exit 2), before
  any work; Ray would otherwise wait for it forever.
- :func:`wait_for_resources`: on any cluster, a placement group with one bundle per stage (one
  actor's resources each) is waited on for ``run.resource_wait_s``. It asks only: an autoscaler
  sees the request and adds nodes, and the group is removed as soon as it is placed, before the
  stages start their actors. If it is not placed in time the run fails with
  :class:`ResourcesUnavailable`, naming each request no node of the cluster can meet (or, when
  each fits some node, saying the cluster had no room for them), the setting and the limit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ray

from pipeline.config import ConfigError, JobConfig

log = logging.getLogger(__name__)

# The config section whose <resource>_per_replica settings size a stage's actors.
_SECTIONS = {"model": "model", "toxicity": "toxicity"}


@dataclass(frozen=True)
class ActorRequest:
    """One actor of a stage: its Ray resources (only those above 0)."""

    stage: str
    resources: dict[str, float]

    def setting(self, resource: str) -> str:
        """The config path that sets ``resource`` for this stage's actors."""
        section = _SECTIONS.get(self.stage)
        if section is None:
            return "run.num_cpus"  # a stage with fixed needs: only the cluster's size changes it
        if resource in ("CPU", "GPU"):
            return f"{section}.{resource.lower()}s_per_replica"
        return f"{section}.resources_per_replica.{resource}"


class ResourcesUnavailable(RuntimeError):
    """The cluster did not place one actor of each stage within ``run.resource_wait_s``."""


def actor_requests(config: JobConfig) -> list[ActorRequest]:
    """One actor's resources for every stage of ``config``'s plan that runs in actors."""
    from pipeline.plan import build_stages  # the plan imports every stage module
    from pipeline.stage import PlanContext

    requests = []
    for stage in build_stages(config, PlanContext()):
        args = stage.ray_args
        if "compute" not in args:
            continue  # plain tasks: Ray's default of one CPU, any node
        amounts = {"CPU": args.get("num_cpus", 1), "GPU": args.get("num_gpus") or 0}
        amounts.update(args.get("resources") or {})
        resources = {name: float(n) for name, n in amounts.items() if n and n > 0}
        requests.append(ActorRequest(stage.name, resources))
    return requests


def check_node_fits(
    config: JobConfig, node: Mapping[str, float], where: str = "the local Ray cluster"
) -> None:
    """Raises ConfigError, naming the setting, if one actor of each stage does not fit ``node``
    (the resources of the one node of ``where``): each alone, then all of them together."""
    requests = actor_requests(config)
    errors: list[tuple[str, str]] = []
    for request in requests:
        for name, amount in request.resources.items():
            have = float(node.get(name, 0))
            if amount > have:
                errors.append(
                    (
                        request.setting(name),
                        f"each {request.stage} actor asks for {amount:g} {name}; {where} this "
                        f"run started has {have:g} (this machine's){_hint(name)}",
                    )
                )
    if errors:
        raise ConfigError(errors)
    for name in sorted({n for r in requests for n in r.resources}):
        asking = [(r, r.resources[name]) for r in requests if name in r.resources]
        total, have = sum(a for _, a in asking), float(node.get(name, 0))
        if total > have:
            parts = ", ".join(f"{r.stage} {a:g}" for r, a in asking)
            errors.append(
                (
                    asking[0][0].setting(name),
                    f"one actor of each stage needs {total:g} {name} at once ({parts}); {where} "
                    f"this run started has {have:g}{_hint(name)}",
                )
            )
    if errors:
        raise ConfigError(errors)


def _hint(resource: str) -> str:
    if resource == "CPU":
        return ": lower it, or raise run.num_cpus"
    if resource == "GPU":
        return ": set 0 to run on CPU, or give run.ray_address of a cluster with GPUs"
    return f": give run.ray_address of a cluster with {resource}"


def wait_for_resources(config: JobConfig) -> None:
    """Waits up to ``run.resource_wait_s`` until the cluster can place one actor of each stage
    (see the module docstring); raises :class:`ResourcesUnavailable` when it cannot."""
    requests = [r for r in actor_requests(config) if r.resources]
    if not requests:
        return
    timeout_s = config.run.resource_wait_s
    group = ray.util.placement_group([r.resources for r in requests], strategy="PACK")
    try:
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    finally:
        ray.util.remove_placement_group(group)
    if ready:
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    raise ResourcesUnavailable(_unavailable(requests, nodes, timeout_s))


def _unavailable(
    requests: Sequence[ActorRequest], nodes: Sequence[Mapping[str, float]], timeout_s: float
) -> str:
    """Why one actor of each stage found no room: the requests no node meets, else all of them."""
    lines = []
    for request in requests:
        for name, amount in request.resources.items():
            largest = max((float(n.get(name, 0)) for n in nodes), default=0.0)
            if amount > largest:
                lines.append(
                    f"{request.setting(name)}: each {request.stage} actor asks for {amount:g} "
                    f"{name}, and no node of the cluster has that many (the most: {largest:g})"
                )
    if not lines:
        asked = "; ".join(f"{r.stage} {_shown(r.resources)}" for r in requests)
        lines.append(f"one actor of each stage ({asked}) found no room on the cluster's nodes")
    shown = ", ".join(_shown(n) for n in nodes) or "none"
    return (
        f"no room for the run's actors after waiting {timeout_s:g} s (run.resource_wait_s):\n  "
        + "\n  ".join(lines)
        + f"\n  the cluster's nodes: {shown}"
    )


def _shown(resources: Mapping[str, float]) -> str:
    kept = {
        k: v
        for k, v in resources.items()
        if not k.startswith(("node:", "accelerator_type:"))
        and k not in ("memory", "object_store_memory")
    }
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(kept.items())) + "}"
