"""Run summaries: what the manifest counts and the report plots, gathered while rows flow.

The writer computes one :class:`RunSummary` for every part it writes (kept rows and rejected rows
together) and stores it beside the part as ``_stats/<part name>.json``. The three files share the
part's name prefix, so Ray Data's resume rolls them back together when a write was not committed.
At the end of a run the summaries are merged (in Ray tasks, a bounded fan-in) into one: the driver
never reads an output part, and nothing in a summary grows with the number of rows:

- counts: rows, rejected rows, rows in the format's error file, tokens, finish reasons, error
  kinds, toxicity decisions, models;
- the input files that could not be read (in full), with why (grows with such files only);
- rows per input file (grows with the number of files, not rows);
- histograms: exact prompt / output lengths (bounded by the token limits), toxicity scores in
  fixed bins per label;
- one example message per error kind and a fixed-size sample of rows, chosen by the smallest hash
  of the row id, so the sample is the same whatever order the parts are merged in.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import columns as S

TOXICITY_BINS = 20
SAMPLE_ROWS = 5
SAMPLE_CHARS = 2000  # sample texts are clipped when gathered: a summary stays small
EXAMPLE_CHARS = 500
SAMPLE_COLUMNS = (S.ID, S.OUTPUT_TEXT, S.FINISH_REASON, S.ERROR)
DROP = "drop"
UNREADABLE_FILE = "unreadable_file"  # the error kind of a file's row saying it cannot be read


def is_score_column(name: str) -> bool:
    """``toxicity_<label>`` (output scores), not the decision column."""
    return name.startswith(S.TOXICITY_PREFIX) and name != S.TOXICITY_DECISION


@dataclass
class RunSummary:
    """Counts and figures of a set of rows; :meth:`merge` adds another set's."""

    threshold: float | None = None
    rows: int = 0
    rejected: int = 0
    error_file: int = 0  # rows the output format sent to its error file (pipeline.formats)
    parts: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    truncated: int = 0
    toxic: int = 0
    finish_reasons: Counter = field(default_factory=Counter)
    error_kinds: Counter = field(default_factory=Counter)
    decisions: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    rows_per_source: Counter = field(default_factory=Counter)
    prompt_lengths: Counter = field(default_factory=Counter)  # length -> rows
    output_lengths: Counter = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    toxicity: dict[str, list[int]] = field(default_factory=dict)  # label -> rows per bin
    toxicity_unscored: Counter = field(default_factory=Counter)  # label -> rows without a score
    toxicity_over: Counter = field(default_factory=Counter)  # label -> scores >= threshold
    samples: list[dict[str, Any]] = field(default_factory=list)  # with a "_key" each
    unreadable: dict[str, str] = field(default_factory=dict)  # file -> why it is unreadable

    # Building -------------------------------------------------------------------------------------

    @classmethod
    def of_table(cls, table: pa.Table, threshold: float | None = None) -> RunSummary:
        """The summary of one batch of output rows (rows the policy dropped included)."""
        summary = cls(threshold=threshold)
        summary.parts = 1
        if table.num_rows == 0:
            return summary
        names = set(table.column_names)
        summary.rows = table.num_rows
        summary.prompt_tokens = _sum(table, S.PROMPT_TOKENS)
        summary.output_tokens = _sum(table, S.OUTPUT_TOKENS)
        summary.truncated = _sum(table, S.PROMPT_TRUNCATED)
        summary.toxic = _sum(table, S.TOXIC)
        for name, counter in (
            (S.FINISH_REASON, summary.finish_reasons),
            (S.ERROR_KIND, summary.error_kinds),
            (S.TOXICITY_DECISION, summary.decisions),
            (S.MODEL, summary.models),
            (S.SOURCE, summary.rows_per_source),
        ):
            if name in names:
                counter.update(value_counts(table.column(name)))
        summary.rejected = summary.decisions.get(DROP, 0)
        for name, counter in (
            (S.PROMPT_TOKENS, summary.prompt_lengths),
            (S.OUTPUT_TOKENS, summary.output_lengths),
        ):
            if name in names:
                values = np.clip(_ints(table.column(name)), 0, None)
                keys, counts = np.unique(values, return_counts=True)
                counter.update(dict(zip(keys.tolist(), counts.tolist(), strict=True)))
        if S.ERROR_KIND in names and S.ERROR in names:
            summary._add_examples(table)
            if UNREADABLE_FILE in summary.error_kinds and S.SOURCE in names:
                summary._add_unreadable(table)
        for name in table.column_names:
            if is_score_column(name):
                summary._add_scores(name[len(S.TOXICITY_PREFIX) :], table.column(name))
        summary._add_samples(table)
        return summary

    def _add_examples(self, table: pa.Table) -> None:
        kinds = table.column(S.ERROR_KIND)
        for kind in value_counts(kinds):
            index = pc.index(pc.cast(kinds, pa.string()), kind).as_py()
            message = table.column(S.ERROR)[index].as_py() if index >= 0 else None
            if message is not None:
                self.error_examples[kind] = clip(str(message), EXAMPLE_CHARS)

    def _add_unreadable(self, table: pa.Table) -> None:
        rows = table.filter(pc.equal(table.column(S.ERROR_KIND), UNREADABLE_FILE))
        for source, message in zip(
            rows.column(S.SOURCE).to_pylist(), rows.column(S.ERROR).to_pylist(), strict=True
        ):
            self.unreadable[str(source)] = clip(str(message), EXAMPLE_CHARS)

    def _add_scores(self, label: str, column: pa.ChunkedArray) -> None:
        scores = _floats(column)
        finite = np.clip(scores[np.isfinite(scores)], 0.0, 1.0)
        self.toxicity_unscored[label] += len(scores) - len(finite)
        bins = np.histogram(finite, bins=TOXICITY_BINS, range=(0.0, 1.0))[0]
        self.toxicity[label] = bins.astype(int).tolist()
        if self.threshold is not None:
            self.toxicity_over[label] += int(np.count_nonzero(finite >= self.threshold))

    def _add_samples(self, table: pa.Table) -> None:
        if S.ID not in table.column_names:
            return
        ids = table.column(S.ID).to_pylist()
        keys = [sample_key(row_id) for row_id in ids]
        chosen = sorted(range(len(ids)), key=keys.__getitem__)[:SAMPLE_ROWS]
        columns = [c for c in SAMPLE_COLUMNS if c in table.column_names]
        rows = table.select(columns).take(pa.array(chosen, pa.int64())).to_pylist()
        for index, row in zip(chosen, rows, strict=True):
            row = {k: clip(v, SAMPLE_CHARS) if isinstance(v, str) else v for k, v in row.items()}
            row["_key"] = keys[index]
            self.samples.append(row)

    # Merging --------------------------------------------------------------------------------------

    def merge(self, other: RunSummary) -> RunSummary:
        """Adds ``other`` into this summary (in place) and returns it."""
        if self.threshold is None:
            self.threshold = other.threshold
        for name in ("rows", "rejected", "error_file", "parts", "prompt_tokens", "output_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.truncated += other.truncated
        self.toxic += other.toxic
        for name in (
            "finish_reasons",
            "error_kinds",
            "decisions",
            "models",
            "rows_per_source",
            "prompt_lengths",
            "output_lengths",
            "toxicity_unscored",
            "toxicity_over",
        ):
            getattr(self, name).update(getattr(other, name))
        for kind, message in other.error_examples.items():
            self.error_examples.setdefault(kind, message)
        self.unreadable.update(other.unreadable)
        for label, bins in other.toxicity.items():
            mine = self.toxicity.setdefault(label, [0] * TOXICITY_BINS)
            self.toxicity[label] = [a + b for a, b in zip(mine, bins, strict=True)]
        self.samples = sorted(self.samples + other.samples, key=lambda r: r["_key"])[:SAMPLE_ROWS]
        return self

    @classmethod
    def merged(cls, summaries: Iterable[RunSummary], threshold: float | None = None) -> RunSummary:
        total = cls(threshold=threshold)
        for summary in summaries:
            total.merge(summary)
        return total

    # JSON -----------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, Counter):
                value = {str(k): v for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
            data[name] = value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        summary = cls()
        for name, value in data.items():
            if name not in cls.__dataclass_fields__:
                continue
            current = getattr(summary, name)
            if isinstance(current, Counter):
                as_int = name in ("prompt_lengths", "output_lengths")
                value = Counter({int(k) if as_int else k: int(v) for k, v in value.items()})
            setattr(summary, name, value)
        return summary

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), ensure_ascii=False, default=str).encode()

    @classmethod
    def loads(cls, raw: bytes) -> RunSummary:
        return cls.from_json(json.loads(raw))

    # What the manifest shows ----------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "rows_written": self.rows - self.rejected - self.error_file,
            "rows_rejected": self.rejected,
            "rows_in_error_file": self.error_file,
            "unreadable_files": len(self.unreadable),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "prompts_truncated": self.truncated,
            "finish_reasons": dict(sorted(self.finish_reasons.items())),
            "error_kinds": dict(sorted(self.error_kinds.items())),
            "toxicity_decisions": dict(sorted(self.decisions.items())),
            "toxic": self.toxic,
        }


def sample_key(row_id: Any) -> str:
    return hashlib.blake2b(str(row_id).encode(), digest_size=8).hexdigest()


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def value_counts(column: pa.ChunkedArray | pa.Array) -> Counter:
    values = column.drop_null()
    if len(values) == 0:
        return Counter()
    return Counter(
        {str(item["values"]): item["counts"] for item in pc.value_counts(values).to_pylist()}
    )


def _sum(table: pa.Table, name: str) -> int:
    if name not in table.column_names:
        return 0
    value = pc.sum(pc.cast(table.column(name), pa.int64())).as_py()
    return int(value or 0)


def _ints(column: pa.ChunkedArray) -> np.ndarray:
    values = column.drop_null()
    if len(values) == 0 or not (
        pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
    ):
        return np.zeros(0, dtype=np.int64)
    array = np.asarray(values.to_numpy(), dtype=np.float64)
    return array[np.isfinite(array)].astype(np.int64)


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """Float64 values with nulls as NaN (non-numeric columns count as all null)."""
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        return np.full(len(column), np.nan)
    return np.asarray(
        pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64
    )
