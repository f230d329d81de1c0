"""The stage contract: what a step of the plan needs, adds and drops, and how Ray runs it.

A :class:`Stage` is built from the job config by its module's builder (``prompt_stage``,
``model_stage``, ...), holds the batch function (a callable class, run in an actor pool, or a plain
function, run in tasks) with its arguments, and owns its Ray Data arguments (compute strategy,
resources, batch size). Every stage is one-to-one on rows: it adds or replaces columns and drops
the ones it declares, never rows.

:func:`check_columns` walks a plan's stages from the reader's columns and raises
:class:`PlanError` naming the first stage that needs a column no earlier step provides, before
any work starts. A column name ending in ``*`` stands for every column with that prefix (the
toxicity labels depend on the checkpoint).

Each builder declares every column its stage may add, in any configuration (:func:`declares`);
the plan refuses a stage that adds more, and the columns a passthrough may not take are derived
from those declarations (:func:`pipeline.plan.reserved_columns`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray

from pipeline import metrics

# Ray's RayDeprecationWarning for options passed as **ray_remote_args (see Stage.apply).
_REMOTE_ARGS_DEPRECATION = r"`ray_remote_args` is deprecated"


@dataclass(frozen=True)
class PlanContext:
    """What stage builders get besides the config: objects the driver made for this run."""

    tokenizer: Any = None  # model.tokenizer.Tokenizer of the checkpoint (prompt building)
    progress: Any = None  # a pipeline.progress.ProgressCounter actor handle, or None


Builder = TypeVar("Builder", bound=Callable[..., Any])


def declares(*adds: str) -> Callable[[Builder], Builder]:
    """Marks a stage builder with every column its stage may add (``x_*``: a prefix)."""

    def mark(builder: Builder) -> Builder:
        builder.adds = tuple(adds)  # type: ignore[attr-defined]
        return builder

    return mark


def declared(builder: Callable[..., Any]) -> tuple[str, ...]:
    """The columns a builder declares its stage may add (none when it declares nothing)."""
    return tuple(getattr(builder, "adds", ()))


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` is one of ``patterns`` or starts with a ``prefix*`` among them."""
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


class PlanError(ValueError):
    """A plan whose stages do not fit together."""


@dataclass(frozen=True)
class Stage:
    """One ``map_batches`` step of the plan (see the module docstring)."""

    name: str
    fn: Any
    requires: tuple[str, ...]
    adds: tuple[str, ...] = ()
    drops: tuple[str, ...] = ()
    constructor_kwargs: dict[str, Any] = field(default_factory=dict)
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    ray_args: dict[str, Any] = field(default_factory=dict)

    def apply(self, dataset: ray.data.Dataset, run_id: str | None = None) -> ray.data.Dataset:
        """``dataset.map_batches`` with this stage's function, arguments and Ray arguments.

        With a ``run_id``, each batch is timed into the run's metrics (:func:`pipeline.metrics.timed`).

        Ray 2.60 deprecates passing actor options through ``**ray_remote_args`` but names no
        parameter for ``max_restarts`` yet (the model stage bounds its replicas' restarts), so
        that one deprecation warning is silenced here, for these calls only.
        """
        kwargs: dict[str, Any] = dict(self.ray_args)
        fn = self.fn if run_id is None else metrics.timed(self.fn, self.name, run_id)
        if isinstance(self.fn, type):
            kwargs["fn_constructor_kwargs"] = self.constructor_kwargs
        if self.fn_kwargs:
            kwargs["fn_kwargs"] = self.fn_kwargs
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_REMOTE_ARGS_DEPRECATION)
            return dataset.map_batches(fn, batch_format="pyarrow", **kwargs)


def columns_after(available: Iterable[str], stage: Stage) -> list[str]:
    """The columns after ``stage`` ran on ``available``; PlanError if it lacks one it needs."""
    have = list(available)
    for name in stage.requires:
        if not _provided(name, have):
            raise PlanError(
                f"stage {stage.name!r} needs column {name!r}, which no earlier stage provides "
                f"(available: {', '.join(have) or 'none'})"
            )
    dropped = set(stage.drops)
    out = [c for c in have if c not in dropped]
    out += [c for c in stage.adds if c not in out]
    return out


def check_columns(
    source: Sequence[str], stages: Sequence[Stage], sink_requires: Sequence[str] = ()
) -> list[str]:
    """The plan's output columns; raises PlanError for a stage (or the sink) missing a column."""
    have = list(source)
    for stage in stages:
        have = columns_after(have, stage)
    columns_after(have, Stage(name="writer", fn=None, requires=tuple(sink_requires)))
    return have


def _provided(name: str, have: Sequence[str]) -> bool:
    if name in have:
        return True
    if name.endswith("*"):
        return any(c.startswith(name[:-1]) for c in have)
    return any(c.endswith("*") and name.startswith(c[:-1]) for c in have)
