"""The formats: one module per input/output format, registered here by name.

Each module holds a :class:`~pipeline.formats.base.Reader` and/or a
:class:`~pipeline.formats.base.Writer` (the interface is in :mod:`pipeline.formats.base`, the
row-building pieces readers share in :mod:`pipeline.formats.rows`). The job config takes its
allowed ``input.format`` / ``output.format`` values, their descriptions and the file name endings
from here; the readers, the writer, the plan and preflight ask here for the format's object.
Adding a format is adding its module and listing its reader and writer below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model import storage
from pipeline import columns as S
from pipeline.formats import jsonl, openai_batch, parquet
from pipeline.formats.base import Reader, ReadSpec, Writer, check_names

_READERS: tuple[Reader, ...] = (
    jsonl.JsonlReader(),
    parquet.ParquetReader(),
    openai_batch.OpenAIBatchReader(),
)
_WRITERS: tuple[Writer, ...] = (
    parquet.ParquetWriter(),
    jsonl.JsonlWriter(),
    openai_batch.OpenAIBatchWriter(),
)
check_names(_READERS, _WRITERS)
READERS: dict[str, Reader] = {r.name: r for r in _READERS}
WRITERS: dict[str, Writer] = {w.name: w for w in _WRITERS}

__all__ = [
    "READERS",
    "WRITERS",
    "ReadSpec",
    "Reader",
    "Writer",
    "error_kinds",
    "infer_format",
    "input_names",
    "list_files",
    "output_names",
    "reader",
    "writer",
]


def error_kinds() -> tuple[str, ...]:
    """Every error kind a row can have: the shared ones, then each input format's own."""
    own = (kind for r in _READERS for kind in r.error_kinds if kind not in S.ERROR_KINDS)
    return tuple(dict.fromkeys((*S.ERROR_KINDS, *own)))


def input_names() -> tuple[str, ...]:
    """The input formats, in the order of the config reference."""
    return tuple(READERS)


def output_names() -> tuple[str, ...]:
    """The output formats, the default first."""
    return tuple(WRITERS)


def reader(name: str) -> Reader:
    """The reader of input format ``name`` (ValueError for an unknown one)."""
    try:
        return READERS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}: expected one of {input_names()}") from None


def writer(name: str) -> Writer:
    """The writer of output format ``name`` (ValueError for an unknown one)."""
    try:
        return WRITERS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}: expected one of {output_names()}") from None


def infer_format(uri: str) -> str | None:
    """The input format implied by the name of ``uri`` (or of its glob), else None."""
    path = uri.split("?", 1)[0].rstrip("/").lower()
    endings = [(s, r.name) for r in READERS.values() if r.inferred for s in r.suffixes]
    for suffix, name in sorted(endings, key=lambda item: -len(item[0])):
        if path.endswith(suffix):
            return name
    return None


def list_files(uri: str, fmt: str | None, storage_options: Mapping[str, Any]) -> list[str]:
    """Sorted, fully qualified input files matched by ``uri`` (a glob, a directory or a file); a
    directory lists the files with an ending of ``fmt`` (of any input format when None)."""
    readers = READERS.values() if fmt is None else [reader(fmt)]
    suffixes = tuple(dict.fromkeys(s for r in readers for s in r.suffixes))
    return storage.list_files(uri, suffixes, storage_options)


def describe(kind: str) -> str:
    """``name (description); ...`` of the input (``kind="input"``) or output formats."""
    items = READERS.values() if kind == "input" else WRITERS.values()
    return "; ".join(f"{item.name}: {item.description}" for item in items)
