"""The model stage: one RecurrentGemma replica per Ray actor, the engine inside.

The engine runs in a background thread of the actor and is fed from a queue, so that with two
concurrent calls per actor the next batch's prompts are already queued while the current batch's
last sequences finish: the accelerator does not idle between batches.

Engine failures: a step that raises fails the batches waiting on it with :class:`EngineStepError`
and resets the engine; the runner has Ray Data retry such a batch on the same actor
(``model.batch_retries``). A replica that is broken (a device out-of-memory, or
``model.max_failed_steps`` failed steps in a row) makes its actor process exit: Ray restarts the
actor, on a fresh process and device state, and retries its batches there, at most
``model.max_restarts`` times, after which the run fails.

Test hook: ``RGBATCH_FAULT_HOOK=module:function`` in a model actor's environment names a callable
run with the step number before each engine step; it may raise, to stand for a failing device.
Fault tests set it (``testkit.faults``); unset, nothing is imported or called.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray

from model.engine_config import EngineConfig
from model.grammar import ConstraintError, GrammarCache
from model.scheduler import GenerationRequest, GenerationResult
from model.tokenizer import Tokenizer
from pipeline import columns as S
from pipeline import formats, metrics
from pipeline.request import RequestSettings, row_settings
from pipeline.secrets import mask_uri
from pipeline.stage import PlanContext, Stage, declares

if TYPE_CHECKING:
    from model.engine import Engine
    from pipeline.config import JobConfig, ModelSection
    from pipeline.config.schema import GenerationSection

log = logging.getLogger(__name__)

FAULT_HOOK_ENV = "RGBATCH_FAULT_HOOK"
EXIT_BROKEN_ENGINE = 71  # the exit status of a model actor whose engine is broken

FaultHook = Callable[[int], None]


class EngineStepError(RuntimeError):
    """An engine step raised; the batches waiting on it fail with this (the cause attached).

    The runner names this class in Ray Data's retried map errors, so such a batch is retried.
    """


def is_device_oom(exc: BaseException) -> bool:
    """A device out-of-memory (XLA's RESOURCE_EXHAUSTED): retrying on the same replica is futile."""
    text = f"{type(exc).__name__}: {exc}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def fault_hook_from_env() -> FaultHook | None:
    """The test-only step hook named by ``$RGBATCH_FAULT_HOOK`` (``module:function``), or None."""
    spec = os.environ.get(FAULT_HOOK_ENV)
    if not spec:
        return None
    module, _, name = spec.partition(":")
    hook = getattr(importlib.import_module(module), name)
    log.warning("engine fault hook %s is set: for tests only", spec)
    return hook


def exit_broken_actor(exc: BaseException) -> None:
    """Ends the model actor's process so that Ray restarts it (and retries its batches)."""
    log.critical("engine broken (%s: %s): the model actor exits", type(exc).__name__, exc)
    logging.shutdown()
    os._exit(EXIT_BROKEN_ENGINE)


class EngineWorker:
    """Owns an Engine and a thread that drives it; any thread may submit a batch and wait.

    A step that raises fails every waiting future with :class:`EngineStepError` and resets the
    engine. ``on_broken`` (if given) is called instead when the failure is a device
    out-of-memory or the ``max_failed_steps``-th in a row; ``fault_hook`` runs before each step.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_failed_steps: int = 3,
        on_broken: Callable[[BaseException], None] | None = None,
        fault_hook: FaultHook | None = None,
    ) -> None:
        self._engine = engine
        self.max_failed_steps = max_failed_steps
        self._on_broken = on_broken
        self._fault_hook = fault_hook
        self.steps = 0
        self.failed_steps = 0  # in a row
        self._inbox: queue.Queue = queue.Queue()
        self.started = time.perf_counter()
        self.busy_s = 0.0  # time spent in engine.step (device work and its host side)
        self.idle_s = 0.0  # time with nothing queued or running, waiting for a batch
        self._thread = threading.Thread(target=self._loop, name="rgbatch-engine", daemon=True)
        self._thread.start()

    def run(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        futures: list[Future] = [Future() for _ in requests]
        self._inbox.put((list(requests), futures))
        return [future.result() for future in futures]

    @property
    def engine_stats(self) -> Any:
        return self._engine.stats

    def load(self) -> tuple[int, int]:
        """(slots holding a request, requests queued in the engine) at this moment."""
        scheduler = self._engine.scheduler
        return scheduler.slots_in_use, len(scheduler.pending)

    @property
    def max_slots(self) -> int:
        return self._engine.engine_config.max_slots

    @property
    def max_stop_ids(self) -> int:
        return self._engine.engine_config.max_stop_ids

    @property
    def engine_config(self) -> EngineConfig:
        return self._engine.engine_config

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        engine, outstanding = self._engine, set()
        while True:
            items = []
            try:
                if engine.busy:
                    items.append(self._inbox.get_nowait())
                else:
                    waited = time.perf_counter()
                    items.append(self._inbox.get())
                    self.idle_s += time.perf_counter() - waited
                while True:
                    items.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            for item in items:
                if item is None:
                    return
                for request, future in zip(*item, strict=True):
                    rejected = engine.submit(future, request)
                    if rejected is not None:
                        future.set_result(rejected)
                    else:
                        outstanding.add(future)
            if not engine.busy:
                continue
            try:
                stepped = time.perf_counter()
                self.steps += 1
                if self._fault_hook is not None:
                    self._fault_hook(self.steps)
                finished = engine.step()
                self.busy_s += time.perf_counter() - stepped
                self.failed_steps = 0
                for future, result in finished:
                    outstanding.discard(future)
                    future.set_result(result)
            except Exception as exc:  # a broken engine fails every waiting batch; Ray retries them
                self._failed(exc, outstanding)
                outstanding.clear()
                engine.reset()

    def _failed(self, exc: Exception, outstanding: set[Future]) -> None:
        self.failed_steps += 1
        log.error("engine step failed (%d in a row)", self.failed_steps, exc_info=exc)
        broken = is_device_oom(exc) or self.failed_steps >= self.max_failed_steps
        if broken and self._on_broken is not None:
            self._on_broken(exc)
        error = EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        for future in outstanding:
            future.set_exception(error)


def engine_options(model: ModelSection, generation: GenerationSection) -> dict[str, Any]:
    """The engine's settings from the job config: every ``generation`` field the engine takes by
    name (:class:`~model.engine_config.EngineConfig`'s fields and :class:`Engine`'s keyword
    arguments), and the replica's devices (``tensor_parallel``)."""
    from model.engine import Engine

    names = {f.name for f in dataclasses.fields(EngineConfig)}
    names |= set(inspect.signature(Engine).parameters)
    options = {n: getattr(generation, n) for n in type(generation).model_fields if n in names}
    options["tensor_parallel"] = model.replica_devices
    return options


def planned_engine_options(
    config: Any, dtype: str, engine_options: dict[str, Any], headroom: float
) -> dict[str, Any]:
    """``engine_options`` with ``max_slots: auto`` resolved, checked against the memory plan.

    Runs before the weights go to the devices: a replica that cannot fit fails here with the
    figures and the fix (a larger tensor_parallel, fewer slots), not deep inside XLA.
    """
    import jax
    import jax.numpy as jnp

    from model.memory import device_memory_limit, max_slots_that_fit, plan_memory

    n = engine_options.get("tensor_parallel", 1)
    devices = jax.local_devices()
    log.info(
        "model actor: %d %s device(s) visible (%s); the replica uses %d",
        len(devices),
        jax.default_backend(),
        ", ".join(str(d) for d in devices[:8]),
        n,
    )
    limit = device_memory_limit(devices[0])
    shapes = dict(
        dtype=jnp.dtype(dtype),
        prefill_batch=engine_options["prefill_batch"],
        prefill_chunk=engine_options["prefill_chunk"],
        tensor_parallel=n,
        device_bytes=limit,
        headroom=headroom,
    )
    options = dict(engine_options)
    if options["max_slots"] == "auto":
        if limit is None:
            raise ValueError(
                "generation.max_slots: 'auto' needs a device memory limit, and the "
                f"{jax.default_backend()} backend reports none: set a number of slots"
            )
        options["max_slots"] = max_slots_that_fit(config, **shapes)
        log.info("generation.max_slots auto: %d slots fit", options["max_slots"])
    plan = plan_memory(config, max_slots=options["max_slots"], **shapes)
    log.info("memory plan: %s", plan.summary())
    if limit is not None:
        plan.check()
    return options


class ModelStage:
    """Ray Data actor class: prompted rows in, generated rows out (one-to-one).

    Built from the job config's ``model`` and ``generation`` sections (every setting and default
    is theirs); each row's request is the job's :class:`~pipeline.request.RequestSettings` with
    the row's own settings applied (:data:`pipeline.request.ROW_SETTINGS`, when the rows have
    them).
    """

    def __init__(
        self,
        model: ModelSection,
        generation: GenerationSection,
        progress: Any = None,
        extras: bool = False,
    ) -> None:
        import jax.numpy as jnp

        from model.checkpoint import fingerprint, load_checkpoint
        from model.engine import Engine, enable_compilation_cache

        self.progress = progress  # a ProgressCounter actor handle, or None
        self.extras = extras  # add the logprob and sample columns (EXTRA_ADDS)
        self._phase("loading the model")
        if model.compilation_cache:
            enable_compilation_cache()
        ckpt = load_checkpoint(model.checkpoint, storage_options=model.storage_options)
        if ckpt.tokenizer_path is None:
            raise FileNotFoundError(f"no tokenizer.model found beside {mask_uri(model.checkpoint)}")
        self.tokenizer = Tokenizer.load(ckpt.tokenizer_path)
        chat = model.use_chat_template
        chat = ckpt.variant.endswith("-it") if chat is None else chat
        self.settings = RequestSettings.from_config(generation, chat=chat)
        self.grammar_cache = GrammarCache()
        self.model_name = f"{ckpt.variant}@{fingerprint(ckpt.params)}"
        options = planned_engine_options(
            ckpt.config, model.dtype, engine_options(model, generation), model.memory_headroom
        )
        engine = Engine(
            ckpt.config,
            ckpt.params,
            dtype=jnp.dtype(model.dtype),
            detokenize=self.tokenizer.decode,
            **options,
        )
        self._phase("compiling")
        engine.warmup()
        self._phase("generating")
        self.worker = EngineWorker(
            engine,
            max_failed_steps=model.max_failed_steps,
            on_broken=exit_broken_actor,
            fault_hook=fault_hook_from_env(),
        )
        self.replica = metrics.replica_name()
        log.info("model stage ready: %s", self.model_name)

    def _phase(self, name: str) -> None:
        """Tells the driver's progress line what this replica is doing while it starts."""
        if self.progress is not None:
            self.progress.phase.remote(name)

    def _grammars(
        self, settings: dict[int, RequestSettings], errors: list[Any], kinds: list[Any]
    ) -> dict[int, Any]:
        """Each constrained row's compiled grammar (compiled once per constraint per replica);
        a constraint that does not compile makes its row an ``invalid_constraint`` error."""
        out: dict[int, Any] = {}
        for i, row in settings.items():
            constraint = row.constraint_of()
            if constraint is None:
                continue
            try:
                out[i] = self.grammar_cache.get(constraint, self.tokenizer)
            except ConstraintError as err:
                errors[i], kinds[i] = str(err), "invalid_constraint"
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        ids = table.column(S.ID).to_pylist()
        prompts = table.column(S.PROMPT_IDS).to_pylist()
        errors = table.column(S.ERROR).to_pylist()
        kinds = table.column(S.ERROR_KIND).to_pylist()
        shared = (
            table.column(S.PREFIX_LEN).to_pylist()
            if S.PREFIX_LEN in table.column_names
            else [0] * table.num_rows
        )
        todo = [i for i, err in enumerate(errors) if err is None]
        rows = row_settings(table)
        settings = {i: self.settings.for_row(rows[i], ids[i]) for i in todo}
        grammars = self._grammars(settings, errors, kinds)
        todo = [i for i in todo if errors[i] is None]
        ec = self.worker.engine_config
        requests = [
            settings[i].engine_request(
                prompts[i],
                prefix_len=shared[i] or 0,
                stop_ids=settings[i].stop_ids(self.tokenizer, ec.max_stop_ids),
                stop_sequences=settings[i].stop_sequences(
                    self.tokenizer, ec.max_stop_sequences, ec.max_stop_length
                ),
                grammar=grammars.get(i),
            )
            for i in todo
        ]
        n = table.num_rows
        text: list[str | None] = [None] * n
        n_out = [0] * n
        reasons = ["error"] * n
        choices: list[list[dict[str, Any]] | None] = [None] * n
        for i, result in zip(todo, self.worker.run(requests), strict=True):
            reasons[i] = result.finish_reason
            if result.finish_reason == "error":
                errors[i], kinds[i] = result.error, "generation"
                continue
            samples = [self._choice(settings[i], r) for r in (result.samples or (result,))]
            first = samples[0]
            text[i], reasons[i] = first["text"], first["finish_reason"]
            n_out[i] = sum(c["output_tokens"] for c in samples)
            choices[i] = samples
        drop = [S.PROMPT_IDS, S.PREFIX_LEN, S.ERROR, S.ERROR_KIND]
        table = table.drop_columns([c for c in drop if c in table.column_names])
        columns = {
            S.OUTPUT_TEXT: pa.array(text, pa.string()),
            S.OUTPUT_TOKENS: pa.array(n_out, pa.int32()),
            S.FINISH_REASON: pa.array(reasons, pa.string()),
            S.ERROR: pa.array(errors, pa.string()),
            S.ERROR_KIND: pa.array(kinds, pa.string()),
            S.MODEL: pa.array([self.model_name] * n, pa.string()),
            S.GENERATED_AT: pa.array([time.time()] * n, pa.float64()),
        }
        if self.extras:
            columns.update(extra_columns(choices))
        for name, values in columns.items():
            table = table.append_column(name, values)
        if self.progress is not None:
            self.progress.add.remote(n, sum(n_out))
        metrics.engine_report(self.worker, self.replica)
        w, stats = self.worker, self.worker.engine_stats
        log.debug(
            "model stage: %d rows; engine busy %.1f s, idle %.1f s of %.1f s; prefill fill "
            "%.0f%%, decode fill %.0f%%; prompt tokens prefilled %d, reused %d",
            n,
            w.busy_s,
            w.idle_s,
            time.perf_counter() - w.started,
            100 * stats.prefill_fill,
            100 * stats.decode_fill(w.max_slots),
            stats.prompt_tokens,
            stats.reused_prompt_tokens,
        )
        return table

    def _choice(self, settings: RequestSettings, result: GenerationResult) -> dict[str, Any]:
        """One sample: text and token count after the stop strings, finish reason, and (when
        asked) its tokens' text, bytes, logprobs and top alternatives."""
        tok = self.tokenizer
        text, tokens, reason = settings.finish(
            tok, result.token_ids, tok.decode(result.token_ids), result.output_tokens,
            result.finish_reason,
        )  # fmt: skip
        choice: dict[str, Any] = {"text": text, "finish_reason": reason, "output_tokens": tokens}
        if result.logprobs is not None and result.top_logprobs is not None:
            ids = result.token_ids[:tokens]
            choice["logprobs"] = [
                {
                    "token": token_text(tok, t),
                    "logprob": lp,
                    "top": [[token_text(tok, a), v] for a, v in top],
                }
                for t, lp, top in zip(ids, result.logprobs, result.top_logprobs, strict=False)
            ]
        return choice


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's text as it appears in the output (SentencePiece's word marker as a space; a
    byte piece as its character when it is one on its own, else empty)."""
    piece = tokenizer.processor.id_to_piece(int(token_id))
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return bytes([int(piece[3:5], 16)]).decode("utf-8", "ignore")
    return piece.replace("\u2581", " ")


def extra_columns(choices: Sequence[list[dict[str, Any]] | None]) -> dict[str, pa.Array]:
    """The logprob and sample columns (EXTRA_ADDS) of the rows' choices (None: an error row)."""
    lps: list[list[float] | None] = []
    means: list[float | None] = []
    samples: list[list[str] | None] = []
    details: list[str | None] = []
    for row in choices:
        first = row[0] if row else None
        values = (
            [t["logprob"] for t in first["logprobs"]] if first and "logprobs" in first else None
        )
        lps.append(values)
        means.append(sum(values) / len(values) if values else None)
        samples.append([c["text"] for c in row] if row and len(row) > 1 else None)
        keep = row is not None and (len(row) > 1 or "logprobs" in row[0])
        details.append(json.dumps(row, ensure_ascii=False) if keep else None)
    return {
        S.OUTPUT_LOGPROBS: pa.array(lps, pa.list_(pa.float32())),
        S.MEAN_LOGPROB: pa.array(means, pa.float64()),
        S.OUTPUT_SAMPLES: pa.array(samples, pa.list_(pa.string())),
        S.CHOICES: pa.array(details, pa.string()),
    }


EXTRA_ADDS = (S.OUTPUT_LOGPROBS, S.MEAN_LOGPROB, S.OUTPUT_SAMPLES, S.CHOICES)


def wants_extras(config: JobConfig) -> bool:
    """Whether rows may ask for logprobs or n > 1: then the model stage adds EXTRA_ADDS."""
    gen = config.generation
    per_row = formats.reader(config.input.format).row_settings
    per_row = per_row or config.input.settings_column is not None
    return per_row or gen.logprobs is not None or gen.n > 1


MODEL_ADDS = (
    S.OUTPUT_TEXT,
    S.OUTPUT_TOKENS,
    S.FINISH_REASON,
    S.ERROR,
    S.ERROR_KIND,
    S.MODEL,
    S.GENERATED_AT,
)


@declares(*MODEL_ADDS, *EXTRA_ADDS)
def model_stage(config: JobConfig, context: PlanContext) -> Stage:
    """The model replicas: a fixed pool, one engine per actor on its accelerators.

    Two calls in flight per actor: the next batch queues into the engine while the current one
    drains, so the accelerator does not wait between batches.
    """
    model, gen = config.model, config.generation
    extras = wants_extras(config)
    return Stage(
        name="model",
        fn=ModelStage,
        requires=(S.ID, S.PROMPT_IDS, S.ERROR, S.ERROR_KIND),
        adds=MODEL_ADDS + (EXTRA_ADDS if extras else ()),
        drops=(S.PROMPT_IDS, S.PREFIX_LEN),
        constructor_kwargs=dict(
            model=model, generation=gen, progress=context.progress, extras=extras
        ),
        ray_args=dict(
            compute=ray.data.ActorPoolStrategy(
                size=model.replicas,
                max_concurrent_calls_per_actor=2,
                enable_true_multi_threading=True,
            ),
            num_gpus=model.gpus_per_replica or None,
            num_cpus=model.cpus_per_replica,
            resources=model.resources_per_replica or None,
            runtime_env=actor_env(config),
            batch_size=gen.batch_size,
            max_restarts=model.max_restarts,  # Ray Data's default is unlimited
        ),
    )


def actor_env(config: JobConfig) -> dict[str, Any] | None:
    """Environment for the model actors, set before JAX starts there.

    ``model.memory_fraction`` caps JAX's GPU preallocation; a CPU replica split over N devices
    gets N host devices.
    """
    model = config.model
    env: dict[str, str] = {}
    if model.memory_fraction is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{model.memory_fraction:g}"
    if model.devices_given is None and model.replica_devices > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        count = f"--xla_force_host_platform_device_count={model.replica_devices}"
        env["XLA_FLAGS"] = f"{flags} {count}".strip()
    return {"env_vars": env} if env else None
