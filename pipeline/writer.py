"""The writer: one pass from the plan to the run directory, each part encoded by its format.

:class:`RunDatasink` is the plan's last step (``Dataset.write_datasink``). Each write task gets a
bundle of at least ``output.rows_per_file`` rows and writes, all under the same name prefix::

    <run dir>/part-<write uuid>-<task>.<ext>           rows the toxicity policy keeps
    <run dir>/rejected/part-<write uuid>-<task>.<ext>  rows it drops (with their scores)
    <run dir>/_stats/part-<write uuid>-<task>.json     the RunSummary of all of them
    <run dir>/<error dir>/part-<write uuid>-<task>.<ext>  rows the format sends to its error
                                                       file (request lines it cannot answer in place)

Ray Data's resume writes a pending checkpoint of the bundle's ids before the task writes and
commits it after; a pending checkpoint found by the next attempt deletes every file under the run
directory whose name starts with its prefix, so a part, its rejected rows and its summary are
committed or rolled back together. Rows are written once, to their final place: nothing reads a
part back.

The parts are encoded by the writer of ``output.format`` (:mod:`pipeline.formats`). The rest of
the run directory (layout, ledgers, resume, finalisation, ``_SUCCESS``) is :mod:`pipeline.rundir`'s.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from ray._common.retry import call_with_retry
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink, FilenameProvider

from pipeline import columns as S
from pipeline import formats, metrics
from pipeline.rundir import REJECTED, STATS_DIR
from pipeline.secrets import mask_text
from pipeline.summary import DROP, RunSummary


class PartFilenames(FilenameProvider):
    """part-<write uuid>-<task>.<ext>: unique per write attempt, sortable."""

    def __init__(self, fmt: str) -> None:
        self.ext = formats.writer(fmt).extension

    def get_filename_for_block(
        self, block: Any, write_uuid: str, task_index: int, block_index: int
    ) -> str:
        return f"part-{write_uuid}-{task_index:06d}-{block_index:06d}.{self.ext}"

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}-{task_index:06d}.{self.ext}"


class RunDatasink(BlockBasedFileDatasink):
    """Writes kept rows, rejected rows and the bundle's summary (see the module docstring)."""

    def __init__(
        self,
        path: str,
        *,
        fmt: str,
        filesystem: Any,
        rows_per_file: int,
        threshold: float | None,
        run_id: str | None = None,
    ) -> None:
        super().__init__(
            path,
            filesystem=filesystem,
            filename_provider=PartFilenames(fmt),
            min_rows_per_file=rows_per_file,
        )
        self.encoder = formats.writer(fmt)
        self.threshold = threshold
        self.run_id = run_id or posixpath.basename(path.rstrip("/"))

    def write_block(self, block: BlockAccessor, block_index: int, ctx: Any) -> dict[str, int]:
        from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

        name = self.filename_provider.get_filename_for_task(
            ctx.kwargs[WRITE_UUID_KWARG_NAME], ctx.task_idx
        )
        table = block.to_arrow()
        summary = RunSummary.of_table(table, self.threshold)
        to_errors = self.encoder.error_rows(table)
        if to_errors is not None:
            errors, table = table.filter(to_errors), table.filter(pc.invert(to_errors))
            if errors.num_rows:
                summary.error_file = errors.num_rows
                path = posixpath.join(self.path, self.encoder.error_dir, name)
                self._put(path, self.encoder.encode_errors(errors))
        dropped = _dropped(table)
        kept, rejected = table.filter(pc.invert(dropped)), table.filter(dropped)
        summary.rejected = rejected.num_rows
        if kept.num_rows:
            self._put(posixpath.join(self.path, name), self.encoder.encode(kept))
        if rejected.num_rows:
            self._put(posixpath.join(self.path, REJECTED, name), self.encoder.encode(rejected))
        stats_name = name.rsplit(".", 1)[0] + ".json"
        self._put(posixpath.join(self.path, STATS_DIR, stats_name), summary.dumps())
        metrics.part_written(self.run_id, summary)
        return {
            "rows": summary.rows,
            "rejected": rejected.num_rows,
            "error_file": summary.error_file,
        }

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, int]:
        from ray.data._internal.delegating_block_builder import DelegatingBlockBuilder

        builder = DelegatingBlockBuilder()
        for block in blocks:
            builder.add_block(block)
        accessor = BlockAccessor.for_block(builder.build())
        if accessor.num_rows() == 0:
            return {"rows": 0, "rejected": 0, "error_file": 0}
        return self.write_block(accessor, 0, ctx)

    def on_write_complete(self, write_result: Any) -> None:
        """Nothing to do: the run directory is the runner's, and so is finalisation."""

    def _put(self, path: str, data: bytes) -> None:
        def put() -> None:
            with self.open_output_stream(path) as stream:
                stream.write(data)

        call_with_retry(
            put,
            description=f"write {mask_text(path)!r}",
            match=self._data_context.retried_io_errors,
        )


def _dropped(table: pa.Table) -> pa.Array:
    if S.TOXICITY_DECISION not in table.column_names or table.num_rows == 0:
        return pa.array([False] * table.num_rows, pa.bool_())
    return pc.fill_null(pc.equal(table.column(S.TOXICITY_DECISION), DROP), False)
