"""The interface every format implements: a :class:`Reader`, a :class:`Writer`, and :class:`ReadSpec`.

A format is one module of :mod:`pipeline.formats` with a reader, a writer or both, listed in the
registry (:mod:`pipeline.formats`). The rest of the pipeline asks the registry for the reader of
``input.format`` and the writer of ``output.format`` and calls the methods below; it never names a
format. What a reader yields follows the rules of :mod:`pipeline.readers` (one row per input row,
bad rows as error rows, stable ids and resume keys).
"""

from __future__ import annotations

import gzip
import lzma
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from pipeline.columns import PROMPT, QUESTION, READ_SCHEMA, TEXT

if TYPE_CHECKING:
    from pipeline.config import JobConfig

DEFAULT_BATCH_ROWS = 4096
DEFAULT_MAX_ROW_BYTES = 32 << 20

Problems = list[tuple[tuple[str, ...], str]]
"""Config problems: (field location, message) pairs."""
KeyedBatch = tuple[pa.Table, list[str | None]]
"""A batch of rows and the typed id key of each (None where a row has no id of its own)."""


@dataclass(frozen=True)
class ReadSpec:
    """How to turn files into rows: small and picklable, shipped to Ray read tasks.

    ``format`` is a registered input format, or None to infer each file's from its name. The
    ``*_column`` fields name the input columns read as ``text`` / ``question`` / ``prompt``;
    ``passthrough`` columns are copied after the reader's own. With ``expand_questions`` (the qa
    task) a question column holding a list gives one row per question. ``passthrough_types``
    (the plan's, :meth:`Reader.plan_passthrough`) is the corpus' type of a passthrough column the
    reader casts each file's values to. Build it from the job config with :meth:`from_config`;
    constructing it checks it (ValueError / TypeError).
    """

    format: str | None = None
    id_column: str | None = None
    text_column: str = TEXT
    question_column: str = QUESTION
    prompt_column: str = PROMPT
    passthrough: tuple[str, ...] = ()
    settings_column: str | None = None  # per-row generation settings (OpenAI body keys)
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    batch_rows: int = DEFAULT_BATCH_ROWS
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
    expand_questions: bool = False
    passthrough_types: Mapping[str, pa.DataType] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from pipeline import formats

        if isinstance(self.passthrough, str):
            raise TypeError("passthrough must be a sequence of column names, not a string")
        object.__setattr__(self, "passthrough", tuple(self.passthrough))
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))
        object.__setattr__(self, "passthrough_types", dict(self.passthrough_types or {}))
        names = self.passthrough
        if len(set(names)) != len(names):
            raise ValueError(f"passthrough columns repeat: {list(names)}")
        clash = sorted(set(READ_SCHEMA.names).intersection(names))
        if clash:
            raise ValueError(f"passthrough columns clash with reader columns: {clash}")
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {self.batch_rows}")
        if self.max_row_bytes < 1:
            raise ValueError(f"max_row_bytes must be >= 1, got {self.max_row_bytes}")
        if self.format is not None:
            formats.reader(self.format).check(self)

    @classmethod
    def from_config(cls, config: JobConfig) -> ReadSpec:
        """The spec of a job: every field named like an ``input`` field takes its value."""
        section = config.input
        given = type(section).model_fields
        values = {f.name: getattr(section, f.name) for f in fields(cls) if f.name in given}
        return cls(**values, expand_questions=config.task == "qa")

    @property
    def columns(self) -> dict[str, str]:
        """Reader column (text / question / prompt) -> the input column it is read from."""
        return {TEXT: self.text_column, QUESTION: self.question_column, PROMPT: self.prompt_column}

    def reader_of(self, uri: str) -> Reader:
        """The reader of ``uri``: ``format``'s, else the one its name implies (ValueError)."""
        from pipeline import formats
        from pipeline.secrets import mask_uri

        name = self.format or formats.infer_format(uri)
        if name is None:
            raise ValueError(
                f"cannot tell the format of {mask_uri(uri)!r}: pass format= one of "
                f"{formats.input_names()}"
            )
        return formats.reader(name)


class Reader:
    """Reads the files of one input format into batches of rows.

    Subclasses set the class attributes and implement :meth:`read` and :meth:`file_columns`; the
    other methods have the defaults of a corpus format (columns mapped by ``input.*_column``,
    ids from ``id_column``).
    """

    name: ClassVar[str]
    description: ClassVar[str]  # one line for the config reference
    suffixes: ClassVar[tuple[str, ...]] = ()  # file name endings (lower case) of this format
    inferred: ClassVar[bool] = True  # whether a file name ending implies this format
    inmemory_factor: ClassVar[float] = 1.0  # bytes in memory per byte on disk (Ray's planning)
    compressed_factor: ClassVar[float] = 5.0  # the same for a .gz file
    prompts_ready: ClassVar[bool] = False  # rows hold finished prompts: no template, no cutting
    row_settings: ClassVar[bool] = False  # rows carry request settings of their own (ROW_SETTINGS)
    reserved: ClassVar[tuple[str, ...]] = ()  # more column names it keeps (``x_*``: a prefix)
    maps_columns: ClassVar[bool] = True  # rows come from the configured input.*_column columns
    error_kinds: ClassVar[tuple[str, ...]] = ()  # kinds of its own, beside columns.ERROR_KINDS
    # Error kinds that answer a bad request line (the format's own output, as an API's 4xx
    # answers are), not failures of the run: run.max_error_fraction does not count them.
    answered_errors: ClassVar[tuple[str, ...]] = ()

    def read(self, uri: str, spec: ReadSpec) -> Iterator[KeyedBatch]:
        """The batches of one file (at most ``spec.batch_rows`` rows each; none for no rows)."""
        raise NotImplementedError

    def columns(self, spec: ReadSpec) -> list[str]:
        """The columns of every batch :meth:`read` yields, in order."""
        return [*READ_SCHEMA.names, *spec.passthrough]

    def schema(self, spec: ReadSpec) -> pa.Schema:
        """The schema of the batches :meth:`read` yields (passthrough columns as strings, the
        type of JSONL passthrough values; a format keeping its files' types overrides it)."""
        return pa.schema([*READ_SCHEMA, *(pa.field(n, pa.string()) for n in spec.passthrough)])

    def check(self, spec: ReadSpec) -> None:
        """Raises ValueError for a spec this format cannot read with."""

    def records_ids(self, spec: ReadSpec) -> bool:
        """Whether rows carry ids of their own (counted for repeats in the manifest)."""
        return spec.id_column is not None

    def size_in_memory(self, uri: str, size: int) -> float:
        """Ray's estimate of a file's in-memory size from its size on disk."""
        factor = self.compressed_factor if uri.lower().endswith(".gz") else self.inmemory_factor
        return size * factor

    def file_columns(self, uri: str, storage_options: Mapping[str, Any]) -> set[str]:
        """The columns a file has (preflight checks the configured ones against them)."""
        raise NotImplementedError

    def plan_passthrough(self, files: Sequence[str], spec: ReadSpec) -> dict[str, pa.DataType]:
        """The corpus' type of each passthrough column whose files may disagree on it (the
        plan puts it in ``spec.passthrough_types``); none for a format whose passthrough values
        always have one type."""
        return {}

    def row_count(self, uri: str, storage_options: Mapping[str, Any]) -> int | None:
        """The rows of a file when its metadata says so cheaply, else None (progress estimates)."""
        return None

    def config_problems(self, config: JobConfig) -> Problems:
        """What in a job config this format cannot work with, each at the field to change."""
        return []


class Writer:
    """Encodes the part files of one output format."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line for the config reference
    extension: ClassVar[str]  # of the part files
    requires: ClassVar[tuple[str, ...]] = ()  # columns the encoding needs
    error_dir: ClassVar[str | None] = None  # the run's subdirectory for its error file, if any

    def encode(self, table: pa.Table) -> bytes:
        """A part file's bytes holding the rows of ``table``."""
        raise NotImplementedError

    def error_rows(self, table: pa.Table) -> pa.Array | None:
        """Which rows of ``table`` go to the error file instead (a boolean mask; None: none).
        Only a format with an ``error_dir`` has an error file."""
        return None

    def encode_errors(self, table: pa.Table) -> bytes:
        """An error file part's bytes holding the rows of ``table``."""
        raise NotImplementedError

    def config_problems(self, config: JobConfig) -> Problems:
        """What in a job config this format cannot work with, each at the field to change."""
        return []


def is_unreadable(err: BaseException) -> bool:
    """Whether ``err``, raised while reading a file, says its bytes are corrupt (a truncated or
    damaged gzip stream, a Parquet file without its footer or with a damaged page) rather than
    that storage could not be reached: the first is the file's for good (an ``unreadable_file``
    error row), the second is raised for Ray Data to retry the read. An ``OSError`` counts as
    corrupt data only as pyarrow raises it for a damaged page (no errno, no subclass such as
    ``ConnectionError`` or ``PermissionError``) and when its message matches none of the retried
    I/O errors of the current Ray Data context."""
    if isinstance(err, EOFError | zlib.error | lzma.LZMAError | gzip.BadGzipFile | pa.ArrowInvalid):
        return True
    if type(err) is not OSError or err.errno is not None:
        return False
    import ray.data

    text = f"{type(err).__name__}: {err}"
    retried = ray.data.DataContext.get_current().retried_io_errors
    return not any(re.search(pattern, text) for pattern in retried)


def check_names(readers: Sequence[Reader], writers: Sequence[Writer]) -> None:
    """Raises ValueError when two readers or two writers share a name."""
    for kind, items in (("reader", readers), ("writer", writers)):
        names = [item.name for item in items]
        if len(set(names)) != len(names):
            raise ValueError(f"two {kind}s share a name: {names}")
