"""Lines and files a hostile (or careless) user gives, each survived with its rows (issue 21).

Units without Ray, one case each; the runs that show them end to end are in
``formats/test_openai_batch.py`` (case 1 and the custom_id error file) and below (cases 5 and 6 on a
Parquet corpus):

- case 1: an OpenAI batch setting past its column's integer type is an error line naming the
  field and the line; the other lines are read;
- case 5: Parquet passthrough columns typed differently across files get one type for the corpus;
- case 6: a truncated or damaged ``.gz``, a 0-byte or truncated Parquet file, or one with a
  damaged page keeps the rows read before the damage and adds one ``unreadable_file`` row;
  preflight and the progress total skip such files;
- CR-only line endings are split on CR;
- OpenAI batch answers (bad request lines) do not count towards ``run.max_error_fraction``;
- ``generation.max_slots: auto`` with CPU replicas is a config error;
- OpenAI batch lines without a usable custom_id go to the error file, in OpenAI's shape.
"""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from pipeline_helpers import job_config, job_yaml, read_table
from pyarrow.fs import LocalFileSystem

from pipeline import columns as S
from pipeline.config import ConfigError
from pipeline.config.preflight import preflight
from pipeline.formats import ReadSpec, writer
from pipeline.formats import openai_batch as ob
from pipeline.formats.jsonl import SALVAGE_BUFFER
from pipeline.formats.parquet import ParquetReader, passthrough_types
from pipeline.progress import InputTotal
from pipeline.readers import read_file
from pipeline.request import ROW_SETTINGS
from pipeline.runner import error_policy
from pipeline.summary import RunSummary

INT32_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1


def chat(custom_id: Any, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": "Hi"}], **body},
    }


def write_lines(path: Path, lines: list[Any]) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def by_id(table: pa.Table) -> dict[str, dict[str, Any]]:
    return {row[S.ID]: row for row in table.to_pylist()}


# Case 1 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": INT32_MAX + 1}, "body.max_tokens"),
        ({"max_completion_tokens": 1 << 40}, "body.max_completion_tokens"),
        ({"seed": (1 << 64) - 1}, "body.seed"),
        ({"seed": -(1 << 63) - 1}, "body.seed"),
        ({"seed": 1.5}, "body.seed"),
        ({"max_tokens": -3}, "body.max_tokens"),
    ],
)
def test_case1_settings_past_their_integer_type_are_error_lines(
    tmp_path: Path, body: dict[str, Any], field: str
) -> None:
    path = tmp_path / "batch.jsonl"
    lines = [chat(f"ok-{i}", max_tokens=5, seed=i) for i in range(20)]
    lines.insert(7, chat("bad", **body))
    write_lines(path, lines)
    rows = by_id(read_table(str(path), fmt="openai_batch", batch_rows=8))
    assert len(rows) == 21
    bad = rows["bad"]
    assert bad[S.ERROR_KIND] == "invalid_request" and bad[S.PROMPT] is None
    assert bad[S.ERROR].startswith("line 8: ") and field in bad[S.ERROR]
    assert bad[S.SOURCE] == str(path)  # the file, with the line in the message
    good = [r for k, r in rows.items() if k != "bad"]
    assert all(r[S.ERROR] is None and r[ROW_SETTINGS]["max_new_tokens"] == 5 for r in good)


def test_case1_the_widest_values_the_columns_hold_are_read(tmp_path: Path) -> None:
    path = tmp_path / "batch.jsonl"
    write_lines(
        path,
        [chat("a", max_tokens=INT32_MAX, seed=INT64_MAX), chat("b", seed=-(1 << 63))],
    )
    rows = by_id(read_table(str(path), fmt="openai_batch"))
    assert rows["a"][ROW_SETTINGS]["max_new_tokens"] == INT32_MAX
    assert rows["a"][ROW_SETTINGS]["seed"] == INT64_MAX
    assert rows["b"][ROW_SETTINGS]["seed"] == -(1 << 63) and rows["b"][S.ERROR] is None


def test_case1_a_value_no_check_bounded_is_an_error_row_not_a_failed_batch() -> None:
    """The safety net under the parser's checks: a settings value its Arrow column cannot hold
    (as a new parameter without a bound would give) fails only its own row."""
    rows = ob.RequestRows("f.jsonl")
    for i in range(3):
        rows.add(chat(f"c{i}"), None, derived_id=f"d{i}", key=f"k{i}", position=i)
    rows._columns[ROW_SETTINGS][1] = {"max_new_tokens": 1 << 40}
    table, _ = rows.flush()
    bad = table.to_pylist()[1]
    assert bad[S.ERROR_KIND] == "invalid_request" and bad[ROW_SETTINGS] is None
    assert bad[S.ERROR].startswith("line 2: ") and "'request'" in bad[S.ERROR]
    assert [r[S.ERROR] for r in table.to_pylist()[::2]] == [None, None]


# Issue 19: no usable custom_id ------------------------------------------------------------------


def output_rows(table: pa.Table) -> pa.Table:
    n = table.num_rows
    extra = {
        S.PROMPT_TOKENS: pa.array([0] * n, pa.int32()),
        S.OUTPUT_TEXT: pa.array(["x" if e is None else None for e in table[S.ERROR].to_pylist()]),
        S.OUTPUT_TOKENS: pa.array([1] * n, pa.int32()),
        S.FINISH_REASON: pa.array(
            ["stop" if e is None else "error" for e in table[S.ERROR].to_pylist()]
        ),
        S.MODEL: pa.array(["tiny@abc"] * n),
        S.RUN_ID: pa.array(["r1"] * n),
    }
    for name, values in extra.items():
        table = table.append_column(name, values)
    return table


def test_lines_without_a_usable_custom_id_go_to_the_error_file(tmp_path: Path) -> None:
    path = tmp_path / "batch.jsonl"
    write_lines(
        path,
        [
            chat("a"),
            chat(None),  # null
            {k: v for k, v in chat("x").items() if k != "custom_id"},  # missing
            chat(7),  # not a string
            chat("a"),  # a repeat
            "{not json",
            chat("b", n=0),  # a bad request with a custom_id: an answer in the output
        ],
    )
    table = output_rows(read_table(str(path), fmt="openai_batch"))
    encoder = writer("openai_batch")
    mask = encoder.error_rows(table).to_pylist()
    assert mask == [False, True, True, True, True, True, False]
    errors = [json.loads(x) for x in encoder.encode_errors(table.filter(mask)).splitlines()]
    assert [e["custom_id"] for e in errors] == [None, None, None, "a", None]
    for line, number in zip(errors, (2, 3, 4, 5, 6), strict=True):
        assert set(line) == {"id", "custom_id", "response", "error", "rgbatch"}
        assert line["response"] is None and line["id"].startswith("batch_req_")
        assert f"line {number}" in line["error"]["message"]
        assert line["rgbatch"]["source"] == str(path)
    codes = [e["error"]["code"] for e in errors]
    assert codes == ["invalid_custom_id"] * 4 + ["invalid_json_line"]
    assert "repeats an earlier line" in errors[3]["error"]["message"]
    kept = [json.loads(x) for x in encoder.encode(table.filter(pc.invert(mask))).splitlines()]
    assert [x["custom_id"] for x in kept] == ["a", "b"]
    assert kept[1]["error"]["code"] == "invalid_request"


def test_the_writer_routes_error_file_rows_and_counts_them(tmp_path: Path) -> None:
    """RunDatasink.write_block's routing, through its summary: every row is counted once."""
    from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME
    from ray.data.block import BlockAccessor

    from pipeline.writer import RunDatasink

    path = tmp_path / "batch.jsonl"
    write_lines(path, [chat("a"), chat(None), chat("b")])
    table = output_rows(read_table(str(path), fmt="openai_batch"))
    run = tmp_path / "run"
    (run / "errors").mkdir(parents=True)
    (run / "_stats").mkdir()
    sink = RunDatasink(
        str(run), fmt="openai_batch", filesystem=LocalFileSystem(), rows_per_file=1, threshold=None
    )
    ctx = SimpleNamespace(task_idx=0, kwargs={WRITE_UUID_KWARG_NAME: "u"})
    result = sink.write_block(BlockAccessor.for_block(table), 0, ctx)
    assert result == {"rows": 3, "rejected": 0, "error_file": 1}
    main = (run / "part-u-000000.jsonl").read_text().splitlines()
    errors = (run / "errors" / "part-u-000000.jsonl").read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in main] == ["a", "b"] and len(errors) == 1
    summary = RunSummary.loads((run / "_stats" / "part-u-000000.json").read_bytes())
    counts = summary.counts()
    assert (counts["rows"], counts["rows_written"], counts["rows_in_error_file"]) == (3, 2, 1)
    assert summary.rows_per_source[str(path)] == 3  # rows out per file include the error file


# Case 5 -----------------------------------------------------------------------------------------


def write_parquet(path: Path, columns: dict[str, list[Any]]) -> None:
    pq.write_table(pa.table(columns), str(path))


def test_case5_passthrough_types_across_files_get_one_type(tmp_path: Path) -> None:
    write_parquet(
        tmp_path / "a.parquet",
        {"text": ["x", "y"], "title": ["One", "Two"], "n": pa.array([1, 2], pa.int32())},
    )
    write_parquet(tmp_path / "b.parquet", {"text": ["z"], "title": [3], "n": [2.5]})
    write_parquet(
        tmp_path / "c.parquet", {"text": ["w"], "title": [{"k": 1}], "n": pa.array([4], pa.int64())}
    )
    files = [str(tmp_path / f"{n}.parquet") for n in "abc"]
    spec = ReadSpec(format="parquet", passthrough=("title", "n", "gone"))
    types = ParquetReader().plan_passthrough(files, spec)
    assert types == {"title": pa.string(), "n": pa.float64()}  # no type for a column none has
    spec = ReadSpec(format="parquet", passthrough=("title", "n", "gone"), passthrough_types=types)
    tables = [t for f in files for t in read_file(f, spec)]
    merged = pa.concat_tables(tables)  # what failed in the prompt actor: blocks concatenate
    assert merged["title"].to_pylist() == ["One", "Two", "3", '{"k": 1}']
    assert merged["n"].to_pylist() == [1.0, 2.0, 2.5, 4.0]
    assert merged["gone"].to_pylist() == [None] * 4


def test_case5_one_type_is_kept_and_missing_columns_take_it() -> None:
    schemas = {
        "a": pa.schema([("title", pa.int64())]),
        "b": pa.schema([("other", pa.string())]),
        "c": pa.schema([("title", pa.null())]),
    }
    assert passthrough_types(schemas, ["title"]) == {"title": pa.int64()}
    assert passthrough_types(schemas, []) == {}


# Case 6 -----------------------------------------------------------------------------------------


def jsonl_rows(n: int) -> bytes:
    return b"".join(
        json.dumps({"id": f"r{i}", "text": f"row {i}"}).encode() + b"\n" for i in range(n)
    )


def unreadable(table: pa.Table) -> list[dict[str, Any]]:
    return [r for r in table.to_pylist() if r[S.ERROR_KIND] == "unreadable_file"]


@pytest.mark.parametrize("damage", ["truncated", "crc"])
def test_case6_a_damaged_gz_keeps_its_readable_rows_and_adds_one_unreadable_row(
    tmp_path: Path, damage: str
) -> None:
    rows = 30_000
    packed = gzip.compress(jsonl_rows(rows))
    if damage == "truncated":
        packed = packed[: len(packed) // 2]
    else:  # the last bytes hold the CRC: every row decompresses, then the check fails
        packed = packed[:-8] + bytes(b ^ 0xFF for b in packed[-8:-4]) + packed[-4:]
    path = tmp_path / "f.jsonl.gz"
    path.write_bytes(packed)
    spec = ReadSpec(format="jsonl", id_column="id", passthrough=("title",), batch_rows=500)
    table = pa.concat_tables(read_file(str(path), spec))
    bad = unreadable(table)
    assert len(bad) == 1 and str(path) in bad[0][S.ERROR]
    good = [r for r in table.to_pylist() if r[S.ERROR] is None]
    assert [r[S.ID] for r in good] == [f"r{i}" for i in range(len(good))]  # in order, no gaps
    # What the last read before the damage decompressed is lost: at most SALVAGE_BUFFER bytes.
    lost = SALVAGE_BUFFER // len(jsonl_rows(1)) + 1
    assert len(good) >= (rows // 3 if damage == "truncated" else rows - lost), len(good)
    assert len(good) < rows
    assert f"after {len(good)} rows" in bad[0][S.ERROR]
    assert table.num_rows == len(good) + 1
    again = pa.concat_tables(read_file(str(path), spec))  # a rerun reads the same rows
    assert again[S.ROW_KEY].to_pylist() == table[S.ROW_KEY].to_pylist()
    assert again[S.ID].to_pylist() == table[S.ID].to_pylist()


def test_case6_an_openai_batch_gz_cut_short_keeps_its_lines(tmp_path: Path) -> None:
    raw = "".join(json.dumps(chat(f"c{i}")) + "\n" for i in range(2000)).encode()
    path = tmp_path / "batch.jsonl.gz"
    path.write_bytes(gzip.compress(raw)[:-200])
    table = pa.concat_tables(read_file(str(path), ReadSpec(format="openai_batch")))
    bad = unreadable(table)
    assert len(bad) == 1 and bad[0][ob.REQ_CUSTOM_ID] is None  # so: to the error file
    assert table.num_rows > 1000 and table.schema.names == [
        *S.READ_SCHEMA.names,
        *ob.REQUEST_SCHEMA.names,
    ]


def damaged_parquets(tmp_path: Path) -> dict[str, Path]:
    table = pa.table({"id": [f"p{i}" for i in range(4000)], "text": ["word " * 20] * 4000})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=1000)
    raw = buffer.getvalue()
    paths = {name: tmp_path / f"{name}.parquet" for name in ("zero", "truncated", "page", "good")}
    paths["zero"].write_bytes(b"")
    paths["truncated"].write_bytes(raw[: len(raw) // 2])
    damaged = bytearray(raw)
    middle = len(raw) // 2
    damaged[middle : middle + 3000] = b"A" * 3000
    paths["page"].write_bytes(bytes(damaged))
    paths["good"].write_bytes(raw)
    return paths


def test_case6_zero_byte_truncated_or_damaged_parquet_becomes_one_unreadable_row(
    tmp_path: Path,
) -> None:
    paths = damaged_parquets(tmp_path)
    spec = ReadSpec(format="parquet", id_column="id", batch_rows=1000)
    for name, path in paths.items():
        table = pa.concat_tables(read_file(str(path), spec))
        bad = unreadable(table)
        good = table.num_rows - len(bad)
        if name == "good":
            assert (good, bad) == (4000, [])
            continue
        assert len(bad) == 1 and str(path) in bad[0][S.ERROR], name
        assert good == (0 if name in ("zero", "truncated") else good) and good < 4000
    # The progress total (footers on the driver) counts such a file as its one row.
    files = [str(p) for p in paths.values()]
    total = InputTotal.of_files(files, "parquet", None, {})
    page_rows = pa.concat_tables(read_file(str(paths["page"]), spec)).num_rows
    assert total.rows == 1 + 1 + 4000 + 4000 and page_rows >= 1


def test_case6_preflight_finds_columns_past_an_unreadable_first_file(
    tmp_path: Path, fixtures
) -> None:
    (tmp_path / "in").mkdir()
    paths = damaged_parquets(tmp_path / "in")
    paths["good"].rename(tmp_path / "in" / "z-good.parquet")
    paths["page"].unlink()  # its footer reads: the files before the good one are unreadable
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(tmp_path / "in" / "*.parquet"),
        output_uri=str(tmp_path / "out"),
    )
    data = yaml.safe_load(text)
    data["input"]["passthrough"] = []
    preflight(job_config(yaml.safe_dump(data), run_id="p"))  # the good file has the columns
    data["input"]["text_column"] = "body"
    with pytest.raises(ConfigError, match=r"'body' is not in .*z-good\.parquet"):
        preflight(job_config(yaml.safe_dump(data), run_id="p"))


# CR-only line endings ---------------------------------------------------------------------------


def test_cr_only_line_endings_are_split_on_cr(tmp_path: Path) -> None:
    records = [{"id": f"r{i}", "text": f"row\\r {i}"} for i in range(5)]
    body = b"\r".join(json.dumps(r).encode() for r in records) + b"\r\r"
    path = tmp_path / "mac.jsonl"
    path.write_bytes(body)
    table = read_table(str(path), id_column="id")
    assert table[S.ID].to_pylist() == [f"r{i}" for i in range(5)]
    assert table[S.ERROR].to_pylist() == [None] * 5
    assert table[S.TEXT].to_pylist()[1] == "row\\r 1"
    # Over the row limit, a CR-separated line is a row_too_large row; the others are read.
    large = b'{"id": "big", "text": "' + b"x" * 500 + b'"}'
    big = b"\r".join([json.dumps(records[0]).encode(), large, json.dumps(records[1]).encode()])
    path.write_bytes(big)
    rows = read_table(str(path), id_column="id", max_row_bytes=200).to_pylist()
    assert [r[S.ERROR_KIND] for r in rows] == [None, "row_too_large", None]
    assert f"line 2 has {len(large)} bytes" in rows[1][S.ERROR]


def test_one_json_object_with_cr_spaces_is_not_split(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_bytes(b'{"id": "a",\r"text": "one"}')
    rows = read_table(str(path), id_column="id").to_pylist()
    assert [(r[S.ID], r[S.TEXT], r[S.ERROR]) for r in rows] == [("a", "one", None)]
    path.write_bytes(b'{"id": "a",\r"text": "one"}\n{"id": "b", "text": "two"}\r\n')
    rows = read_table(str(path), id_column="id").to_pylist()
    assert [(r[S.ID], r[S.ERROR]) for r in rows] == [("a", None), ("b", None)]


# The error policy --------------------------------------------------------------------------------


def test_openai_batch_answers_do_not_count_towards_max_error_fraction() -> None:
    summary = RunSummary(
        rows=10, error_kinds=Counter({"invalid_request": 6, "invalid_custom_id": 2})
    )
    answered = ob.OpenAIBatchReader.answered_errors
    assert error_policy(summary, 0.5, answered) is None
    failure = error_policy(summary, 0.5)  # a corpus format: the same kinds fail the run
    assert failure is not None and "8 of 10 rows" in failure
    summary.error_kinds["generation"] = 6  # server side: counted
    failure = error_policy(summary, 0.5, answered)
    assert failure is not None and "6 of 10 rows" in failure and "invalid_request" not in failure
    summary.error_kinds = Counter({"unreadable_file": 6})
    assert error_policy(summary, 0.5, answered) is not None


# max_slots auto on CPU ---------------------------------------------------------------------------


def test_max_slots_auto_on_cpu_replicas_is_a_config_error(fixtures, tmp_path: Path) -> None:
    text = job_yaml(
        fixtures, task="summarize", input_uri=str(tmp_path / "*.jsonl"), output_uri=str(tmp_path)
    )
    data = yaml.safe_load(text)
    data["generation"]["max_slots"] = "auto"
    with pytest.raises(ConfigError, match=r"generation\.max_slots") as info:
        job_config(yaml.safe_dump(data), run_id="x")
    assert "CPU" in str(info.value)
    data["model"]["gpus_per_replica"] = 1
    assert job_config(yaml.safe_dump(data), run_id="x").generation.max_slots == "auto"
    data["model"]["gpus_per_replica"] = 0
    data["model"]["resources_per_replica"] = {"TPU": 4}
    assert job_config(yaml.safe_dump(data), run_id="x").generation.max_slots == "auto"


# Cases 5 and 6 end to end -----------------------------------------------------------------------


def test_case5_and_case6_a_parquet_corpus_with_mixed_types_and_broken_files(
    fixtures, tmp_path: Path, ray_cluster
) -> None:
    """Titles typed string in one file and int64 in another, a 0-byte file and a truncated
    one: the run succeeds with every good row once, one unreadable_file row per broken file
    (named in the manifest), rows in = rows out per file, and a rerun is already complete."""
    from pipeline.runner import run_job

    inp = tmp_path / "in"
    inp.mkdir()
    write_parquet(
        inp / "a.parquet",
        {"id": ["a0", "a1", "a2"], "text": ["One.", "Two.", "Three."], "title": ["x", "y", "z"]},
    )
    write_parquet(
        inp / "b.parquet", {"id": ["b0", "b1"], "text": ["Four.", "Five."], "title": [4, 5]}
    )
    (inp / "c-zero.parquet").write_bytes(b"")
    raw = (inp / "a.parquet").read_bytes()
    (inp / "d-cut.parquet").write_bytes(raw[: len(raw) // 2])
    text = job_yaml(
        fixtures,
        task="summarize",
        input_uri=str(inp / "*.parquet"),
        output_uri=str(tmp_path / "out"),
        extra={"toxicity": {"enabled": False}},
    )
    result = run_job(job_config(text, run_id="broken"))
    assert result.status == "succeeded"
    run_dir = tmp_path / "out" / "broken"
    table = pa.concat_tables(pq.read_table(p) for p in sorted(run_dir.glob("part-*.parquet")))
    rows = {r[S.ID]: r for r in table.to_pylist()}
    good = {k: r for k, r in rows.items() if r[S.ERROR_KIND] != "unreadable_file"}
    assert sorted(good) == ["a0", "a1", "a2", "b0", "b1"]
    assert table.schema.field("title").type == pa.string()
    assert {k: r["title"] for k, r in good.items()} == {
        "a0": "x",
        "a1": "y",
        "a2": "z",
        "b0": "4",
        "b1": "5",
    }
    broken = sorted(r[S.SOURCE] for r in rows.values() if r[S.ERROR_KIND] == "unreadable_file")
    assert broken == [str(inp / "c-zero.parquet"), str(inp / "d-cut.parquet")]
    manifest = result.manifest
    assert manifest["counts"]["unreadable_files"] == 2
    assert manifest["counts"]["error_kinds"] == {"unreadable_file": 2}
    for name in ("c-zero.parquet", "d-cut.parquet"):
        entry = manifest["inputs"][str(inp / name)]
        assert entry["rows_in"] == entry["rows_out"] == 1 and name in entry["unreadable"]
    assert manifest["inputs"][str(inp / "a.parquet")] == {"rows_in": 3, "rows_out": 3}
    assert run_job(job_config(text, run_id="broken")).status == "already_complete"
