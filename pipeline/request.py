"""Request settings: how one row is generated, as one typed object from the config to the engine.

:class:`RequestSettings` holds every per-request parameter (token limit, sampling, seed, stop
strings, the chat end-of-turn stop). The job's settings come from ``generation`` in the job config
(:meth:`RequestSettings.from_config`, by field name: a parameter added to both is carried without
more code). A row may carry its own values in the :data:`ROW_SETTINGS` column (a struct with one
nullable field per parameter a row may set; null keeps the job's value): a reader whose rows
carry their own settings (``Reader.row_settings``) fills it from each request body, and
``input.settings_column`` fills it the same way for any format.
The model stage applies a row's values (:meth:`RequestSettings.for_row`) and turns the result into
the engine's request (:meth:`RequestSettings.engine_request`); stop strings are applied to the
decoded text afterwards (:meth:`RequestSettings.finish`).

Rules for a row's values: ``max_new_tokens`` is capped at the job's (the job's value is the
budget); ``temperature``, ``top_k``, ``top_p``, ``stop``, ``min_tokens``, the penalties,
``logprobs`` and ``n`` replace the job's; ``seed`` is the row's exact
seed, taken modulo :data:`SEED_RANGE` (the engine's int32 seed), where a row without one draws
with a seed derived from the job's seed and the row id (:func:`row_seed`), the same in any batch
and on any replica; ``end_of_turn`` adds Gemma's ``<end_of_turn>`` to the stop ids.

Stop strings: a stop string that is exactly one piece of the vocabulary also becomes an engine
stop id (while the engine's ``max_stop_ids`` allows), so generation ends as soon as it is drawn;
the engine drops a stop id from the output. Every stop string's plain encoding is also a stop
sequence the engine matches on the device (the row stops at the token completing it), and the
engine checks the decoded text of each running row with stop strings after each decode call, so
other spellings stop the row too (at most one call's remaining steps later). The text is then cut
before the first occurrence, the finish reason is ``stop`` and the token count covers the tokens
up to the one that completed the stop string.

Structured output: ``constraint`` is a :class:`model.grammar.Constraint` as JSON text (the job's
from ``generation.structured_output``, a row's from an OpenAI ``response_format``); a row's
replaces the job's. A constrained row stops only at EOS (or ``<end_of_turn>``, which no grammar
admits): stop strings are not applied to it, so a ``stop`` output is a complete match.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from model.engine import GenerationRequest  # imports JAX: only where requests are made
    from model.tokenizer import Tokenizer
    from pipeline.config.schema import GenerationSection

ROW_SETTINGS = "request"
"""The column of per-row settings (a struct of :data:`ROW_SETTINGS_TYPE`, null: the job's)."""
SEED_RANGE = 1 << 31  # a row's own seed is taken modulo this (the engine's int32 seed)


@dataclasses.dataclass(frozen=True)
class RequestSettings:
    """The settings of one generation request (see the module docstring).

    Built from the job config by :meth:`from_config`; the fields named like ``generation``
    fields take their values (and defaults) from there, so none are repeated here.
    """

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int  # the job's: the base of each row's seed; a row's: its own seed
    stop: tuple[str, ...] = ()  # stop strings
    end_of_turn: bool = False  # also stop at <end_of_turn> (chat checkpoints and chat requests)
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: off; k: each token's logprob and the top k
    n: int = 1
    loop_ngram: int = 0
    loop_repeats: int = 8
    # Structured output: a model.grammar.Constraint as its JSON text (see constraint_of), or None.
    constraint: str | None = None

    @classmethod
    def from_config(cls, generation: GenerationSection, *, chat: bool = False) -> RequestSettings:
        """The job's settings: every field named like a ``generation`` field takes its value."""
        given = type(generation).model_fields
        values = {f.name: getattr(generation, f.name) for f in _fields() if f.name in given}
        values.setdefault("end_of_turn", chat)
        structured = getattr(generation, "structured_output", None)
        if structured is not None:
            values["constraint"] = structured.constraint().to_json()
        values["stop"] = tuple(values.get("stop", ()))
        return cls(**values)

    def for_row(self, row: Mapping[str, Any] | None, row_id: str) -> RequestSettings:
        """These (the job's) settings with the row's values applied (see the module docstring)."""
        row = row or {}
        values: dict[str, Any] = {}
        for name in ROW_SETTINGS_TYPE.names:
            value = row.get(name)
            if value is not None:
                values[name] = value
        if "max_new_tokens" in values:
            values["max_new_tokens"] = min(values["max_new_tokens"], self.max_new_tokens)
        seed = values.pop("seed", None)
        values["seed"] = row_seed(self.seed, row_id) if seed is None else seed % SEED_RANGE
        if "stop" in values:
            values["stop"] = tuple(values["stop"])
        if values.pop("end_of_turn", False):
            values["end_of_turn"] = True
        return dataclasses.replace(self, **values)

    def stop_ids(self, tokenizer: Tokenizer, limit: int) -> tuple[int, ...]:
        """EOS, ``<end_of_turn>`` when asked, then single-piece stop strings, at most ``limit``
        (none with a constraint: the grammar decides where the output ends)."""
        ids = [tokenizer.eos_id]
        extra = []
        if self.end_of_turn and tokenizer.end_of_turn_id is not None:
            extra.append(tokenizer.end_of_turn_id)
        if self.constraint is None:
            extra += single_piece_ids(tokenizer, self.stop)
        for idx in extra:
            if idx not in ids and len(ids) < limit:
                ids.append(idx)
        return tuple(ids)

    def stop_sequences(
        self, tokenizer: Tokenizer, count: int, length: int
    ) -> tuple[tuple[int, ...], ...]:
        """The stop strings as token sequences the engine matches on the device (their plain
        encoding; at most ``count``, each at most ``length`` ids). Other spellings are found by
        the engine's host check of the text, and the text is cut by :meth:`finish`."""
        seqs = [tuple(tokenizer.encode(stop)) for stop in self.stop]
        return tuple(dict.fromkeys(s for s in seqs if 0 < len(s) <= length))[:count]

    def engine_request(
        self,
        prompt_ids: Sequence[int],
        *,
        prefix_len: int,
        stop_ids: Sequence[int],
        stop_sequences: Sequence[tuple[int, ...]] = (),
        grammar: Any = None,
    ) -> GenerationRequest:
        """The engine's request: every field the engine's request shares with these settings,
        the stop strings as ``stop_strings`` (the engine's host check) and ``stop_sequences``,
        and ``grammar`` (this row's compiled constraint, see :meth:`constraint_of`; a
        constrained row gets no stop strings or sequences: the grammar decides its end)."""
        from model.engine import GenerationRequest

        shared = {f.name for f in dataclasses.fields(GenerationRequest)} & _names()
        values = {name: getattr(self, name) for name in shared}
        loop = {} if self.loop_ngram else {"loop_ngram": 0, "loop_repeats": 0}
        return GenerationRequest(
            prompt_ids,
            prefix_len=prefix_len,
            stop_ids=tuple(stop_ids),
            stop_sequences=tuple(stop_sequences) if grammar is None else (),
            stop_strings=self.stop if grammar is None else (),
            grammar=grammar,
            **{**values, **loop},
        )

    def constraint_of(self) -> Any:
        """The row's :class:`model.grammar.Constraint`, or None."""
        if self.constraint is None:
            return None
        from model.grammar import Constraint

        return Constraint.from_json(self.constraint)

    def finish(
        self, tokenizer: Tokenizer, token_ids: Sequence[int], text: str, tokens: int, reason: str
    ) -> tuple[str, int, str]:
        """(text, output tokens, finish reason) once the stop strings are applied to the text."""
        cut = cut_at_stop(text, self.stop) if self.stop and self.constraint is None else None
        if cut is None:
            return text, tokens, reason
        # The fewest tokens whose text holds a stop string (their text only grows with more).
        low, high = 1, len(token_ids)
        while low < high:
            mid = (low + high) // 2
            if cut_at_stop(tokenizer.decode(token_ids[:mid]), self.stop) is None:
                low = mid + 1
            else:
                high = mid
        return text[:cut], high, "stop"


ROW_SETTINGS_TYPE = pa.struct(
    [
        pa.field("max_new_tokens", pa.int32()),
        pa.field("temperature", pa.float64()),
        pa.field("top_p", pa.float64()),
        pa.field("seed", pa.int64()),
        pa.field("stop", pa.list_(pa.string())),
        pa.field("end_of_turn", pa.bool_()),
        pa.field("constraint", pa.string()),
        pa.field("top_k", pa.int32()),
        pa.field("min_tokens", pa.int32()),
        pa.field("presence_penalty", pa.float64()),
        pa.field("frequency_penalty", pa.float64()),
        pa.field("repetition_penalty", pa.float64()),
        pa.field("logprobs", pa.int32()),
        pa.field("n", pa.int32()),
    ]
)
"""The settings a row may set (a subset of :class:`RequestSettings`' fields, by name)."""


def _fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(RequestSettings)


def _names() -> set[str]:
    return {f.name for f in _fields()}


def row_seed(base_seed: int, row_id: str) -> int:
    """A per-row sampling seed: the same row gets the same draw in any batch, on any replica."""
    digest = hashlib.sha256(f"{base_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def single_piece_ids(tokenizer: Tokenizer, stops: Sequence[str]) -> list[int]:
    """The ids of the stop strings that are exactly one piece of the vocabulary."""
    ids = []
    for stop in stops:
        idx = int(tokenizer.processor.piece_to_id(stop))
        if idx != tokenizer.unk_id and tokenizer.processor.id_to_piece(idx) == stop:
            ids.append(idx)
    return ids


def cut_at_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def row_settings(table: pa.Table) -> list[dict[str, Any] | None]:
    """The per-row settings of ``table`` (None for each row when it has no such column)."""
    if ROW_SETTINGS not in table.column_names:
        return [None] * table.num_rows
    return table.column(ROW_SETTINGS).to_pylist()
