"""The lake on S3-compatible object storage: a real S3 API server (moto's, from PyPI, started as
its own process on a free port and stopped after), the real clients (delta-rs, pyarrow, DuckDB
over arrow) and the product's own settings (FLYWHEEL_LAKE_URI, FLYWHEEL_STORAGE_OPTIONS)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import boto3
import dagster as dg
import duckdb
import pytest

from flywheel_assets.defs.feedback.assets import judge_scores, session_feedback, trajectory_scores
from flywheel_assets.defs.resources import resources
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import TRAJECTORY_SCORES
from flywheel_assets_tests.feedback.test_refresh import _ingest, _refresh_all, _snapshot, _world

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


def _keys(client, prefix: str) -> list[str]:
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for item in listed.get("Contents", [])]


def test_the_refreshes_on_object_storage_give_the_tables_a_local_lake_gives(s3, config):
    client, options = s3
    remote, local = Lake(config, root=f"s3://{BUCKET}/refresh", storage_options=options), Lake(config)
    world = _world(4, sessions=25)
    for batch in range(3):
        for lake in (remote, local):
            _ingest(lake, world, batch)
            _refresh_all(lake, config)
    assert _snapshot(remote) == _snapshot(local) and _snapshot(remote)["trajectory_scores"]
    assert any(key.endswith(".parquet") for key in _keys(client, "refresh/gold/trajectory_scores/"))
    con = duckdb.connect()  # the arrow datasets DuckDB queries read the objects through delta-rs
    remote.register(con, TRAJECTORY_SCORES)
    assert con.execute("SELECT count(*) FROM trajectory_scores WHERE origin = 'usage'").fetchone()[0] == sum(
        1 for row in local.read(TRAJECTORY_SCORES, columns=["origin"]).to_pylist() if row["origin"] == "usage")


def test_the_assets_write_where_the_environment_points(s3, home, config, monkeypatch):
    client, options = s3
    world = _world(5, sessions=25)
    staging = Lake(config, root=f"s3://{BUCKET}/assets", storage_options=options)
    _ingest(staging, world, 0)  # bronze rows as an ingest on another machine would leave them
    monkeypatch.setenv("FLYWHEEL_LAKE_URI", f"s3://{BUCKET}/assets")
    monkeypatch.setenv("FLYWHEEL_STORAGE_OPTIONS", options)
    defined = resources().resources
    result = dg.materialize([session_feedback, judge_scores, trajectory_scores],
                            resources={"flywheel": defined["flywheel"]})
    assert result.success
    assert any(key.endswith(".parquet") for key in _keys(client, "assets/gold/trajectory_scores/"))
    assert not (home / "lake").exists()  # nothing fell back to the local default
    landed = {row["trajectory_id"] for kind, batch, row in world if kind == "trajectories" and batch == 0}
    scored = staging.read(TRAJECTORY_SCORES, columns=["trajectory_id"]).column("trajectory_id").to_pylist()
    assert sorted(scored) == sorted(landed)  # one row per landed trajectory, read back from the bucket
