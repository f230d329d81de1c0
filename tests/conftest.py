"""Shared fixtures: a local S3 stand-in served by moto and a GCS emulator, both on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

# gcsfs probes for hierarchical-namespace buckets over gRPC (60 s against an emulator) unless this
# is off; set before any import of gcsfs here and in the Ray workers the tests start.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Ray waits 60 s for its (minimal) dashboard process to report, then logs an error and goes on
# without it; two test processes on two cores can make it slower than that. Waiting longer keeps
# that error out of the run outputs the tests read.
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")

FAKE_KEY = "testing"
FAKE_SECRET = "testing"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on a free local port for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(
    s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, Any]]:
    """A fresh, empty bucket on the moto server: returns (bucket_name, storage_options).

    Fake credentials are put in the environment (and real AWS config files hidden) for the test.
    """
    import s3fs

    aws_home = tmp_path_factory.mktemp("aws-home")
    for name, value in {
        "AWS_ACCESS_KEY_ID": FAKE_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(aws_home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws_home / "credentials"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)

    storage_options: dict[str, Any] = {
        "client_kwargs": {"endpoint_url": s3_server},
        "key": FAKE_KEY,
        "secret": FAKE_SECRET,
    }
    bucket = f"rgbatch-test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**storage_options)
    fs.mkdir(bucket)
    fs.invalidate_cache()
    return bucket, storage_options


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    """gcp-storage-emulator (in memory) on a free local port; yields its endpoint URL."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_server: str) -> tuple[str, dict[str, Any]]:
    """A fresh bucket on the GCS emulator: returns (bucket_name, storage_options)."""
    import gcsfs

    storage_options: dict[str, Any] = {
        "endpoint_url": gcs_server,
        "token": "anon",
        "project": "rgbatch-test",
    }
    bucket = f"rgbatch-test-{uuid.uuid4().hex[:12]}"
    fs = gcsfs.GCSFileSystem(**storage_options)
    fs.mkdir(bucket)
    fs.invalidate_cache()
    return bucket, storage_options
