"""A real S3 API server for the object-storage tests: moto's (from PyPI), started as its own process
on a free port and stopped after; the clients are the product's own (delta-rs, pyarrow, DuckDB)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid

import boto3
import pytest

BUCKET = "flywheel-test"


@pytest.fixture(scope="module")
def s3():
    # its own process: in this one, a delta-rs call waiting on the server while holding the GIL
    # would wait for ever (a request timed out after 180 s so)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:  # not listening yet
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(0.2)
    options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
               # one writer per table at a time is the refresh lock's job (a local one: see README)
               "AWS_S3_ALLOW_UNSAFE_RENAME": "true"}
    yield client, json.dumps(options)
    server.terminate()
    server.wait(timeout=10)


def prefix_in_env(s3, monkeypatch, name: str, variable: str) -> str:
    """A prefix of its own under the test bucket, named by `variable` (FLYWHEEL_ARTIFACTS_URI,
    FLYWHEEL_LANDING_URI) with the server's credentials in its `…_STORAGE_OPTIONS` beside it."""
    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(variable, f"s3://{BUCKET}/{prefix}")
    monkeypatch.setenv(variable.removesuffix("_URI") + "_STORAGE_OPTIONS", s3[1])
    return prefix
