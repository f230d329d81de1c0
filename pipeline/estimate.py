"""An estimate before the run: rows, prompt tokens, generated tokens and wall time of a job.

The corpus is sampled, never read whole: the file listing gives every file's size, a format that
keeps row counts (Parquet footers) gives the rows of up to :data:`MAX_FOOTERS` files (spread over
the size range; the others' rows go by their size at the counted files' bytes per row), and a few
hundred rows from the start of a spread of files (:data:`SAMPLE_FILES` at most, chosen across the
size range) are read by the job's reader and prompted by the job's own prompt builder (template,
chat markers, truncation, the configured tokenizer). For a format without row counts (the line
formats), the sampled files' first lines give the stored bytes per row (compressed bytes for a
compressed file), and a file's rows are its size over that; a sampled file read to its end counts
exactly.

Generated tokens are ``generation.max_new_tokens`` per row that can run (an upper bound), or a
given mean (a previous run's ``output_tokens / rows``, or the calibration's). Wall time for N
replicas comes from a throughput figure: either given (generated tokens per second per replica,
as a previous run's manifest reports ``throughput.output_tokens_per_s`` over its replicas), or
measured by :func:`calibrate`, which times what a run's actors do, on this machine:

- the start: a fresh interpreter importing what the stages' actors import (Ray, JAX and Flax,
  detoxify and torch when scoring is on), then one model replica built from the job's config
  (load, memory plan, compilation) and, when scoring is on, one toxicity scorer (checkpoint
  load); a run pays these once, before its first row. In a process that has not used them yet
  each build also imports its stage's libraries, so their import counts twice; that stands in
  for what is not modelled (Ray Data starting the actor processes on a busy node, the run's own
  sampling for its manifest estimate) and matters less the larger the corpus;
- the model: the sampled prompts run twice, once generating one token (the prompt cost per
  token) and once in full (the generated cost per token);
- toxicity: the second run's outputs scored (the cost per row).

RecurrentGemma's cost is close to linear in tokens (a fixed-size state per sequence), so
``model = (prompt_s_per_token * prompt_tokens + generated_s_per_token * generated_tokens) /
replicas`` and ``toxicity = toxicity_s_per_row * rows / toxicity.replicas``. When the model runs
on an accelerator the two stages overlap (``wall = start + max(model, toxicity)``); on CPU they
share the same cores (``wall = start + model + toxicity``). Not counted: Ray's own start, the
reader, prompt and writer stages (small beside the model), and a cluster's autoscaling.
"""

from __future__ import annotations

import dataclasses
import io
import math
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import columns as S
from pipeline.formats.base import ReadSpec

if TYPE_CHECKING:
    from model.tokenizer import Tokenizer
    from pipeline.config import JobConfig

SAMPLE_ROWS = 400
SAMPLE_FILES = 8
MAX_FOOTERS = 256  # Parquet footers read at most; the other files' rows go by their size


@dataclass(frozen=True)
class Throughput:
    """Seconds per token on one replica, and the replica's start (load and compile), seconds."""

    prompt_s_per_token: float
    generated_s_per_token: float
    start_s: float = 0.0  # import_s + model_start_s + toxicity_start_s when calibrated
    generated_mean: float | None = None  # the calibration's mean generated tokens per row
    source: str = "given"
    toxicity_s_per_row: float = 0.0  # one scorer's seconds per row (0: not measured or off)
    stages_overlap: bool = False  # the model on an accelerator: toxicity runs beside it
    import_s: float = 0.0  # a fresh interpreter importing what the stages' actors import
    model_start_s: float = 0.0  # one model replica built: load, memory plan, compilation
    toxicity_start_s: float = 0.0  # one toxicity scorer built: checkpoint load

    @classmethod
    def given(cls, generated_tokens_per_s: float) -> Throughput:
        """From a measured figure: generated tokens per second per replica, prompts included."""
        return cls(0.0, 1.0 / generated_tokens_per_s, source="given")


@dataclass(frozen=True)
class Estimate:
    """What a job is expected to take (see the module docstring)."""

    files: int
    bytes: int
    rows: int
    rows_counted: int  # rows known exactly (footers, files sampled to their end)
    sampled_rows: int
    error_fraction: float  # of the sampled rows: rows that cannot be prompted
    prompt_tokens: int
    prompt_tokens_per_row: float
    generated_tokens: int
    generated_per_row: float
    replicas: int
    wall_s: float | None = None
    throughput: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("prompt_tokens_per_row", "generated_per_row", "error_fraction"):
            data[name] = round(data[name], 4)
        if self.wall_s is not None:
            data["wall_s"] = round(self.wall_s, 1)
        return data

    def lines(self) -> list[str]:
        """The estimate as the command line prints it."""
        out = [
            f"files:            {self.files:,} ({self.bytes / 1e6:,.1f} MB)",
            f"rows:             {self.rows:,} ({self.rows_counted:,} counted, the rest from "
            f"{self.sampled_rows:,} sampled rows)",
            f"prompt tokens:    {self.prompt_tokens:,} ({self.prompt_tokens_per_row:,.1f} a row)",
            f"generated tokens: {self.generated_tokens:,} ({self.generated_per_row:,.1f} a row)",
        ]
        if self.error_fraction:
            out.append(f"error rows:       {self.error_fraction:.1%} of the sample")
        if self.wall_s is not None:
            source = (self.throughput or {}).get("source", "given")
            out.append(
                f"wall time:        {format_seconds(self.wall_s)} on {self.replicas} replica(s) "
                f"({source} throughput)"
            )
            t = self.throughput or {}
            if t.get("source") == "calibrated":
                out.append(
                    f"  of which start:  {t['start_s']:.1f} s (imports {t['import_s']:.1f} s, "
                    f"model {t['model_start_s']:.1f} s, toxicity {t['toxicity_start_s']:.1f} s)"
                )
        return out


def format_seconds(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# ---------------------------------------------------------------------------------- sampling


COMPRESSED_HEAD_BYTES = 1 << 20  # the stored bytes of a compressed file sampled for its rows


def line_head(uri: str, storage_options: Mapping[str, Any], lines: int) -> tuple[int, int, bool]:
    """(stored bytes, non-blank lines in them, whether that was the whole file) of a line
    file's head: its first ``lines`` lines, or for a compressed file the lines that its first
    :data:`COMPRESSED_HEAD_BYTES` stored bytes decompress to."""
    compression = fsspec.utils.infer_compression(uri)
    with fsspec.open(uri, "rb", **storage_options) as handle:
        if compression:
            return _compressed_head(handle.read(COMPRESSED_HEAD_BYTES), compression)
        used = seen = 0
        while seen < lines:
            line = handle.readline()
            if not line:
                return used, seen, True
            used += len(line)
            seen += bool(line.strip())
        return used, seen, handle.read(1) == b""


def _compressed_head(raw: bytes, compression: str) -> tuple[int, int, bool]:
    ended = len(raw) < COMPRESSED_HEAD_BYTES
    out = io.BytesIO()
    try:
        with fsspec.compression.compr[compression](io.BytesIO(raw)) as stream:
            while chunk := stream.read(1 << 16):
                out.write(chunk)
    except (EOFError, OSError, ValueError):  # the stream is cut at the sampled size
        pass
    text = out.getvalue()
    complete = text if ended else text[: text.rfind(b"\n") + 1]
    seen = sum(1 for line in complete.splitlines() if line.strip())
    return len(raw), seen, ended


def _spread(order: Sequence[int], n: int) -> list[int]:
    """``n`` items of ``order`` evenly spaced across it (all when ``n >= len(order)``)."""
    if n >= len(order):
        return list(order)
    step = (len(order) - 1) / max(n - 1, 1)
    return sorted({order[round(i * step)] for i in range(n)})


def sample_rows(
    config: JobConfig, files: Sequence[str], picked: Sequence[int], rows: int
) -> pa.Table:
    """The first rows of each picked file, through the job's reader (``rows`` in all)."""
    spec = dataclasses.replace(ReadSpec.from_config(config), batch_rows=max(1, rows))
    per_file = max(1, math.ceil(rows / max(len(picked), 1)))
    tables = []
    for index in picked:
        uri = files[index]
        taken = 0
        for table, _ in spec.reader_of(uri).read(uri, spec):
            tables.append(table.slice(0, per_file - taken))
            taken += tables[-1].num_rows
            if taken >= per_file:
                break
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def prompted(config: JobConfig, tokenizer: Tokenizer, table: pa.Table) -> pa.Table:
    """The sample through the job's prompt builder (its ids, token counts and error rows)."""
    from pipeline.prompts import prompt_stage
    from pipeline.stage import PlanContext

    stage = prompt_stage(config, PlanContext(tokenizer=tokenizer))
    builder = stage.fn(**stage.constructor_kwargs)
    return builder(table)


def _listing(
    config: JobConfig, files: Sequence[str] | None, sizes: Sequence[int] | None
) -> tuple[list[str], list[int], list[int]]:
    """The files, their sizes, and the files to sample (spread across the size range)."""
    from model.storage import file_sizes

    options = config.input.storage_options
    files = list(files if files is not None else config.input_files())
    if sizes is None:
        sizes = file_sizes(files, options) or [_size(uri, options) for uri in files]
    order = sorted(range(len(files)), key=lambda i: sizes[i])
    return files, list(sizes), _spread(order, SAMPLE_FILES)


def prompted_sample(
    config: JobConfig,
    tokenizer: Tokenizer,
    rows: int = SAMPLE_ROWS,
    files: Sequence[str] | None = None,
    sizes: Sequence[int] | None = None,
) -> pa.Table:
    """About ``rows`` rows from the start of the sampled files, prompted as the job prompts them."""
    files, sizes, picked = _listing(config, files, sizes)
    return prompted(config, tokenizer, sample_rows(config, files, picked, rows))


def estimate(
    config: JobConfig,
    tokenizer: Tokenizer,
    *,
    files: Sequence[str] | None = None,
    sizes: Sequence[int] | None = None,
    replicas: int | None = None,
    throughput: Throughput | None = None,
    generated_mean: float | None = None,
    rows: int = SAMPLE_ROWS,
    sample: pa.Table | None = None,
) -> Estimate:
    """The job's estimate (see the module docstring); ``sample`` reuses prompted rows."""
    options = config.input.storage_options
    files, sizes, picked = _listing(config, files, sizes)
    spec = ReadSpec.from_config(config)
    order = sorted(range(len(files)), key=lambda i: sizes[i])
    counts: list[int | None] = [None] * len(files)
    # Stored bytes per row, per format and compression (a gzipped file stores a row in fewer
    # bytes), from the footers read and the line heads sampled.
    measured: dict[tuple[str, str | None], list[int]] = {}

    def kind(i: int) -> tuple[str, str | None]:
        return spec.reader_of(files[i]).name, fsspec.utils.infer_compression(files[i])

    def add(i: int, stored: int, rows_seen: int) -> None:
        seen = measured.setdefault(kind(i), [0, 0])
        seen[0], seen[1] = seen[0] + stored, seen[1] + rows_seen

    for i in _spread(order, MAX_FOOTERS):
        counts[i] = spec.reader_of(files[i]).row_count(files[i], options)
        if counts[i] is not None:
            add(i, sizes[i], counts[i])
    lines_only = [i for i in order if counts[i] is None and kind(i) not in measured]
    per_file = max(1, math.ceil(rows / max(len(picked), 1)))
    for i in _spread(lines_only, SAMPLE_FILES):
        used, lines, ended = line_head(files[i], options, per_file)
        if ended:
            counts[i] = lines
        add(i, used, lines)
    pooled = [sum(m[0] for m in measured.values()), sum(m[1] for m in measured.values())]
    counted = sum(c for c in counts if c is not None)
    guessed = 0.0
    for i, c in enumerate(counts):
        if c is None:
            used, lines = measured.get(kind(i), pooled)
            guessed += sizes[i] * lines / used if used else 0.0
    total_rows = round(counted + guessed)
    if sample is None:
        sample = prompted(config, tokenizer, sample_rows(config, files, picked, rows))
    n = sample.num_rows
    ok = pc.is_null(sample.column(S.ERROR)) if n else pa.array([], pa.bool_())
    ok_rows = int(pc.sum(pc.cast(ok, pa.int64())).as_py() or 0) if n else 0
    tokens = sample.column(S.PROMPT_TOKENS).to_pylist() if n else []
    per_row = sum(t or 0 for t in tokens) / n if n else 0.0
    ok_fraction = ok_rows / n if n else 1.0
    if generated_mean is None and throughput is not None:
        generated_mean = throughput.generated_mean
    generated = config.generation.max_new_tokens if generated_mean is None else generated_mean
    prompt_total = per_row * total_rows
    generated_total = generated * ok_fraction * total_rows
    replicas = replicas or config.model.replicas
    wall = None
    if throughput is not None:
        model_s = (
            throughput.prompt_s_per_token * prompt_total
            + throughput.generated_s_per_token * generated_total
        ) / replicas
        toxicity_s = 0.0
        if config.toxicity.enabled:
            scored = ok_fraction * total_rows
            toxicity_s = throughput.toxicity_s_per_row * scored / config.toxicity.replicas
        work = max(model_s, toxicity_s) if throughput.stages_overlap else model_s + toxicity_s
        wall = throughput.start_s + work
    return Estimate(
        files=len(files),
        bytes=int(sum(sizes)),
        rows=total_rows,
        rows_counted=counted,
        sampled_rows=n,
        error_fraction=1.0 - ok_fraction,
        prompt_tokens=round(prompt_total),
        prompt_tokens_per_row=per_row,
        generated_tokens=round(generated_total),
        generated_per_row=generated * ok_fraction,
        replicas=replicas,
        wall_s=wall,
        throughput=dataclasses.asdict(throughput) if throughput is not None else None,
    )


def _size(uri: str, options: Mapping[str, Any]) -> int:
    from model.storage import filesystem

    fs, path = filesystem(uri, options)
    return int(fs.size(path) or 0)


# ------------------------------------------------------------------------------- calibration


def calibrate(config: JobConfig, sample: pa.Table, rows: int | None = None) -> Throughput:
    """Measures what one run's actors do on ``sample`` (prompted rows), in this process and a
    fresh interpreter (see the module docstring)."""
    from pipeline.model_stage import ModelStage
    from pipeline.request import ROW_SETTINGS, ROW_SETTINGS_TYPE

    keep = pc.is_null(sample.column(S.ERROR))
    table = sample.filter(keep)
    table = table.slice(0, rows or max(2 * _slots(config), 16))
    if table.num_rows == 0:
        raise ValueError("no sampled row can be prompted: nothing to calibrate on")
    table = table.drop_columns([c for c in (ROW_SETTINGS,) if c in table.column_names])
    scoring = config.toxicity.enabled
    import_s = cold_import_s(ACTOR_IMPORTS + (TOXICITY_IMPORTS if scoring else ()))
    started = time.perf_counter()
    stage = ModelStage(config.model, config.generation)
    model_start_s = time.perf_counter() - started
    try:
        prompt_tokens = int(pc.sum(table.column(S.PROMPT_TOKENS)).as_py() or 0)
        one = pa.array([{"max_new_tokens": 1}] * table.num_rows, ROW_SETTINGS_TYPE)
        begun = time.perf_counter()
        stage(table.append_column(ROW_SETTINGS, one))
        prefill_s = time.perf_counter() - begun
        begun = time.perf_counter()
        out = stage(table)
        full_s = time.perf_counter() - begun
    finally:
        stage.worker.close()
    toxicity_start_s, toxicity_s_per_row = _toxicity_costs(config, out) if scoring else (0.0, 0.0)
    generated = int(pc.sum(out.column(S.OUTPUT_TOKENS)).as_py() or 0)
    per_prompt = prefill_s / max(prompt_tokens, 1)
    per_generated = max(full_s - per_prompt * prompt_tokens, 0.0) / max(generated, 1)
    return Throughput(
        prompt_s_per_token=per_prompt,
        generated_s_per_token=per_generated,
        start_s=import_s + model_start_s + toxicity_start_s,
        generated_mean=generated / table.num_rows,
        source="calibrated",
        toxicity_s_per_row=toxicity_s_per_row,
        stages_overlap=config.model.gpus_per_replica > 0 or config.model.devices_given is not None,
        import_s=import_s,
        model_start_s=model_start_s,
        toxicity_start_s=toxicity_start_s,
    )


# What a model actor's process imports before its first row, and a toxicity actor's besides.
ACTOR_IMPORTS = ("ray", "jax", "flax", "model.engine", "pipeline.model_stage")
TOXICITY_IMPORTS = ("torch", "detoxify", "pipeline.toxicity")


def cold_import_s(modules: Sequence[str]) -> float:
    """Seconds a fresh interpreter takes to start and import ``modules`` (what an actor's new
    process pays before its stage is built)."""
    code = "import " + ", ".join(modules)
    begun = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)
    return time.perf_counter() - begun


def _toxicity_costs(config: JobConfig, out: pa.Table) -> tuple[float, float]:
    """(scorer start seconds, seconds per row) of one toxicity scorer on the model's outputs."""
    from pipeline.toxicity import ToxicityStage

    tox = config.toxicity
    begun = time.perf_counter()
    stage = ToxicityStage(tox, device="cuda" if tox.gpus_per_replica else "cpu")
    start_s = time.perf_counter() - begun
    begun = time.perf_counter()
    for offset in range(0, out.num_rows, tox.batch_size):
        stage(out.slice(offset, tox.batch_size))
    return start_s, (time.perf_counter() - begun) / max(out.num_rows, 1)


def _slots(config: JobConfig) -> int:
    slots = config.generation.max_slots
    return slots if isinstance(slots, int) else 64
