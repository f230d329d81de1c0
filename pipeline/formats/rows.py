"""The pieces every reader builds rows from: ids, resume keys, error joining, question lists.

Ids: with ``input.id_column`` set, a row's id is that column's value as a string (:func:`id_text`:
``str`` for strings and integers, canonical JSON for anything else). Otherwise, and for a row
whose id value is null, blank or absent (that row also gets ``error_kind="missing_id"``), the id is
derived (:func:`derive_id`)::

    sha256(source + "\\n" + str(position) + "\\n" + content).hexdigest()[:24]

``source`` is the file URI as the caller passed it, with any userinfo and query string masked
(:func:`pipeline.secrets.mask_uri`: the ``source`` column never carries a credential),
``position`` the row's place in its file (what that is, and what ``content`` holds, each format
says). The position makes duplicate rows of one file get distinct ids; the source makes equal rows
of different files distinct. The same file read with the same URI always gives the same ids; pass
URIs in a canonical form (full ``s3://`` URIs, absolute local paths) so that reruns from another
working directory match.

Resume keys: the ``row_key`` column (:func:`resume_key`) is unique and stable per input row (file
and position), even where ids repeat: Ray Data's resume is keyed on it, not on the id.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

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
from pipeline.request import ROW_SETTINGS, ROW_SETTINGS_TYPE

ID_HEX_CHARS = 24
MAPPED = (TEXT, QUESTION, PROMPT)  # the reader columns filled from configured input columns


def canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=json_fallback
    )


def json_fallback(value: Any) -> Any:
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


def resume_key(source: str, position: int) -> str:
    """The resume key of a row: its file (hashed) and position there; unique and stable."""
    return f"{hashlib.sha256(source.encode()).hexdigest()[:16]}-{position}"


def unreadable_row(schema: pa.Schema, source: str, rows_read: int, err: BaseException) -> pa.Table:
    """The one row saying file ``source`` could not be read (in full): ``error_kind``
    ``unreadable_file``, the error and the rows read before it in ``error``, every other column
    null. Its resume key (``<file hash>-unreadable``) and id are stable and no row's of the file
    (:func:`resume_key` positions are numbers), so a rerun reads the same row again."""
    from pipeline.secrets import mask_text
    from pipeline.summary import UNREADABLE_FILE

    reason = mask_text(f"{type(err).__name__}: {err}")
    values = {
        ID: derive_id(source, -1, b"unreadable"),
        ROW_KEY: f"{hashlib.sha256(source.encode()).hexdigest()[:16]}-unreadable",
        SOURCE: source,
        ERROR: f"file {source} could not be read after {rows_read} rows: {reason}",
        ERROR_KIND: UNREADABLE_FILE,
    }
    arrays = [pa.array([values.get(f.name)], f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def id_key(value: Any) -> str | None:
    """An id value with its type: ``42`` and ``"42"`` are different ids (None for no id)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return "s:" + value
    if isinstance(value, int) and not isinstance(value, bool):
        return f"i:{value}"
    return "j:" + canonical_json(value)


def id_text(value: Any) -> str | None:
    """The id for an id-column value; None for null or blank (those rows get a derived id)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return canonical_json(value)


def passthrough_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=json_fallback)


class RowBatch:
    """Column-wise accumulator for the fixed columns of one output batch."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.ids: list[str] = []
        self.keys: list[str] = []
        self.id_keys: list[str | None] = []
        self.mapped: dict[str, list[str | None]] = {name: [] for name in MAPPED}
        self.errors: list[str | None] = []
        self.kinds: list[str | None] = []
        self.question_lists: dict[int, list[Any]] = {}  # row -> its questions, when a list
        self.settings: list[Any] | None = None  # each row's settings_column value, when set

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
        if self.settings is not None:
            arrays.append(self._settings_column(arrays))
            fields.append(pa.field(ROW_SETTINGS, ROW_SETTINGS_TYPE))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    def _settings_column(self, arrays: list[Any]) -> pa.Array:
        """The rows' settings (pipeline.request.ROW_SETTINGS) from their settings_column values
        (parsed as OpenAI body keys); a bad value becomes the row's error (in ``arrays``)."""
        from pipeline.request_body import RequestError, row_settings_from_body

        assert self.settings is not None
        parsed: list[dict[str, Any] | None] = []
        errors, kinds = list(self.errors), list(self.kinds)
        for i, value in enumerate(self.settings):
            try:
                parsed.append(row_settings_from_body(value))
            except RequestError as err:
                parsed.append(None)
                if errors[i] is None:
                    errors[i], kinds[i] = f"settings: {err}", "invalid_settings"
        names = READ_SCHEMA.names
        arrays[names.index(ERROR)] = pa.array(errors, pa.string())
        arrays[names.index(ERROR_KIND)] = pa.array(kinds, pa.string())
        return pa.array(parsed, ROW_SETTINGS_TYPE)

    def keyed(self, passthrough: dict[str, pa.Array]) -> tuple[pa.Table, list[str | None]]:
        """The batch's table and typed id keys, rows holding a list of questions expanded."""
        return expand_questions(self.table(passthrough), self.id_keys, self.question_lists)


def expand_questions(
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
        error, kind = join_errors([*found, *([problem] if problem else [])])
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


def missing_id(id_column: str) -> tuple[str, str]:
    return "missing_id", f"missing id: column {id_column!r} is absent, null or blank"


def join_errors(errors: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """One message for all of a row's problems; the first one's kind."""
    if not errors:
        return None, None
    return "; ".join(message for _, message in errors), errors[0][0]


# ----------------------------------------------------------------------------------- JSONL
