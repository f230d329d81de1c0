"""Run metrics through Ray's own metrics (``ray.util.metrics``), for Prometheus and Grafana.

Every metric rg-batch records is a row of :data:`METRICS` (name, type, tags, meaning); the
documentation's list (docs/operations.md) is generated from that table
(``python -m pipeline.metrics``) and a test keeps the two equal. Each node's Ray metrics agent
exports them as Prometheus text on the node's metrics export port (``ray start
--metrics-export-port``), prefixed ``ray_``, counters with ``_total`` after the name, with Ray's
own labels beside ours (``WorkerId``, ``NodeAddress``, ...): sum over the workers in queries
(``sum by (run_id) (ray_rgbatch_rows_written_total)``). Every metric carries the ``run_id`` tag.

Where the figures come from, all recorded per block or batch, never per row:

- the read tasks count the rows they read (:func:`rows_read`);
- the writer counts every part it writes from the part's :class:`~pipeline.summary.RunSummary`
  (rows written, rejected, errored by kind, tokens, toxicity decisions: :func:`part_written`);
- each stage's batches are timed by a wrapper put round the stage function when the plan is
  applied (:func:`timed`), which also tells the stage's process which run it serves;
- each model replica reports its engine's figures after every batch (:func:`engine_report`);
- the driver sets the run's state and start time (:func:`run_state`).

Counters count work done, retries included: a write task that Ray Data retries counts its rows
again (the manifest's counts are the exact ones). Metric objects are made once per process, on
first use. Gauges keep their last value while the process that set them lives
(:data:`GAUGE_REFRESH_S`).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

PREFIX = "ray_"  # what Ray's exporter puts before every application metric's name

RUN_STATES = ("waiting", "running", "finalizing", "succeeded", "failed")

LATENCY_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name as recorded, Prometheus type, tag keys and meaning."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    tags: tuple[str, ...]
    description: str
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name Prometheus sees (a counter's samples: this plus ``_total``)."""
        return PREFIX + self.name

    @property
    def series(self) -> tuple[str, ...]:
        """Every sample name the exporter writes for this metric."""
        base = self.exported
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_count", base + "_sum")
        return (base,)


RUN = ("run_id",)
REPLICA = ("run_id", "replica")

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("rgbatch_rows_read", "counter", RUN, "Input rows the read tasks read."),
    MetricSpec(
        "rgbatch_rows_written",
        "counter",
        RUN,
        "Output rows written to the results parts (error rows included, rejected rows not).",
    ),
    MetricSpec(
        "rgbatch_rows_rejected",
        "counter",
        RUN,
        "Output rows the toxicity policy dropped to rejected/.",
    ),
    MetricSpec(
        "rgbatch_rows_errored",
        "counter",
        (*RUN, "error_kind"),
        "Output rows with `error` set, by error kind (read, prompt, generation, toxicity, ...).",
    ),
    MetricSpec("rgbatch_prompt_tokens", "counter", RUN, "Prompt tokens of the rows written."),
    MetricSpec(
        "rgbatch_generated_tokens", "counter", RUN, "Tokens generated for the rows written."
    ),
    MetricSpec(
        "rgbatch_toxicity_decisions",
        "counter",
        (*RUN, "decision"),
        "Toxicity policy decisions on the rows written (keep, drop, redact).",
    ),
    MetricSpec(
        "rgbatch_prefix_hits",
        "counter",
        REPLICA,
        "Requests that started from a cached prefix state, per model replica.",
    ),
    MetricSpec(
        "rgbatch_prefix_misses",
        "counter",
        REPLICA,
        "Requests whose shared prefix was prefilled for them, per model replica.",
    ),
    MetricSpec(
        "rgbatch_engine_slots",
        "gauge",
        REPLICA,
        "Decode slots of the replica's engine (generation.max_slots).",
    ),
    MetricSpec(
        "rgbatch_engine_slots_used",
        "gauge",
        REPLICA,
        "Slots holding a request when the replica last finished a batch.",
    ),
    MetricSpec(
        "rgbatch_engine_queue_depth",
        "gauge",
        REPLICA,
        "Requests queued in the replica's engine, waiting for a slot, at its last batch.",
    ),
    MetricSpec(
        "rgbatch_engine_decode_steps_per_s",
        "gauge",
        REPLICA,
        "Decode steps per second of the replica's engine since its previous batch.",
    ),
    MetricSpec(
        "rgbatch_stage_batch_seconds",
        "histogram",
        (*RUN, "stage"),
        "Seconds each stage (prompt, model, toxicity, output) took per batch.",
        LATENCY_BUCKETS_S,
    ),
    MetricSpec(
        "rgbatch_run_state",
        "gauge",
        (*RUN, "state"),
        "1 for the run's current state, 0 for the others: " + ", ".join(RUN_STATES) + ".",
    ),
    MetricSpec(
        "rgbatch_run_start_time_seconds",
        "gauge",
        RUN,
        "When the run's attempt started (Unix time, seconds).",
    ),
)

BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS}


def exported_names() -> set[str]:
    """Every Prometheus sample name the code's metrics can produce (for the jobs/ files' tests)."""
    return {name for spec in METRICS for name in spec.series}


# ------------------------------------------------------------------------------------ recording

_lock = threading.Lock()
_made: dict[str, Any] = {}
_bound_run: list[str] = [""]  # the run this process's stage serves (set by :func:`timed`)
_engine_seen: dict[int, tuple[float, int, int, int]] = {}  # id(worker) -> time, steps, hits, misses
_gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # last value of each series
_refresher: list[threading.Thread] = []

# Ray 2.60's exporter drops a gauge series that was not set again within a few report
# intervals, so this process sets its gauges again at this period (a daemon thread, started by
# the first gauge set) for as long as it lives.
GAUGE_REFRESH_S = 5.0


def metric(name: str) -> Any:
    """The process's ``ray.util.metrics`` object of ``name`` (made on first use)."""
    made = _made.get(name)
    if made is not None:
        return made
    from ray.util import metrics as ray_metrics

    spec = BY_NAME[name]
    with _lock:
        if name not in _made:
            if spec.kind == "counter":
                made = ray_metrics.Counter(spec.name, spec.description, tag_keys=spec.tags)
            elif spec.kind == "gauge":
                made = ray_metrics.Gauge(spec.name, spec.description, tag_keys=spec.tags)
            else:
                made = ray_metrics.Histogram(
                    spec.name, spec.description, list(spec.boundaries), tag_keys=spec.tags
                )
            _made[name] = made
    return _made[name]


def inc(name: str, value: float, **tags: str) -> None:
    """Adds ``value`` (nothing when it is not positive) to counter ``name``."""
    if value > 0:
        metric(name).inc(float(value), tags=tags)


def set_gauge(name: str, value: float, **tags: str) -> None:
    """Sets gauge ``name``; the process keeps setting it to this value until the next call."""
    metric(name).set(float(value), tags=tags)
    with _lock:
        _gauges[(name, tuple(sorted(tags.items())))] = float(value)
        if not _refresher:
            thread = threading.Thread(target=_refresh, name="rgbatch-gauges", daemon=True)
            _refresher.append(thread)
            thread.start()


def _refresh() -> None:
    while True:
        time.sleep(GAUGE_REFRESH_S)
        with _lock:
            current = list(_gauges.items())
        for (name, tags), value in current:
            metric(name).set(value, tags=dict(tags))


def bind(run_id: str) -> None:
    """Tells this process which run its stage serves (the model replica's reports use it)."""
    _bound_run[0] = run_id


def rows_read(run_id: str, rows: int) -> None:
    """A read task yielded ``rows`` rows."""
    inc("rgbatch_rows_read", rows, run_id=run_id)


def part_written(run_id: str, summary: Any) -> None:
    """The writer wrote one part; ``summary`` is its RunSummary (kept and rejected rows)."""
    inc("rgbatch_rows_written", summary.rows - summary.rejected, run_id=run_id)
    inc("rgbatch_rows_rejected", summary.rejected, run_id=run_id)
    inc("rgbatch_prompt_tokens", summary.prompt_tokens, run_id=run_id)
    inc("rgbatch_generated_tokens", summary.output_tokens, run_id=run_id)
    for kind, n in summary.error_kinds.items():
        inc("rgbatch_rows_errored", n, run_id=run_id, error_kind=str(kind))
    for decision, n in summary.decisions.items():
        inc("rgbatch_toxicity_decisions", n, run_id=run_id, decision=str(decision))


def run_state(run_id: str, state: str, started: float | None = None) -> None:
    """Sets the run's state gauge (1 for ``state``, 0 for the others) and its start time."""
    for name in RUN_STATES:
        set_gauge("rgbatch_run_state", 1.0 if name == state else 0.0, run_id=run_id, state=name)
    if started is not None:
        set_gauge("rgbatch_run_start_time_seconds", started, run_id=run_id)


def replica_name() -> str:
    """This model replica's tag: its Ray actor id (kept across restarts), else ``pid-<pid>``."""
    import ray

    actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    return actor[:12] if actor else f"pid-{os.getpid()}"


def engine_report(worker: Any, replica: str) -> None:
    """A model replica finished a batch: its engine's slots, queue, decode rate and prefix hits.

    ``worker`` is the replica's :class:`~pipeline.model_stage.EngineWorker`; counters get what
    its cumulative :class:`~model.scheduler.EngineStats` gained since the previous report.
    """
    stats = worker.engine_stats
    used, queued = worker.load()
    now = time.perf_counter()
    with _lock:
        before = _engine_seen.get(id(worker), (worker.started, 0, 0, 0))
        seen = (now, stats.decode_steps, stats.prefix_cache_hits, stats.prefix_cache_misses)
        _engine_seen[id(worker)] = seen
    tags = {"run_id": _bound_run[0], "replica": replica}
    set_gauge("rgbatch_engine_slots", worker.max_slots, **tags)
    set_gauge("rgbatch_engine_slots_used", used, **tags)
    set_gauge("rgbatch_engine_queue_depth", queued, **tags)
    elapsed = now - before[0]
    if elapsed > 0:
        rate = max(seen[1] - before[1], 0) / elapsed
        set_gauge("rgbatch_engine_decode_steps_per_s", rate, **tags)
    inc("rgbatch_prefix_hits", seen[2] - before[2], **tags)
    inc("rgbatch_prefix_misses", seen[3] - before[3], **tags)


def observe_batch(run_id: str, stage: str, seconds: float) -> None:
    metric("rgbatch_stage_batch_seconds").observe(seconds, tags={"run_id": run_id, "stage": stage})


def timed(fn: Any, stage: str, run_id: str) -> Any:
    """``fn`` (a stage's batch function or callable class) timed per batch into
    ``rgbatch_stage_batch_seconds``; the class's processes are told the run id first."""
    if isinstance(fn, type):
        return _timed_class(fn, stage, run_id)

    @functools.wraps(fn)
    def call(batch: Any, *args: Any, **kwargs: Any) -> Any:
        bind(run_id)
        start = time.perf_counter()
        out = fn(batch, *args, **kwargs)
        observe_batch(run_id, stage, time.perf_counter() - start)
        return out

    return call


def _timed_class(cls: type, stage: str, run_id: str) -> type:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bind(run_id)
        cls.__init__(self, *args, **kwargs)

    def __call__(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = cls.__call__(self, batch, *args, **kwargs)
        observe_batch(run_id, stage, time.perf_counter() - start)
        return out

    # The same __name__ (Ray Data names its operators after it); a qualname of its own, so that
    # cloudpickle ships the subclass by value rather than a reference to the original class.
    namespace: dict[str, Callable[..., Any] | str] = {
        "__init__": __init__,
        "__call__": __call__,
        "__module__": __name__,
        "__qualname__": f"timed_{cls.__name__}",
        "__doc__": cls.__doc__ or "",
    }
    return type(cls.__name__, (cls,), namespace)


# ----------------------------------------------------------------------------------------- docs


def markdown_table(specs: tuple[MetricSpec, ...] = METRICS) -> str:
    """The metrics as a Markdown table, as docs/operations.md holds it."""
    lines = [
        "| metric (as Prometheus sees it) | type | tags | meaning |",
        "|---|---|---|---|",
    ]
    for spec in specs:
        shown = spec.series[0] if spec.kind == "counter" else spec.exported
        tags = ", ".join(f"`{t}`" for t in spec.tags)
        lines.append(f"| `{shown}` | {spec.kind} | {tags} | {spec.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
