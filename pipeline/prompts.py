"""Prompt building: format each row's fields into the task template and tokenize, one-to-one.

:class:`PromptBuilder` is a ``pyarrow.Table -> pyarrow.Table`` callable for
``Dataset.map_batches(..., batch_format="pyarrow")``. It adds ``task``, ``prompt_ids`` (BOS first),
``prompt_tokens`` and ``prompt_truncated``, and turns rows it cannot prompt into error rows
(``missing_text``, ``empty_text``, ``not_a_string``, ``prompt_too_long``) with empty ids. Rows that
arrive with an error keep it. No row is added or dropped.

Templates are ``str.format`` strings over ``{text}``, ``{question}`` and ``{prompt}``. The task's
document field (``text`` for summarize / qa, ``prompt`` for generate) must appear exactly once and
plain (no conversion or format spec), because truncation cuts it and nothing else: the template
is split there into a prefix and a suffix, and with ``chat=True`` Gemma's chat markers wrap the
whole formatted prompt, so they go into the prefix and suffix too.

Tokenization and truncation
---------------------------
A prompt that fits is tokenized in one piece, exactly as ``Tokenizer.encode_prompt`` does. A
prompt over ``max_prompt_tokens`` (BOS counted) is, with ``truncation="head"`` or ``"tail"``,
tokenized as three segments, ``[BOS] + ids(prefix) + cut(ids(document)) + ids(suffix)``, keeping
the first or last tokens of the document that fit. Segments tokenized apart are a valid token
sequence that decodes to the concatenated text; only the pieces at the two boundaries may differ
from what one tokenization of the whole string would pick (SentencePiece never merges across the
chat markers, which are user-defined symbols, so with ``chat=True`` the outer boundaries match).
With ``truncation="error"``, or when the template alone does not fit, the row fails with
``prompt_too_long``.

Shared prefixes (qa)
--------------------
Many questions about one document share everything up to the end of the document. When the qa
template's text before ``{text}`` uses no ``{question}`` (the default template), a qa prompt is
tokenized as two segments, ``[BOS] + ids(head + document) + ids(rest)``, and ``prefix_len``
says how many leading ids (BOS, head and document) are shared: every question about the same
document gets the same prefix ids, so the engine prefills the document once and reuses its
state (``GenerationRequest.prefix_len``). The split can differ from one tokenization of the
whole prompt only in the pieces at the document's end. Only prefixes that at least two rows
of the batch share are marked: a document asked once gains nothing from a prefix state, costs a
second prefill call, and its state would take a place in the engine's prefix cache that a
document with questions still queued may need. A document cut to fit is cut to leave
room for :data:`SHARED_SUFFIX_TOKENS` after it (or its own question's, if longer), so that
questions of different lengths still share it. Other tasks, and qa templates that put the
question first, have ``prefix_len`` 0.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray

from model.tokenizer import Tokenizer
from pipeline import formats
from pipeline.columns import (
    ERROR,
    ERROR_KIND,
    PREFIX_LEN,
    PROMPT,
    PROMPT_IDS,
    PROMPT_TOKENS,
    PROMPT_TRUNCATED,
    QUESTION,
    TASK,
    TEXT,
    set_column,
)
from pipeline.config.schema import (
    DOCUMENT_PLACEHOLDER,
    PROMPT_PLACEHOLDERS,
    TASKS,
    TRUNCATIONS,
    PromptsSection,
)
from pipeline.stage import PlanContext, Stage, declares

if TYPE_CHECKING:
    from pipeline.config import JobConfig

TEMPLATE_FIELDS = (TEXT, QUESTION, PROMPT)
DOCUMENT_FIELD = DOCUMENT_PLACEHOLDER
"""The field that truncation cuts, per task."""
TASK_FIELDS = PROMPT_PLACEHOLDERS
"""The fields each task needs (its template must use them)."""
DEFAULT_TEMPLATES = {task: PromptsSection.model_fields[task].default for task in TASKS}
"""The job config's default templates (``prompts.<task>``): defined there, once."""

_SENTINEL = "\x00"
SHARED_SUFFIX_TOKENS = 64
"""qa with a shared prefix: a document cut to fit leaves this many tokens (at most a quarter
of ``max_prompt_tokens``) for the text after it, so questions up to that long share its ids."""


# ------------------------------------------------------------------------------ templates


def _escape(literal: str) -> str:
    return literal.replace("{", "{{").replace("}", "}}")


def split_template(template: str, document_field: str) -> tuple[str, str, frozenset[str]]:
    """Splits ``template`` at its one plain ``{document_field}``.

    Returns ``(prefix, suffix, fields)``: two format strings (the text before and after the
    document) and every field the template uses. Raises ValueError for unknown or positional
    fields, a document field that is missing, repeated or has a conversion / format spec.
    """
    before: list[str] = []
    after: list[str] = []
    fields: set[str] = set()
    seen = 0
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"malformed template {template!r}: {err}") from err
    for literal, name, spec, conversion in parsed:
        target = after if seen else before
        target.append(_escape(literal))
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS:
            raise ValueError(f"template field {{{name}}} is not one of {TEMPLATE_FIELDS}")
        if spec and "{" in spec:
            raise ValueError(f"template field {{{name}}} has a nested field in its format spec")
        fields.add(name)
        if name == document_field:
            if spec or conversion:
                raise ValueError(f"the document field must be a plain {{{name}}}")
            seen += 1
            continue
        target.append(
            "{"
            + name
            + (f"!{conversion}" if conversion else "")
            + (f":{spec}" if spec else "")
            + "}"
        )
    if seen != 1:
        raise ValueError(
            f"template must contain {{{document_field}}} exactly once, found it {seen} times"
        )
    return "".join(before), "".join(after), frozenset(fields)


# ------------------------------------------------------------------------------ token ids


def truncate_ids(ids: Sequence[int], budget: int, side: str) -> list[int]:
    """The first (``side="head"``) or last (``"tail"``) ``budget`` ids of ``ids``."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if side == "head":
        return list(ids[:budget])
    if side == "tail":
        return list(ids[len(ids) - budget :]) if budget < len(ids) else list(ids)
    raise ValueError(f"side must be 'head' or 'tail', got {side!r}")


def max_piece_chars(tokenizer: Tokenizer) -> int:
    """The longest piece of the vocabulary, in characters: no token decodes to more text.

    (Byte-fallback pieces like ``<0x41>`` count 6 for one byte, which only makes it looser.)
    """
    pieces = tokenizer.processor.id_to_piece(list(range(tokenizer.vocab_size)))
    return max(1, *map(len, pieces))


def _encode_unique(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """``encode_batch`` with each distinct text encoded once (prefixes repeat across rows)."""
    unique = list(dict.fromkeys(texts))
    encoded = dict(zip(unique, tokenizer.encode_batch(unique), strict=True))
    return [encoded[text] for text in texts]


# -------------------------------------------------------------------------------- columns


def _column(table: pa.Table, name: str) -> list[Any]:
    if name in table.schema.names:
        return table.column(name).to_pylist()
    return [None] * table.num_rows


# -------------------------------------------------------------------------------- builder


class PromptBuilder:
    """Builds and tokenizes the prompts of a task, one output row per input row.

    ``template`` is a ``str.format`` string (see :data:`DEFAULT_TEMPLATES`); ``chat=True`` wraps
    the formatted prompt in Gemma's chat template (for "-it" checkpoints). ``truncation`` is
    ``"head"`` / ``"tail"`` (keep the first / last document tokens that fit in
    ``max_prompt_tokens``, BOS included) or ``"error"``. ``drop`` names input columns to drop
    once the prompts are built (the input text, when nothing later needs it).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        task: str,
        template: str,
        chat: bool,
        max_prompt_tokens: int,
        truncation: str,
        drop: Sequence[str] = (),
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
        if truncation not in TRUNCATIONS:
            raise ValueError(f"unknown truncation {truncation!r}: expected one of {TRUNCATIONS}")
        if max_prompt_tokens < 2:
            raise ValueError(f"max_prompt_tokens must be >= 2, got {max_prompt_tokens}")
        if tokenizer.bos_id < 0:
            raise ValueError("the tokenizer has no BOS id")
        if chat and (tokenizer.start_of_turn_id is None or tokenizer.end_of_turn_id is None):
            raise ValueError("chat=True needs a tokenizer with <start_of_turn> / <end_of_turn>")
        self.tokenizer = tokenizer
        self.task = task
        self.template = template
        self.chat = chat
        self.max_prompt_tokens = max_prompt_tokens
        self.truncation = truncation
        self.drop = tuple(drop)
        self._document = DOCUMENT_FIELD[task]
        self._prefix, self._suffix, fields = split_template(template, self._document)
        missing = [name for name in TASK_FIELDS[task] if name not in fields]
        if missing:
            raise ValueError(f"a {task} template must use {{{'}, {'.join(missing)}}}")
        # Every field the template uses is needed: a null would be formatted as "None".
        self._needed = tuple(name for name in TEMPLATE_FIELDS if name in fields)
        # qa: the document and what precedes it may be shared by many questions (see module doc).
        head_fields = {name for _, name, _, _ in string.Formatter().parse(self._prefix) if name}
        self.shared_prefix = task == "qa" and QUESTION not in head_fields
        self._chat_head, self._chat_tail = (
            Tokenizer.chat_prompt(_SENTINEL).split(_SENTINEL) if chat else ("", "")
        )
        # Computed here, once, so that copies pickled to Ray tasks carry it.
        self._piece_chars = max_piece_chars(tokenizer)

    # ----------------------------------------------------------------------- row checks

    def _row_problem(self, values: dict[str, list[Any]], i: int) -> tuple[str, str] | None:
        for name in self._needed:
            value = values[name][i]
            if value is None:
                return "missing_text", f"missing {name}: the {self.task} task needs it"
            if not isinstance(value, str):
                return "not_a_string", f"{name} is a {type(value).__name__}, not a string"
            if not value.strip():
                return "empty_text", f"empty {name}: only whitespace"
        return None

    def _pieces(self, values: dict[str, list[Any]], i: int) -> tuple[str, str, str]:
        """(prefix text, document, suffix text) of row ``i``, chat markers included."""
        row = {name: values[name][i] for name in self._needed}
        prefix = self._chat_head + self._prefix.format(**row)
        suffix = self._suffix.format(**row) + self._chat_tail
        return prefix, row[self._document], suffix

    # ----------------------------------------------------------------------- tokenizing

    def _truncate(
        self, rows: list[int], pieces: dict[int, tuple[str, str, str]], out: _Outputs
    ) -> None:
        """Cuts the documents of ``rows`` (all over the limit) so that their prompts fit."""
        tok, limit, chars = self.tokenizer, self.max_prompt_tokens, self._piece_chars
        prefixes = _encode_unique(tok, [pieces[i][0] for i in rows])
        suffixes = _encode_unique(tok, [pieces[i][2] for i in rows])
        # Shared prefixes: a cut document leaves room for a question of up to `reserve` tokens
        # whatever this row's question, so all questions about it keep the same document ids.
        reserve = min(SHARED_SUFFIX_TOKENS, limit // 4) if self.shared_prefix else 0
        budgets = []
        for p, s in zip(prefixes, suffixes, strict=True):
            exact = limit - 1 - len(p) - len(s)
            even = limit - 1 - len(p) - max(len(s), reserve)
            budgets.append(even if even >= 0 else exact)
        docs = []
        for i, budget in zip(rows, budgets, strict=True):
            # No token covers more than `chars` characters, so this slice holds >= budget tokens
            # (or the whole document): tokenizing a huge document in full is not needed.
            keep = (max(budget, 0) + 1) * chars
            doc = pieces[i][1]
            docs.append(doc[:keep] if self.truncation == "head" else doc[-keep:])
        doc_ids = tok.encode_batch(docs)
        for k, i in enumerate(rows):
            budget = budgets[k]
            if budget < 0:
                out.fail(
                    i,
                    "prompt_too_long",
                    f"the template alone has {limit - budget} tokens, over the limit of {limit}",
                )
                continue
            kept = truncate_ids(doc_ids[k], budget, self.truncation)
            cut = len(kept) < len(doc_ids[k]) or len(docs[k]) < len(pieces[i][1])
            shared = 1 + len(prefixes[k]) + len(kept) if self.shared_prefix else 0
            out.set(
                i, [tok.bos_id, *prefixes[k], *kept, *suffixes[k]], truncated=cut, prefix=shared
            )

    def _encode_whole(
        self, rows: list[int], pieces: dict[int, tuple[str, str, str]]
    ) -> tuple[list[list[int]], list[int]]:
        """Each row's prompt ids, untruncated, and how many of them form its shared prefix."""
        tok = self.tokenizer
        if not self.shared_prefix:
            encoded = tok.encode_batch(["".join(pieces[i]) for i in rows], add_bos=True)
            return encoded, [0] * len(rows)
        # Each distinct document (with the head before it) is tokenized once per batch.
        heads = _encode_unique(tok, [pieces[i][0] + pieces[i][1] for i in rows])
        tails = _encode_unique(tok, [pieces[i][2] for i in rows])
        encoded = [[tok.bos_id, *h, *t] for h, t in zip(heads, tails, strict=True)]
        return encoded, [1 + len(h) for h in heads]

    def _encode(self, rows: list[int], values: dict[str, list[Any]], out: _Outputs) -> None:
        limit = self.max_prompt_tokens
        pieces = {i: self._pieces(values, i) for i in rows}
        texts = {i: "".join(pieces[i]) for i in rows}
        # Over limit * chars characters the prompt cannot fit: skip tokenizing it in full.
        bound = limit * self._piece_chars
        whole = [i for i in rows if len(texts[i]) <= bound]
        over = [i for i in rows if len(texts[i]) > bound]
        encoded, shared = self._encode_whole(whole, pieces)
        for i, ids, prefix in zip(whole, encoded, shared, strict=True):
            if len(ids) <= limit:
                out.set(i, ids, truncated=False, prefix=prefix)
            elif self.truncation == "error":
                out.fail(
                    i, "prompt_too_long", f"{len(ids)} prompt tokens, over the limit of {limit}"
                )
            else:
                over.append(i)
        if self.truncation != "error":
            self._truncate(sorted(over), pieces, out)
            return
        for i in over:  # only those too long to be worth tokenizing are left here
            out.fail(i, "prompt_too_long", f"prompt far over the limit of {limit} tokens")

    # --------------------------------------------------------------------------- batches

    def __call__(self, table: pa.Table) -> pa.Table:
        """Adds the prompt columns to ``table`` and marks the rows that cannot be prompted."""
        n = table.num_rows
        out = _Outputs(_column(table, ERROR), _column(table, ERROR_KIND))
        values = {name: _column(table, name) for name in self._needed}
        rows = []
        for i in range(n):
            if out.errors[i] is not None or out.kinds[i] is not None:
                continue  # an earlier stage failed the row: keep its error
            problem = self._row_problem(values, i)
            if problem is None:
                rows.append(i)
            else:
                out.fail(i, *problem)
        self._encode(rows, values, out)
        if self.shared_prefix:
            out.keep_repeated_prefixes()
        table = out.apply(table, self.task)
        return table.drop_columns([c for c in self.drop if c in table.column_names])

    def __repr__(self) -> str:
        return (
            f"PromptBuilder(task={self.task!r}, chat={self.chat}, "
            f"max_prompt_tokens={self.max_prompt_tokens}, truncation={self.truncation!r})"
        )


class _Outputs:
    """The columns ``PromptBuilder`` writes, filled row by row."""

    def __init__(self, errors: list[str | None], kinds: list[str | None]) -> None:
        n = len(errors)
        self.errors = errors
        self.kinds = kinds
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.truncated = [False] * n
        self.prefix = [0] * n
        self.failed: set[int] = set()

    def set(self, i: int, ids: list[int], *, truncated: bool, prefix: int = 0) -> None:
        self.ids[i] = ids
        self.truncated[i] = truncated
        # The engine needs at least one prompt id after the shared prefix.
        self.prefix[i] = prefix if 0 < prefix < len(ids) else 0

    def keep_repeated_prefixes(self) -> None:
        """Unmarks the prefixes no other row of the batch shares (see the module docstring)."""
        keys = {i: tuple(self.ids[i][:n]) for i, n in enumerate(self.prefix) if n}
        counts = Counter(keys.values())
        for i, key in keys.items():
            if counts[key] < 2:
                self.prefix[i] = 0

    def fail(self, i: int, kind: str, message: str) -> None:
        self.errors[i], self.kinds[i] = message, kind
        self.failed.add(i)

    def apply(self, table: pa.Table, task: str) -> pa.Table:
        n = table.num_rows
        columns = {
            ERROR: pa.array(self.errors, pa.string()),
            ERROR_KIND: pa.array(self.kinds, pa.string()),
            TASK: pa.array([task] * n, pa.string()),
            PROMPT_IDS: pa.array(self.ids, pa.list_(pa.int32())),
            PROMPT_TOKENS: pa.array([len(ids) for ids in self.ids], pa.int32()),
            PROMPT_TRUNCATED: pa.array(self.truncated, pa.bool_()),
            PREFIX_LEN: pa.array(self.prefix, pa.int32()),
        }
        for name, array in columns.items():
            table = set_column(table, name, array)
        return table


# -------------------------------------------------------------------------------- stage

_PROMPT_ADDS = (
    ERROR,
    ERROR_KIND,
    TASK,
    PROMPT_IDS,
    PROMPT_TOKENS,
    PROMPT_TRUNCATED,
    PREFIX_LEN,
)


@declares(*_PROMPT_ADDS)
def prompt_stage(config: JobConfig, context: PlanContext) -> Stage:
    """Prompt building: an autoscaling pool of CPU actors, each with its own tokenizer copy.

    The input text leaves the plan here, unless the toxicity stage scores it; a qa row's
    question stays (it tells the answers to several questions about one document apart).
    """
    gen, tox = config.generation, config.toxicity
    template, chat, truncation = config.prompt_template(), config.model.use_chat_template, None
    if formats.reader(config.input.format).prompts_ready:
        # Rows arrive as finished prompts (chat already in Gemma's markers): no template,
        # no second chat wrapping, and no cutting (it would cut the chat markers off).
        template, chat, truncation = "{prompt}", False, "error"
    keep: tuple[str, ...] = (TEXT, PROMPT) if tox.enabled and tox.score_inputs else ()
    if config.task == "qa":
        keep = (*keep, QUESTION)
    drop = tuple(c for c in TEMPLATE_FIELDS if c not in keep)
    return Stage(
        name="prompt",
        fn=PromptBuilder,
        requires=(ERROR, ERROR_KIND, *TASK_FIELDS[config.task]),
        adds=_PROMPT_ADDS,
        drops=drop,
        constructor_kwargs=dict(
            tokenizer=context.tokenizer,
            task=config.task,
            template=template,
            chat=chat,
            max_prompt_tokens=gen.max_prompt_tokens,
            truncation=truncation or gen.truncation,
            drop=drop,
        ),
        ray_args=dict(
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=gen.prompt_workers),
            num_cpus=1,
            batch_size=gen.batch_size,
        ),
    )
