"""The lake on S3-compatible object storage: a real S3 API server (moto's, from PyPI, started as
its own process on a free port and stopped after), the real clients (delta-rs, pyarrow, DuckDB
over arrow) and the product's own settings (FLYWHEEL_LAKE_URI, FLYWHEEL_STORAGE_OPTIONS)."""

from __future__ import annotations

import dagster as dg
import duckdb

from flywheel_assets.defs.feedback.assets import judge_scores, session_feedback, trajectory_scores
from flywheel_assets.defs.resources import resources
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import TRAJECTORY_SCORES
from flywheel_assets_tests.feedback.test_refresh import _ingest, _refresh_all, _snapshot, _world
from flywheel_assets_tests.storage.s3_server import BUCKET, s3  # noqa: F401  (the fixture)


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
