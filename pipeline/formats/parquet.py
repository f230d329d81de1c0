"""Parquet: columnar files, read as rows and written as part files.

Reading: one row per Parquet row, in batches of ``batch_rows``. A mapped column that is not of a
string type is a ``not_a_string`` error for every row where it holds a value; passthrough columns
keep their Parquet types; where the files disagree on a passthrough column's type, the plan picks
one for the corpus (:func:`passthrough_types`, from the footers, before any row is read) and every
file's values are cast to it, so blocks of different files always concatenate. A row's position is its 0-based row number in the file, and the content
its derived id hashes is the canonical JSON (sorted keys, compact) of the row: all of the file's
columns when no ``id_column`` is configured, the columns read otherwise (only those are read then).
The row count comes from the file footers, so progress knows the corpus' rows exactly.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.columns import QUESTION, READ_SCHEMA
from pipeline.formats.base import KeyedBatch, Reader, ReadSpec, Writer, is_unreadable
from pipeline.formats.rows import (
    RowBatch,
    canonical_json,
    derive_id,
    id_key,
    id_text,
    join_errors,
    missing_id,
    passthrough_text,
    resume_key,
)
from pipeline.secrets import mask_uri

log = logging.getLogger(__name__)
FOOTER_THREADS = 16  # footers the driver reads at once (passthrough types)


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
    spec: ReadSpec,
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
        row_id = id_text(value)
        if row_id is not None:
            ids.append(row_id)
            continue
        if spec.id_column is not None:
            errors[i].append(missing_id(spec.id_column))
        if records is None:
            records = batch.to_pylist()
        content = canonical_json(records[i]).encode()
        ids.append(derive_id(source, start + i, content))
    return ids


def _parquet_table(batch: pa.RecordBatch, spec: ReadSpec, source: str, start: int) -> KeyedBatch:
    rows = RowBatch(source)
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
    rows.keys = [resume_key(source, start + i) for i in range(batch.num_rows)]
    if spec.id_column is not None and spec.id_column in batch.schema.names:
        rows.id_keys = [id_key(v) for v in batch.column(spec.id_column).to_pylist()]
    else:
        rows.id_keys = [None] * batch.num_rows
    for row_errors in errors:
        error, kind = join_errors(row_errors)
        rows.errors.append(error)
        rows.kinds.append(kind)
    if spec.settings_column is not None:
        present = spec.settings_column in batch.schema.names
        column = batch.column(spec.settings_column) if present else None
        rows.settings = column.to_pylist() if column is not None else [None] * batch.num_rows
    passthrough = {name: _passthrough(batch, name, spec) for name in spec.passthrough}
    return rows.keyed(passthrough)


def _passthrough(batch: pa.RecordBatch, name: str, spec: ReadSpec) -> pa.Array:
    """A passthrough column, in the corpus' type for it when the plan found one."""
    target = spec.passthrough_types.get(name)
    if name not in batch.schema.names:
        return pa.nulls(batch.num_rows, target or pa.null())
    column = batch.column(name)
    if target is None or column.type == target:
        return column
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        if target != pa.string():
            raise
        return pa.array([passthrough_text(v) for v in column.to_pylist()], pa.string())


def passthrough_types(
    schemas: dict[str, pa.Schema], names: Sequence[str]
) -> dict[str, pa.DataType]:
    """One type for each passthrough column across the files (``uri -> schema``): the type the
    files agree on, else Arrow's permissive promotion of theirs (int32 and int64 to int64, int
    and float to float, string and large_string to large_string), else string, each value then
    as its JSON text (as JSONL passthrough values are). Files without the column do not count."""
    found: dict[str, dict[pa.DataType, str]] = {name: {} for name in names}
    for uri, schema in schemas.items():
        for name in names:
            index = schema.get_field_index(name)
            if index >= 0 and not pa.types.is_null(schema.field(index).type):
                found[name].setdefault(schema.field(index).type, uri)
    types: dict[str, pa.DataType] = {}
    for name, seen in found.items():
        if len(seen) == 1:
            types[name] = next(iter(seen))
        elif seen:
            fields = [pa.schema([pa.field(name, t)]) for t in seen]
            try:
                types[name] = pa.unify_schemas(fields, promote_options="permissive").field(0).type
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                types[name] = pa.string()
            listed = "; ".join(f"{t} in {mask_uri(uri)}" for t, uri in seen.items())
            log.warning(
                "passthrough column %r has different types across the input files (%s): read as %s",
                name,
                listed,
                types[name],
            )
    return types


def _parquet_columns(file_schema: pa.Schema, spec: ReadSpec) -> list[str] | None:
    """The columns to read: all of them when ids hash the whole row, else only those used."""
    if spec.id_column is None:
        return None
    wanted = {spec.id_column, *spec.columns.values(), *spec.passthrough, spec.settings_column}
    return [name for name in file_schema.names if name in wanted]


class ParquetReader(Reader):
    name = "parquet"
    description = "Parquet; inferred from .parquet, .pq"
    suffixes = (".parquet", ".pq")
    inmemory_factor = 3.0

    def read(self, uri: str, spec: ReadSpec) -> Iterator[KeyedBatch]:
        with fsspec.open(uri, "rb", **spec.storage_options) as f:
            parquet = pq.ParquetFile(f)
            columns = _parquet_columns(parquet.schema_arrow, spec)
            start = 0
            for batch in parquet.iter_batches(batch_size=spec.batch_rows, columns=columns):
                if batch.num_rows:
                    yield _parquet_table(batch, spec, mask_uri(uri), start)
                    start += batch.num_rows

    def schema(self, spec: ReadSpec) -> pa.Schema:
        fields = [pa.field(n, spec.passthrough_types.get(n, pa.null())) for n in spec.passthrough]
        return pa.schema([*READ_SCHEMA, *fields])

    def plan_passthrough(self, files: Sequence[str], spec: ReadSpec) -> dict[str, pa.DataType]:
        """:func:`passthrough_types` of the files' schemas (their footers, read in threads on
        the driver; a file whose footer cannot be read is left out: it becomes an
        ``unreadable_file`` row when read)."""
        if not spec.passthrough:
            return {}

        def schema(uri: str) -> pa.Schema | None:
            try:
                with fsspec.open(uri, "rb", **spec.storage_options) as handle:
                    return pq.ParquetFile(handle).schema_arrow
            except Exception as err:
                if not is_unreadable(err):
                    raise
                return None

        with ThreadPoolExecutor(FOOTER_THREADS) as pool:
            found = dict(zip(files, pool.map(schema, files), strict=True))
        return passthrough_types(
            {u: s for u, s in found.items() if s is not None}, spec.passthrough
        )

    def file_columns(self, uri: str, storage_options: Mapping[str, Any]) -> set[str]:
        """The columns of the file's Parquet schema."""
        with fsspec.open(uri, "rb", **storage_options) as handle:
            return set(pq.ParquetFile(handle).schema_arrow.names)

    def row_count(self, uri: str, storage_options: Mapping[str, Any]) -> int | None:
        """The rows in the file's footer."""
        with fsspec.open(uri, "rb", **storage_options) as handle:
            return pq.ParquetFile(handle).metadata.num_rows


class ParquetWriter(Writer):
    name = "parquet"
    description = "Parquet, one file per part"
    extension = "parquet"

    def encode(self, table: pa.Table) -> bytes:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        return buffer.getvalue()
