"""JSONL: one JSON object per line (plain or gzip), read as rows and written as part files.

Reading: every non-blank line is one row; blank lines are not rows. A line that is not UTF-8, not
JSON, not an object, or holds an unpaired surrogate escape is still a row, with ``error`` /
``error_kind`` set (``invalid_utf8`` / ``invalid_json``), and so is a line over
``input.max_row_bytes`` (``row_too_large``), which is never held in memory whole. A mapped column
holding something other than a string is a ``not_a_string`` error; passthrough values that are not
strings are kept as their JSON text. A row's position is its 0-based line number in the
(decompressed) file, blank lines included, and the content its derived id hashes is the raw bytes
of the line (without its line break). A UTF-8 byte order mark before the first line is dropped.
Lines end with LF or CRLF; a file with no LF before its first CR, whose first line is not one
JSON object, ends its lines with CR alone (old Mac files) and is split on CR. A corrupt file
(a truncated ``.gz``) keeps the rows read before the damage (see :mod:`pipeline.readers`).

Writing: one object per row (UTF-8, not ASCII-escaped); bytes as hex, dates in ISO format.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
import pyarrow as pa

from pipeline.columns import QUESTION
from pipeline.formats.base import KeyedBatch, Reader, ReadSpec, Writer, is_unreadable
from pipeline.formats.rows import (
    RowBatch,
    derive_id,
    id_key,
    id_text,
    join_errors,
    json_fallback,
    missing_id,
    passthrough_text,
    resume_key,
)
from pipeline.secrets import mask_uri

SNIFF_LINES = 100  # preflight reads the keys of a file's first lines (at most SNIFF_BYTES)
SNIFF_BYTES = 1 << 20
READ_BUFFER = 1 << 20
# A decompressor that meets a damaged stream raises, losing what the read call decompressed:
# compressed files are read in smaller calls, so at most this much before the damage is lost.
SALVAGE_BUFFER = 1 << 16


def parse_line(raw: bytes, position: int) -> tuple[dict[str, Any] | None, str, str]:
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


def _add_row(
    rows: RowBatch,
    spec: ReadSpec,
    raw: bytes,
    position: int,
    passthrough: dict[str, list[Any]],
    too_large: int | None = None,
) -> None:
    """Adds one line's row; ``too_large`` is the size of a line over the limit (``raw`` then
    holds its first bytes only, and the row is an error)."""
    if too_large is not None:
        parsed, kind, message = None, *too_large_error(position, too_large, spec.max_row_bytes)
    else:
        parsed, kind, message = parse_line(raw, position)
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
        row_id, key = id_text(value), id_key(value)
        if row_id is None and parsed is not None:
            errors.append(missing_id(spec.id_column))
    rows.ids.append(row_id if row_id is not None else derive_id(rows.source, position, raw))
    rows.keys.append(resume_key(rows.source, position))
    rows.id_keys.append(key)
    for name in spec.passthrough:
        passthrough[name].append(passthrough_text(obj.get(name)))
    if spec.settings_column is not None:
        if rows.settings is None:
            rows.settings = []
        rows.settings.append(obj.get(spec.settings_column))
    error, error_kind = join_errors(errors)
    rows.errors.append(error)
    rows.kinds.append(error_kind)


def _lines(
    handle: Any, limit: int, buffer: int = READ_BUFFER
) -> Iterator[tuple[int, bytes, int | None]]:
    """(position, line without its break, size when over ``limit`` else None) of a byte stream.

    A line over ``limit`` bytes is never held whole: its first KiB is kept and the rest skipped.
    """
    reader = io.BufferedReader(handle, buffer_size=buffer)
    position = 0
    while True:
        line = reader.readline(limit + 1)
        if not line:
            return
        if position == 0 and _cr_only(line, limit):
            yield from _cr_lines(reader, line, limit)
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


def _cr_only(first: bytes, limit: int) -> bool:
    """Whether a file whose first line (up to ``limit`` + 1 bytes) is ``first`` ends its lines
    with CR alone (old Mac files): no LF there, a CR, and not one JSON object with CR spaces."""
    if first.endswith(b"\n") or b"\r" not in first.rstrip(b"\r"):
        return False
    if len(first) <= limit:
        try:
            json.loads(first)
        except (ValueError, RecursionError):
            return True
        return False
    return True


def _cr_lines(
    reader: io.BufferedReader, data: bytes, limit: int
) -> Iterator[tuple[int, bytes, int | None]]:
    """:func:`_lines` of a file whose lines end with CR alone, ``data`` its first bytes."""
    position, kept, size = 0, b"", 0
    while True:
        *complete, rest = data.split(b"\r")
        for part in complete:
            kept, size = kept + part[: limit + 1 - len(kept)], size + len(part)
            yield position, kept if size <= limit else kept[:1024], None if size <= limit else size
            position, kept, size = position + 1, b"", 0
        kept, size = kept + rest[: limit + 1 - len(kept)], size + len(rest)
        data = reader.read(1 << 20)
        if not data:
            if size:
                yield (
                    position,
                    kept if size <= limit else kept[:1024],
                    None if size <= limit else size,
                )
            return


def row_lines(uri: str, spec: ReadSpec) -> Iterator[tuple[int, bytes, int | None]]:
    """The lines of a JSONL file that are rows: :func:`_lines` without a leading byte order
    mark, blank lines skipped (a line over the limit is a row, whatever it holds)."""
    opened = fsspec.open(uri, "rb", compression="infer", **spec.storage_options)
    buffer = SALVAGE_BUFFER if opened.compression else READ_BUFFER
    with opened as f:
        for position, raw, too_large in _lines(f, spec.max_row_bytes, buffer):
            if position == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark
            if too_large is None and not raw.strip():
                continue
            yield position, raw, too_large


def too_large_error(position: int, size: int, limit: int) -> tuple[str, str]:
    """(error kind, message) of a line of ``size`` bytes, over ``limit``."""
    return (
        "row_too_large",
        f"line {position + 1} has {size} bytes, over input.max_row_bytes ({limit})",
    )


class JsonlReader(Reader):
    name = "jsonl"
    description = (
        "JSONL, one object per line; inferred from .jsonl, .json, .ndjson (each optionally .gz)"
    )
    suffixes = (".jsonl.gz", ".json.gz", ".ndjson.gz", ".jsonl", ".json", ".ndjson")

    def read(self, uri: str, spec: ReadSpec) -> Iterator[KeyedBatch]:
        def flush() -> KeyedBatch:
            arrays = {name: pa.array(values, pa.string()) for name, values in passthrough.items()}
            return rows.keyed(arrays)

        rows = RowBatch(mask_uri(uri))
        passthrough: dict[str, list[Any]] = {name: [] for name in spec.passthrough}
        try:
            for position, raw, too_large in row_lines(uri, spec):
                _add_row(rows, spec, raw, position, passthrough, too_large)
                if len(rows) >= spec.batch_rows:
                    yield flush()
                    rows = RowBatch(mask_uri(uri))
                    passthrough = {name: [] for name in spec.passthrough}
        except Exception as err:
            if len(rows) and is_unreadable(err):
                yield flush()  # the rows read before the damage are kept
            raise
        if len(rows):
            yield flush()

    def file_columns(self, uri: str, storage_options: Mapping[str, Any]) -> set[str]:
        """The keys of the objects on the file's first lines."""
        return sniff_keys(uri, storage_options)


def sniff_keys(uri: str, storage_options: Mapping[str, Any]) -> set[str]:
    """The keys of the objects on the first lines of a JSONL file."""
    found: set[str] = set()
    with fsspec.open(uri, "rb", compression="infer", **storage_options) as handle:
        lines = handle.read(SNIFF_BYTES).splitlines()[:SNIFF_LINES]
    for line in lines:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            found.update(obj)
    return found


class JsonlWriter(Writer):
    name = "jsonl"
    description = "JSONL, one object per row"
    extension = "jsonl"

    def encode(self, table: pa.Table) -> bytes:
        buffer = io.BytesIO()
        for batch in table.to_batches(max_chunksize=1024):
            for row in batch.to_pylist():
                buffer.write(json.dumps(row, ensure_ascii=False, default=json_fallback).encode())
                buffer.write(b"\n")
        return buffer.getvalue()
