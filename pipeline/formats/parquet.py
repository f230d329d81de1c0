"""Parquet: columnar files, read as rows and written as part files.

Reading: one row per Parquet row, in batches of ``batch_rows``. A mapped column that is not of a
string type is a ``not_a_string`` error for every row where it holds a value; passthrough columns
keep their Parquet types. A row's position is its 0-based row number in the file, and the content
its derived id hashes is the canonical JSON (sorted keys, compact) of the row: all of the file's
columns when no ``id_column`` is configured, the columns read otherwise (only those are read then).
The row count comes from the file footers, so progress knows the corpus' rows exactly.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.columns import QUESTION
from pipeline.formats.base import KeyedBatch, Reader, ReadSpec, Writer
from pipeline.formats.rows import (
    RowBatch,
    canonical_json,
    derive_id,
    id_key,
    id_text,
    join_errors,
    missing_id,
    resume_key,
)
from pipeline.secrets import mask_uri


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
    passthrough = {
        name: (
            batch.column(name)
            if name in batch.schema.names
            else pa.nulls(batch.num_rows, pa.null())
        )
        for name in spec.passthrough
    }
    return rows.keyed(passthrough)


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
