"""Reading the corpus: files into rows, one read task per group of files (Ray Data).

Each input row becomes exactly one row of the reader's columns (:meth:`Reader.columns
<pipeline.formats.base.Reader.columns>`: :data:`pipeline.columns.READ_SCHEMA`, then the configured
passthrough columns or the format's own), except with ``expand_questions`` (the qa task) where a
question column holding a list becomes one row per question, ids ``<id>/q<k>``, next to each
other. A row that cannot be read properly (a line that is not UTF-8 or not a JSON object, a mapped
column holding something other than a string) still comes out, with ``error`` / ``error_kind``
set. A file whose bytes are corrupt (a truncated ``.gz``, a Parquet file without its footer or
with a damaged page: :func:`pipeline.formats.base.is_unreadable`) keeps the rows read before the
damage and adds one ``unreadable_file`` row naming it (:func:`pipeline.formats.rows.unreadable_row`),
counted as one of its rows; storage that cannot be reached is raised for Ray Data to retry. How each format reads its files is its module's (:mod:`pipeline.formats`); how ids and the
resume keys are made is :mod:`pipeline.formats.rows`'.

:class:`CorpusDatasource` reads a list of files with one read task per group of files, so the
ids exist at Read time (the checkpoint filter of Ray Data's resume runs right after the Read)::

    spec = ReadSpec.from_config(config)
    ds = ray.data.read_datasource(CorpusDatasource(files, spec))
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import metrics
from pipeline.formats.base import KeyedBatch, ReadSpec, is_unreadable
from pipeline.formats.rows import unreadable_row
from pipeline.secrets import mask_uri

log = logging.getLogger(__name__)


def read_keyed(uri: str, spec: ReadSpec) -> Iterator[KeyedBatch]:
    """(table, typed id key of each row) batches of one file."""
    return spec.reader_of(uri).read(uri, spec)


def read_file(uri: str, spec: ReadSpec) -> Iterator[pa.Table]:
    """Reads one file as tables of at most ``spec.batch_rows`` rows (none for a file without
    rows), the same tables a read task of :class:`CorpusDatasource` yields for it."""
    yield from _read_files((uri,), spec, (None,), None)


# -------------------------------------------------------------------------------- Ray Data


class FileLedger(Protocol):
    """What read tasks report (picklable; called in the task): the typed id keys of each batch
    (``batch``: the file, the batch's index in it, one key per row, None where a row has no id)
    and each file read in full (``done``: the file, its rows, its size in bytes or None)."""

    def batch(self, source: str, index: int, id_keys: list[str | None]) -> None: ...

    def done(self, source: str, rows: int, size: int | None) -> None: ...


def _read_files(
    uris: tuple[str, ...],
    spec: ReadSpec,
    sizes: tuple[int | None, ...],
    ledger: FileLedger | None,
    run_id: str = "",
) -> Iterator[pa.Table]:
    """The body of one Ray read task: the files one after the other, in batches."""
    for uri, size in zip(uris, sizes, strict=True):
        rows = 0
        reader = spec.reader_of(uri)
        try:
            for index, (table, id_keys) in enumerate(reader.read(uri, spec)):
                rows += table.num_rows
                if ledger is not None and reader.records_ids(spec):
                    ledger.batch(mask_uri(uri), index, id_keys)
                metrics.rows_read(run_id, table.num_rows)
                yield table
        except Exception as err:
            if not is_unreadable(err):
                raise
            log.warning("input file %s cannot be read after %d rows: %s", mask_uri(uri), rows, err)
            yield unreadable_row(reader.schema(spec), mask_uri(uri), rows, err)
            metrics.rows_read(run_id, 1)
            rows += 1
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
    """A Ray Data datasource over a list of input files (any registered format, any fsspec URI).

    Each read task reads a contiguous group of files (``parallelism`` groups at most, balanced
    by ``file_sizes`` when given) and yields tables of at most ``spec.batch_rows`` rows, the same
    tables as :func:`read_file`. ``spec`` (default: infer each file's format, the default
    columns) says how; its ``storage_options`` must be picklable: each task opens its files
    through fsspec with them. ``file_sizes`` (bytes, in the order of ``files``; a
    ``fs.find(..., detail=True)`` gives them for free) also feed Ray's size estimate; without
    them the estimate is unknown. ``ledger`` (a :class:`FileLedger`) hears, in the read tasks,
    of each batch's id keys (when the format's rows have ids of their own) and of each file read
    in full. The rows read count into the ``rgbatch_rows_read`` metric of ``run_id``.
    """

    def __init__(
        self,
        files: Sequence[str],
        spec: ReadSpec | None = None,
        *,
        file_sizes: Sequence[int] | None = None,
        ledger: FileLedger | None = None,
        run_id: str = "",
    ) -> None:
        super().__init__()
        self._ledger = ledger
        self._run_id = run_id
        if isinstance(files, str):
            raise TypeError("files must be a sequence of URIs, not a string")
        self._files = tuple(files)
        if file_sizes is not None and len(file_sizes) != len(self._files):
            raise ValueError(f"{len(file_sizes)} file_sizes for {len(self._files)} files")
        self._sizes = tuple(int(s) for s in file_sizes) if file_sizes is not None else None
        self._spec = spec or ReadSpec()
        for uri in self._files:
            self._spec.reader_of(uri)  # fail on the driver, not in a task

    @property
    def files(self) -> tuple[str, ...]:
        return self._files

    def _inmemory_size(self, index: int) -> int | None:
        if self._sizes is None:
            return None
        uri = self._files[index]
        return math.ceil(self._spec.reader_of(uri).size_in_memory(uri, self._sizes[index]))

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
            read_fn = functools.partial(
                _read_files, uris, self._spec, sizes, self._ledger, self._run_id
            )
            tasks.append(ReadTask(read_fn, metadata, per_task_row_limit=per_task_row_limit))
        return tasks
