"""Readers: Parquet and JSONL corpora (local or any fsspec URI) into rows of ``READ_SCHEMA``.

Each input row becomes exactly one output row with the columns of
:data:`pipeline.columns.READ_SCHEMA` followed by the configured passthrough columns, except with
``expand_questions`` (the qa task) where a question column holding a list becomes one row per
question, ids ``<id>/q<k>``, next to each other. A row that
cannot be read properly (a JSONL line that is not UTF-8 or not a JSON object, a mapped column
holding something other than a string) still comes out, with ``error`` / ``error_kind`` set.
Blank JSONL lines are the one exception: they are not rows and are skipped. OpenAI batch files
(``fmt="openai_batch"``, JSONL of requests) follow the same line rules, with the columns and ids
of :mod:`pipeline.openai_batch` (``custom_id`` is the id; no id column or passthrough).

Ids
---
With ``id_column`` set, a row's id is that column's value as a string (``str`` for strings and
integers, canonical JSON for anything else). Otherwise, and for a row whose id value is null,
blank or absent (that row also gets ``error_kind="missing_id"`` with a "missing id" message:
ERROR_KINDS has no id-specific kind), the id is derived::

    sha256(source + "\\n" + str(position) + "\\n" + content).hexdigest()[:24]

``source`` is the file URI as the caller passed it, with any userinfo and query string masked
(:func:`pipeline.secrets.mask_uri`: the ``source`` column never carries a credential), ``position`` the 0-based line number
in the (decompressed) JSONL file, blank lines included, or the 0-based row number in the Parquet
file, and ``content`` the raw bytes of the JSONL line (without its line break) or the canonical
JSON (sorted keys, compact) of the Parquet row: all of the file's columns when no ``id_column``
is configured, the columns read otherwise. The position makes duplicate rows of one file get
distinct ids; the source makes equal rows of different files distinct. The same file read with
the same URI always gives the same ids, which is what Ray Data's resume (it filters rows by id)
needs; pass URIs in a canonical form (full ``s3://`` URIs, absolute local paths) so that reruns
from another working directory match.

Ray Data
--------
:class:`CorpusDatasource` reads a list of files with one read task per group of files, so the
ids exist at Read time (the checkpoint filter of Ray Data's resume runs right after the Read)::

    ds = ray.data.read_datasource(CorpusDatasource(files, fmt="jsonl", id_column="id"))
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import openai_batch
from pipeline.columns import (
    ERROR,
    ERROR_KIND,
    ID,
    PROMPT,
    QUESTION,
    READ_SCHEMA,
    ROW_KEY,
    SOURCE,
    TEXT,
)
from pipeline.config.schema import INPUT_FORMATS, infer_format
from pipeline.secrets import mask_uri

DEFAULT_BATCH_ROWS = 4096
DEFAULT_MAX_ROW_BYTES = 32 << 20
ID_HEX_CHARS = 24

# Rough in-memory size per on-disk byte, for Ray's block-size planning.
_INMEMORY_FACTOR = {"jsonl": 1.0, "jsonl.gz": 5.0, "parquet": 3.0, openai_batch.FORMAT: 1.0}
_RESERVED = frozenset(READ_SCHEMA.names)
_MAPPED = (TEXT, QUESTION, PROMPT)


# ------------------------------------------------------------------------------------ spec


@dataclass(frozen=True)
class _Spec:
    """How to turn one file into rows; small and picklable, shipped to Ray read tasks."""

    fmt: str | None
    id_column: str | None
    columns: dict[str, str]  # output column (text/question/prompt) -> input column
    passthrough: tuple[str, ...]
    storage_options: dict[str, Any] = field(default_factory=dict)
    batch_rows: int = DEFAULT_BATCH_ROWS
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
    expand_questions: bool = False  # a list in the question column: one row per question

    def format_of(self, uri: str) -> str:
        fmt = self.fmt or infer_format(uri)
        if fmt not in INPUT_FORMATS:
            raise ValueError(
                f"cannot tell the format of {mask_uri(uri)!r}: pass fmt= one of {INPUT_FORMATS}"
                if fmt is None
                else f"unknown format {fmt!r}: expected one of {INPUT_FORMATS}"
            )
        return fmt


def _make_spec(
    fmt: str | None,
    id_column: str | None,
    text_column: str,
    question_column: str,
    prompt_column: str,
    passthrough: Sequence[str],
    storage_options: dict[str, Any] | None,
    batch_rows: int,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    expand_questions: bool = False,
) -> _Spec:
    if fmt is not None and fmt not in INPUT_FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {INPUT_FORMATS}")
    if isinstance(passthrough, str):
        raise TypeError("passthrough must be a sequence of column names, not a string")
    if fmt == openai_batch.FORMAT and (id_column is not None or passthrough):
        raise ValueError(
            "openai_batch input takes no id_column (custom_id is the id) or passthrough"
        )
    names = tuple(passthrough)
    clash = sorted(_RESERVED.intersection(names))
    if clash:
        raise ValueError(f"passthrough columns clash with reader columns: {clash}")
    if len(set(names)) != len(names):
        raise ValueError(f"passthrough columns repeat: {list(names)}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    columns = {TEXT: text_column, QUESTION: question_column, PROMPT: prompt_column}
    if max_row_bytes < 1:
        raise ValueError(f"max_row_bytes must be >= 1, got {max_row_bytes}")
    options = dict(storage_options or {})
    return _Spec(
        fmt, id_column, columns, names, options, batch_rows, max_row_bytes, expand_questions
    )


# ------------------------------------------------------------------------------ row pieces


def _canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_fallback
    )


def _json_fallback(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def derive_id(source: str, position: int, content: bytes) -> str:
    """The derived row id: sha256 of source, position and content, first 24 hex chars."""
    digest = hashlib.sha256(f"{source}\n{position}\n".encode())
    digest.update(content)
    return digest.hexdigest()[:ID_HEX_CHARS]


def row_key(source: str, position: int) -> str:
    """The resume key of a row: its file (hashed) and position there; unique and stable."""
    return f"{hashlib.sha256(source.encode()).hexdigest()[:16]}-{position}"


def id_key(value: Any) -> str | None:
    """An id value with its type: ``42`` and ``"42"`` are different ids (None for no id)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return "s:" + value
    if isinstance(value, int) and not isinstance(value, bool):
        return f"i:{value}"
    return "j:" + _canonical_json(value)


def _id_text(value: Any) -> str | None:
    """The id for an id-column value; None for null or blank (those rows get a derived id)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _canonical_json(value)


def _passthrough_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=_json_fallback)


class _Rows:
    """Column-wise accumulator for the fixed columns of one output batch."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.ids: list[str] = []
        self.keys: list[str] = []
        self.id_keys: list[str | None] = []
        self.mapped: dict[str, list[str | None]] = {name: [] for name in _MAPPED}
        self.errors: list[str | None] = []
        self.kinds: list[str | None] = []
        self.question_lists: dict[int, list[Any]] = {}  # row -> its questions, when a list

    def __len__(self) -> int:
        return len(self.ids)

    def table(self, passthrough: dict[str, pa.Array]) -> pa.Table:
        n = len(self.ids)
        columns = {
            ID: self.ids,
            ROW_KEY: self.keys,
            SOURCE: [self.source] * n,
            ERROR: self.errors,
            ERROR_KIND: self.kinds,
            **self.mapped,
        }
        arrays = [pa.array(columns[f.name], f.type) for f in READ_SCHEMA]
        fields = list(READ_SCHEMA)
        for name, array in passthrough.items():
            arrays.append(array)
            fields.append(pa.field(name, array.type))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    def keyed(self, passthrough: dict[str, pa.Array]) -> tuple[pa.Table, list[str | None]]:
        """The batch's table and typed id keys, rows holding a list of questions expanded."""
        return _expand_questions(self.table(passthrough), self.id_keys, self.question_lists)


def _expand_questions(
    table: pa.Table, id_keys: list[str | None], lists: dict[int, list[Any]]
) -> tuple[pa.Table, list[str | None]]:
    """One row per question for the rows in ``lists``, in place of the row and in list order.

    Question ``k`` of row ``id`` gets id ``<id>/q<k>`` (0-based) and row key ``<row key>/q<k>``,
    and copies every other column. A non-string question gets a ``not_a_string`` error; an empty
    list leaves the row as it is with an ``empty_text`` error.
    """
    if not lists:
        return table, id_keys
    ids, keys = table.column(ID).to_pylist(), table.column(ROW_KEY).to_pylist()
    questions = table.column(QUESTION).to_pylist()
    errors, kinds = table.column(ERROR).to_pylist(), table.column(ERROR_KIND).to_pylist()
    take: list[int] = []
    out: dict[str, list[Any]] = {name: [] for name in (ID, ROW_KEY, QUESTION, ERROR, ERROR_KIND)}
    out_keys: list[str | None] = []

    def emit(i: int, suffix: str, question: Any, problem: tuple[str, str] | None) -> None:
        take.append(i)
        out[ID].append(ids[i] + suffix)
        out[ROW_KEY].append(keys[i] + suffix)
        out_keys.append(None if id_keys[i] is None else id_keys[i] + suffix)
        out[QUESTION].append(question)
        found = [(kinds[i], errors[i])] if errors[i] is not None else []
        error, kind = _join_errors([*found, *([problem] if problem else [])])
        out[ERROR].append(error)
        out[ERROR_KIND].append(kind)

    for i in range(table.num_rows):
        items = lists.get(i)
        if items is None:
            emit(i, "", questions[i], None)
        elif not items:
            emit(i, "", None, ("empty_text", "the question column holds an empty list"))
        for k, item in enumerate(items or ()):
            if isinstance(item, str):
                emit(i, f"/q{k}", item, None)
            else:
                message = f"question {k} of the list holds {type(item).__name__}, not a string"
                emit(i, f"/q{k}", None, ("not_a_string", message))
    expanded = table.take(pa.array(take, pa.int64()))
    for name, values in out.items():
        index = expanded.schema.get_field_index(name)
        expanded = expanded.set_column(index, name, pa.array(values, READ_SCHEMA.field(name).type))
    return expanded, out_keys


def _missing_id(id_column: str) -> tuple[str, str]:
    return "missing_id", f"missing id: column {id_column!r} is absent, null or blank"


def _join_errors(errors: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """One message for all of a row's problems; the first one's kind."""
    if not errors:
        return None, None
    return "; ".join(message for _, message in errors), errors[0][0]


# ----------------------------------------------------------------------------------- JSONL


def _parse_line(raw: bytes, position: int) -> tuple[dict[str, Any] | None, str, str]:
    """(object, error_kind, message); the object is None when the line is unusable."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, "invalid_utf8", f"line {position + 1} is not UTF-8: {err.reason}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, "invalid_json", f"line {position + 1} is not JSON: {err.msg}"
    except RecursionError:
        return None, "invalid_json", f"line {position + 1} nests JSON too deeply to parse"
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        return None, "invalid_json", f"line {position + 1} is a JSON {kind}, not an object"
    if b"\\ud" in raw.lower() and not _encodable(obj):
        # Valid JSON, but an unpaired "\\ud800" is no UTF-8 text, and Arrow would refuse it.
        return None, "invalid_utf8", f"line {position + 1} holds an unpaired surrogate escape"
    return obj, "", ""


def _encodable(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _add_jsonl_row(
    rows: _Rows,
    spec: _Spec,
    raw: bytes,
    position: int,
    passthrough: dict[str, list[Any]],
    too_large: int | None = None,
) -> None:
    """Adds one line's row; ``too_large`` is the size of a line over the limit (``raw`` then
    holds its first bytes only, and the row is an error)."""
    if too_large is not None:
        parsed, kind, message = None, *_too_large(position, too_large, spec.max_row_bytes)
    else:
        parsed, kind, message = _parse_line(raw, position)
    errors: list[tuple[str, str]] = [(kind, message)] if parsed is None else []
    obj = parsed or {}
    for out_name, in_name in spec.columns.items():
        value = obj.get(in_name)
        if out_name == QUESTION and spec.expand_questions and isinstance(value, list):
            rows.question_lists[len(rows.ids)] = value
            value = None
        if value is not None and not isinstance(value, str):
            errors.append(
                ("not_a_string", f"column {in_name!r} holds {type(value).__name__}, not a string")
            )
            value = None
        rows.mapped[out_name].append(value)
    row_id = key = None
    if spec.id_column is not None:
        value = obj.get(spec.id_column)
        row_id, key = _id_text(value), id_key(value)
        if row_id is None and parsed is not None:
            errors.append(_missing_id(spec.id_column))
    rows.ids.append(row_id if row_id is not None else derive_id(rows.source, position, raw))
    rows.keys.append(row_key(rows.source, position))
    rows.id_keys.append(key)
    for name in spec.passthrough:
        passthrough[name].append(_passthrough_text(obj.get(name)))
    error, error_kind = _join_errors(errors)
    rows.errors.append(error)
    rows.kinds.append(error_kind)


def _lines(handle: Any, limit: int) -> Iterator[tuple[int, bytes, int | None]]:
    """(position, line without its break, size when over ``limit`` else None) of a byte stream.

    A line over ``limit`` bytes is never held whole: its first KiB is kept and the rest skipped.
    """
    reader = io.BufferedReader(handle, buffer_size=1 << 20)
    position = 0
    while True:
        line = reader.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            size, head = len(line), line[:1024]
            while line and not line.endswith(b"\n"):
                line = reader.readline(1 << 20)
                size += len(line)
            yield position, head, size - (1 if line.endswith(b"\n") else 0)
        else:
            yield position, line.rstrip(b"\r\n"), None
        position += 1


def _row_lines(uri: str, spec: _Spec) -> Iterator[tuple[int, bytes, int | None]]:
    """The lines of a JSONL file that are rows: :func:`_lines` without a leading byte order
    mark, blank lines skipped (a line over the limit is a row, whatever it holds)."""
    with fsspec.open(uri, "rb", compression="infer", **spec.storage_options) as f:
        for position, raw, too_large in _lines(f, spec.max_row_bytes):
            if position == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark
            if too_large is None and not raw.strip():
                continue
            yield position, raw, too_large


def _too_large(position: int, size: int, limit: int) -> tuple[str, str]:
    """(error kind, message) of a line of ``size`` bytes, over ``limit``."""
    return (
        "row_too_large",
        f"line {position + 1} has {size} bytes, over input.max_row_bytes ({limit})",
    )


def _iter_jsonl(uri: str, spec: _Spec) -> Iterator[tuple[pa.Table, list[str | None]]]:
    def flush() -> tuple[pa.Table, list[str | None]]:
        arrays = {name: pa.array(values, pa.string()) for name, values in passthrough.items()}
        return rows.keyed(arrays)

    rows = _Rows(mask_uri(uri))
    passthrough: dict[str, list[Any]] = {name: [] for name in spec.passthrough}
    for position, raw, too_large in _row_lines(uri, spec):
        _add_jsonl_row(rows, spec, raw, position, passthrough, too_large)
        if len(rows) >= spec.batch_rows:
            yield flush()
            rows = _Rows(mask_uri(uri))
            passthrough = {name: [] for name in spec.passthrough}
    if len(rows):
        yield flush()


def _iter_openai_batch(uri: str, spec: _Spec) -> Iterator[tuple[pa.Table, list[str | None]]]:
    """An OpenAI batch file: one row per non-blank line (see :mod:`pipeline.openai_batch`)."""
    source = mask_uri(uri)
    rows = openai_batch.RequestRows(source)
    for position, raw, too_large in _row_lines(uri, spec):
        if too_large is not None:
            obj, kind, message = None, *_too_large(position, too_large, spec.max_row_bytes)
        else:
            obj, kind, message = _parse_line(raw, position)
        rows.add(
            obj,
            (kind, message) if obj is None else None,
            derived_id=derive_id(source, position, raw),
            key=row_key(source, position),
            position=position,
        )
        if len(rows) >= spec.batch_rows:
            yield rows.flush()
    if len(rows):
        yield rows.flush()


# --------------------------------------------------------------------------------- Parquet


def _is_string_type(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_string_view(dtype)
    )


def _mapped_from_parquet(
    batch: pa.RecordBatch, in_name: str, errors: list[list[tuple[str, str]]]
) -> list[str | None]:
    if in_name not in batch.schema.names:
        return [None] * batch.num_rows
    column = batch.column(in_name)
    if _is_string_type(column.type):
        return column.cast(pa.string()).to_pylist()
    if not pa.types.is_null(column.type):
        message = f"column {in_name!r} holds {column.type}, not a string"
        for i in pc.indices_nonzero(column.is_valid()).to_pylist():
            errors[i].append(("not_a_string", message))
    return [None] * batch.num_rows


def _ids_from_parquet(
    batch: pa.RecordBatch,
    spec: _Spec,
    source: str,
    start: int,
    errors: list[list[tuple[str, str]]],
) -> list[str]:
    if spec.id_column is not None and spec.id_column in batch.schema.names:
        values: list[Any] = batch.column(spec.id_column).to_pylist()
    else:
        values = [None] * batch.num_rows
    ids: list[str] = []
    records: list[dict[str, Any]] | None = None
    for i, value in enumerate(values):
        row_id = _id_text(value)
        if row_id is not None:
            ids.append(row_id)
            continue
        if spec.id_column is not None:
            errors[i].append(_missing_id(spec.id_column))
        if records is None:
            records = batch.to_pylist()
        content = _canonical_json(records[i]).encode()
        ids.append(derive_id(source, start + i, content))
    return ids


def _parquet_table(
    batch: pa.RecordBatch, spec: _Spec, source: str, start: int
) -> tuple[pa.Table, list[str | None]]:
    rows = _Rows(source)
    errors: list[list[tuple[str, str]]] = [[] for _ in range(batch.num_rows)]
    for out_name, in_name in spec.columns.items():
        column = batch.column(in_name) if in_name in batch.schema.names else None
        listed = column is not None and (
            pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
        )
        if out_name == QUESTION and spec.expand_questions and listed:
            values = column.to_pylist()
            rows.question_lists = {i: v for i, v in enumerate(values) if v is not None}
            rows.mapped[out_name] = [None] * batch.num_rows
            continue
        rows.mapped[out_name] = _mapped_from_parquet(batch, in_name, errors)
    rows.ids = _ids_from_parquet(batch, spec, source, start, errors)
    rows.keys = [row_key(source, start + i) for i in range(batch.num_rows)]
    if spec.id_column is not None and spec.id_column in batch.schema.names:
        rows.id_keys = [id_key(v) for v in batch.column(spec.id_column).to_pylist()]
    else:
        rows.id_keys = [None] * batch.num_rows
    for row_errors in errors:
        error, kind = _join_errors(row_errors)
        rows.errors.append(error)
        rows.kinds.append(kind)
    passthrough = {
        name: (
            batch.column(name)
            if name in batch.schema.names
            else pa.nulls(batch.num_rows, pa.null())
        )
        for name in spec.passthrough
    }
    return rows.keyed(passthrough)


def _parquet_columns(file_schema: pa.Schema, spec: _Spec) -> list[str] | None:
    """The columns to read: all of them when ids hash the whole row, else only those used."""
    if spec.id_column is None:
        return None
    wanted = {spec.id_column, *spec.columns.values(), *spec.passthrough}
    return [name for name in file_schema.names if name in wanted]


def _iter_parquet(
    uri: str, spec: _Spec, keep_empty: bool
) -> Iterator[tuple[pa.Table, list[str | None]]]:
    with fsspec.open(uri, "rb", **spec.storage_options) as f:
        parquet = pq.ParquetFile(f)
        columns = _parquet_columns(parquet.schema_arrow, spec)
        start = 0
        for batch in parquet.iter_batches(batch_size=spec.batch_rows, columns=columns):
            if batch.num_rows:
                yield _parquet_table(batch, spec, mask_uri(uri), start)
                start += batch.num_rows
        if start == 0 and keep_empty:
            schema = parquet.schema_arrow
            if columns is not None:
                schema = pa.schema([schema.field(name) for name in columns])
            empty = pa.RecordBatch.from_pylist([], schema=schema)
            yield _parquet_table(empty, spec, mask_uri(uri), 0)


# ---------------------------------------------------------------------------------- public


def _iter_keyed(
    uri: str, spec: _Spec, keep_empty: bool = False
) -> Iterator[tuple[pa.Table, list[str | None]]]:
    """(table, typed id key of each row) batches of one file."""
    fmt = spec.format_of(uri)
    if fmt == "parquet":
        yield from _iter_parquet(uri, spec, keep_empty)
        return
    if fmt == openai_batch.FORMAT:
        produced = False
        for keyed in _iter_openai_batch(uri, spec):
            produced = True
            yield keyed
        if keep_empty and not produced:
            yield openai_batch.RequestRows(mask_uri(uri)).flush()
        return
    produced = False
    for keyed in _iter_jsonl(uri, spec):
        produced = True
        yield keyed
    if keep_empty and not produced:
        arrays = {name: pa.array([], pa.string()) for name in spec.passthrough}
        yield _Rows(mask_uri(uri)).table(arrays), []


def _iter_batches(uri: str, spec: _Spec, keep_empty: bool = False) -> Iterator[pa.Table]:
    for table, _ in _iter_keyed(uri, spec, keep_empty):
        yield table


def iter_file_batches(
    uri: str,
    *,
    fmt: str | None,
    id_column: str | None = None,
    text_column: str = TEXT,
    question_column: str = QUESTION,
    prompt_column: str = PROMPT,
    passthrough: Sequence[str] = (),
    storage_options: dict[str, Any] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    expand_questions: bool = False,
) -> Iterator[pa.Table]:
    """Reads one file as tables of at most ``batch_rows`` rows (none for a file without rows).

    ``fmt`` is ``"jsonl"`` or ``"parquet"``, or None to infer it from the name. ``*_column`` name
    the input columns mapped to ``text`` / ``question`` / ``prompt``; ``passthrough`` columns are
    copied after the ``READ_SCHEMA`` columns. ``storage_options`` go to fsspec. With
    ``expand_questions`` (the qa task), a question column holding a list of strings gives one
    row per question (ids ``<id>/q<k>``, adjacent, see :func:`_expand_questions`).
    """
    spec = _make_spec(
        fmt,
        id_column,
        text_column,
        question_column,
        prompt_column,
        passthrough,
        storage_options,
        batch_rows,
        max_row_bytes,
        expand_questions,
    )
    return _iter_batches(uri, spec)


def read_file_rows(
    uri: str,
    *,
    fmt: str | None,
    id_column: str | None = None,
    text_column: str = TEXT,
    question_column: str = QUESTION,
    prompt_column: str = PROMPT,
    passthrough: Sequence[str] = (),
    storage_options: dict[str, Any] | None = None,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    expand_questions: bool = False,
) -> pa.Table:
    """Reads one whole file into a table (see :func:`iter_file_batches` for the arguments)."""
    spec = _make_spec(
        fmt,
        id_column,
        text_column,
        question_column,
        prompt_column,
        passthrough,
        storage_options,
        DEFAULT_BATCH_ROWS,
        max_row_bytes,
        expand_questions,
    )
    tables = list(_iter_batches(uri, spec, keep_empty=True))
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


# -------------------------------------------------------------------------------- Ray Data


class FileLedger(Protocol):
    """What read tasks report (picklable; called in the task): the typed id keys of each batch
    (``batch``: the file, the batch's index in it, one key per row, None where a row has no id)
    and each file read in full (``done``: the file, its rows, its size in bytes or None)."""

    def batch(self, source: str, index: int, id_keys: list[str | None]) -> None: ...

    def done(self, source: str, rows: int, size: int | None) -> None: ...


def _read_files(
    uris: tuple[str, ...],
    spec: _Spec,
    sizes: tuple[int | None, ...],
    ledger: FileLedger | None,
) -> Iterator[pa.Table]:
    """The body of one Ray read task: the files one after the other, in batches."""
    for uri, size in zip(uris, sizes, strict=True):
        rows = 0
        for index, (table, id_keys) in enumerate(_iter_keyed(uri, spec)):
            rows += table.num_rows
            if ledger is not None and (spec.id_column or spec.fmt == openai_batch.FORMAT):
                ledger.batch(mask_uri(uri), index, id_keys)
            yield table
        if ledger is not None:
            ledger.done(mask_uri(uri), rows, size)


def _group(count: int, groups: int, sizes: Sequence[int] | None) -> list[range]:
    """Splits ``range(count)`` into at most ``groups`` contiguous, non-empty runs of similar size."""
    if count == 0:
        return []
    groups = max(1, min(groups, count))
    weights = [max(1, size) for size in sizes] if sizes is not None else [1] * count
    total = sum(weights)
    runs: list[range] = []
    begin = acc = 0
    for i, weight in enumerate(weights):
        acc += weight
        groups_after = groups - len(runs) - 1
        if groups_after == 0:
            break  # the last run takes the rest
        items_after = count - i - 1
        if items_after == groups_after or acc >= total * (len(runs) + 1) / groups:
            runs.append(range(begin, i + 1))
            begin = i + 1
    runs.append(range(begin, count))
    return runs


class CorpusDatasource(Datasource):
    """A Ray Data datasource over a list of Parquet / JSONL files (any fsspec URI).

    Each read task reads a contiguous group of files (``parallelism`` groups at most, balanced
    by ``file_sizes`` when given) and yields tables of at most ``batch_rows`` rows, the same
    tables as :func:`iter_file_batches`. ``file_sizes`` (bytes, in the order of ``files``; a
    ``fs.find(..., detail=True)`` gives them for free) also feed Ray's size estimate; without
    them the estimate is unknown. ``storage_options`` must be picklable: each task opens its
    files through fsspec with them. ``ledger`` (a :class:`FileLedger`) hears, in the read
    tasks, of each batch's id keys and of each file read in full. A JSONL line over
    ``max_row_bytes`` becomes an error row (``row_too_large``) without being held in memory.
    ``expand_questions`` turns a list of questions into one row per question.
    """

    def __init__(
        self,
        files: Sequence[str],
        *,
        fmt: str | None = None,
        id_column: str | None = None,
        text_column: str = TEXT,
        question_column: str = QUESTION,
        prompt_column: str = PROMPT,
        passthrough: Sequence[str] = (),
        storage_options: dict[str, Any] | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        file_sizes: Sequence[int] | None = None,
        ledger: FileLedger | None = None,
        max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
        expand_questions: bool = False,
    ) -> None:
        super().__init__()
        self._ledger = ledger
        if isinstance(files, str):
            raise TypeError("files must be a sequence of URIs, not a string")
        self._files = tuple(files)
        if file_sizes is not None and len(file_sizes) != len(self._files):
            raise ValueError(f"{len(file_sizes)} file_sizes for {len(self._files)} files")
        self._sizes = tuple(int(s) for s in file_sizes) if file_sizes is not None else None
        self._spec = _make_spec(
            fmt,
            id_column,
            text_column,
            question_column,
            prompt_column,
            passthrough,
            storage_options,
            batch_rows,
            max_row_bytes,
            expand_questions,
        )
        for uri in self._files:
            self._spec.format_of(uri)  # fail on the driver, not in a task

    @property
    def files(self) -> tuple[str, ...]:
        return self._files

    def _inmemory_size(self, index: int) -> int | None:
        if self._sizes is None:
            return None
        uri = self._files[index]
        fmt = self._spec.format_of(uri)
        if fmt in ("jsonl", openai_batch.FORMAT) and uri.lower().endswith(".gz"):
            fmt = "jsonl.gz"
        return math.ceil(self._sizes[index] * _INMEMORY_FACTOR[fmt])

    def estimate_inmemory_data_size(self) -> int | None:
        if self._sizes is None:
            return None
        return sum(self._inmemory_size(i) or 0 for i in range(len(self._files)))

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: Any = None,
    ) -> list[ReadTask]:
        # Ray calls this several times while planning (and with parallelism=1 for metadata), so
        # it does no I/O: sizes come from the constructor.
        tasks = []
        for run in _group(len(self._files), parallelism, self._sizes):
            uris = tuple(self._files[i] for i in run)
            size = None
            if self._sizes is not None:
                size = sum(self._inmemory_size(i) or 0 for i in run)
            metadata = BlockMetadata(
                num_rows=None, size_bytes=size, input_files=list(uris), exec_stats=None
            )
            sizes = tuple(self._sizes[i] if self._sizes else None for i in run)
            read_fn = functools.partial(_read_files, uris, self._spec, sizes, self._ledger)
            tasks.append(ReadTask(read_fn, metadata, per_task_row_limit=per_task_row_limit))
        return tasks
