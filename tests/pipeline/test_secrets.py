"""Secrets in URIs: userinfo and query strings are masked wherever a URI is written or printed
(the manifest's config block, the report page, the CLI's output and errors, every log record)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as cli_main
from pipeline.config import load_job_config, redacted_dict
from pipeline.report import build_report
from pipeline.secrets import MaskingFilter, install_log_masking, mask_text, mask_uri
from pipeline.summary import RunSummary

# Every secret below appears in SECRETS, and none may survive masking.
INPUT_URI = "s3://AKIAEXAMPLEKEY:wJalr/XUtnFEMI+K7MDENG@corpora/news/*.jsonl?versionId=v-s3cr3t"
OUTPUT_URI = "https://alice:ghp_outputT0ken@storage.example.com/out?X-Amz-Signature=0ut5ig&x=1"
CHECKPOINT = "gs://models/rg/2b-it?sig=ck5ig#token=fr4gment"
SECRETS = (
    "AKIAEXAMPLEKEY",
    "wJalr",
    "XUtnFEMI",
    "K7MDENG",
    "v-s3cr3t",
    "alice",
    "ghp_outputT0ken",
    "0ut5ig",
    "ck5ig",
    "fr4gment",
)


def assert_no_secret(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{leaked} in {text!r}"


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        ("https://user:token@host/a/b.jsonl", "https://***@host/a/b.jsonl"),
        ("s3://KEY:SECRET@bucket/x/*.parquet", "s3://***@bucket/x/*.parquet"),
        ("s3://KEY:se/cr+et@bucket/x", "s3://***@bucket/x"),  # an AWS secret with a slash
        ("https://token@host:8443/p", "https://***@host:8443/p"),
        (
            "https://h/f?X-Amz-Signature=abc&X-Amz-Date=1",
            "https://h/f?X-Amz-Signature=***&X-Amz-Date=***",
        ),
        ("https://h/f?sig=abc", "https://h/f?sig=***"),
        ("https://h/f?justatoken", "https://h/f?***"),
        ("https://h/f#access_token=abc", "https://h/f#access_token=***"),
        ("https://u:p@h/f?a=1#b", "https://***@h/f?a=***#***"),
        ("simplecache::s3://k:s@bucket/key", "simplecache::s3://***@bucket/key"),
        # unchanged: no userinfo, no query
        ("s3://bucket/{date}/*.jsonl", "s3://bucket/{date}/*.jsonl"),
        ("http://127.0.0.1:8265", "http://127.0.0.1:8265"),
        ("http://host:8080/a@b", "http://host:8080/a@b"),
        ("hf://datasets/org/name@main/train.parquet", "hf://datasets/org/name@main/train.parquet"),
        ("/data/in/*.jsonl", "/data/in/*.jsonl"),
        ("data/what?.jsonl", "data/what?.jsonl"),
        ("relative/user@host/x", "relative/user@host/x"),
        ("", ""),
    ],
)
def test_mask_uri(uri: str, masked: str) -> None:
    assert mask_uri(uri) == masked
    assert mask_uri(masked) == masked  # idempotent


def test_mask_text_masks_every_uri_in_free_text() -> None:
    text = (
        f"cannot open '{INPUT_URI}': 403; retried {OUTPUT_URI}, then ({CHECKPOINT}). "
        "Also see https://docs.example.com/page and /local/path?x=1."
    )
    masked = mask_text(text)
    assert_no_secret(masked)
    assert "cannot open 's3://***@corpora/news/*.jsonl?versionId=***': 403" in masked
    assert "(gs://models/rg/2b-it?sig=***#token=***). " in masked
    assert "https://docs.example.com/page and /local/path?x=1." in masked
    assert mask_text(masked) == masked
    assert mask_text("no uri here: a=1?b") == "no uri here: a=1?b"


def secret_config_text(tmp_path: Path) -> str:
    return yaml.safe_dump(
        {
            "task": "summarize",
            "input": {"uri": INPUT_URI, "format": "jsonl"},
            "model": {"checkpoint": CHECKPOINT},
            "output": {"uri": OUTPUT_URI},
            "run": {"checkpoint_uri": "s3://k3y:s3cr3t-ck@ckpt-bucket/r"},
        }
    )


def test_manifest_config_block_has_no_secret(tmp_path: Path) -> None:
    config = load_job_config(text=secret_config_text(tmp_path), environ={}, run_id="r1")
    red = redacted_dict(config)
    text = json.dumps(red)
    assert_no_secret(text)
    assert "s3cr3t-ck" not in text and "k3y" not in text
    assert red["input"]["uri"] == "s3://***@corpora/news/*.jsonl?versionId=***"
    assert red["model"]["checkpoint"] == "gs://models/rg/2b-it?sig=***#token=***"
    assert red["output"]["uri"].startswith("https://***@storage.example.com/out?")


def test_report_page_has_no_secret(tmp_path: Path) -> None:
    config = load_job_config(text=secret_config_text(tmp_path), environ={}, run_id="r1")
    manifest = {
        "run_id": "r1",
        "status": "succeeded",
        "task": "summarize",
        "model": [CHECKPOINT],
        "input_files": [INPUT_URI.replace("*", "part-0")],
        # an old manifest could carry an unmasked config block
        "config": config.model_dump(mode="json"),
    }
    summary = RunSummary()
    summary.error_kinds["generation"] = 1
    summary.error_examples["generation"] = f"could not read {OUTPUT_URI}"
    page = build_report(manifest, summary, [], run_dir=f"{OUTPUT_URI}/r1")
    assert_no_secret(page)
    assert "corpora/news/part-0.jsonl" in page and "storage.example.com/out" in page


def test_cli_error_output_has_no_secret(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = yaml.safe_load(secret_config_text(tmp_path))
    # memory:// answers at once: every preflight check fails, naming its URI
    data["input"]["uri"] = INPUT_URI.replace("s3://", "memory://")
    data["model"]["checkpoint"] = CHECKPOINT.replace("gs://", "memory://")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    assert cli_main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "input.uri" in err and "model.checkpoint" in err
    assert_no_secret(err)
    assert "memory://***@corpora" in err


def test_cli_output_has_no_secret(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """What validate prints on success: the run directory, masked."""
    data = yaml.safe_load(secret_config_text(tmp_path))
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.jsonl").write_text('{"id": "1", "text": "x"}\n')
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    data["input"]["uri"] = str(inputs / "*.jsonl")
    data["model"]["checkpoint"] = str(checkpoint)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(data))
    assert cli_main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert "https://***@storage.example.com/out" in out
    assert_no_secret(out)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers = {h: list(h.filters) for h in root.handlers}
    factory = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(factory)
    for handler, filters in handlers.items():
        handler.filters[:] = filters


def test_masking_filter_masks_message_args_and_traceback() -> None:
    try:
        raise OSError(f"403 Forbidden for {OUTPUT_URI}")
    except OSError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "s3fs", logging.WARNING, __file__, 1, "reading %s from %s", (INPUT_URI, "x"), exc_info
    )
    assert MaskingFilter().filter(record)
    text = logging.Formatter("%(message)s").format(record)
    assert_no_secret(text)
    assert "reading s3://***@corpora" in text and "OSError: 403 Forbidden for https://***@" in text


def test_log_masking_reaches_library_loggers(
    restore_logging: None, caplog: pytest.LogCaptureFixture
) -> None:
    install_log_masking()
    install_log_masking()  # idempotent
    root = logging.getLogger()
    assert all(sum(isinstance(f, MaskingFilter) for f in h.filters) == 1 for h in root.handlers)
    with caplog.at_level(logging.INFO):
        logging.getLogger("fsspec.http").info("GET %s", OUTPUT_URI)
        logging.getLogger("botocore.endpoint").warning(f"retrying {CHECKPOINT}")
    assert_no_secret(caplog.text)
    assert "GET https://***@storage.example.com/out?X-Amz-Signature=***&x=***" in caplog.text
    assert all(not set(SECRETS) & {str(a) for a in r.args or ()} for r in caplog.records)
