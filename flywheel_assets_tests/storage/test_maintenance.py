"""Lake upkeep: compaction and vacuum shrink what is stored, change no row, and keep every version a
dataset manifest pinned readable (the comparison arms time-travel to them); the key index is
merged last."""

import json
import os

import duckdb
import pyarrow as pa
import pytest

from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.storage import key_index
from flywheel_assets.lib.storage.key_index import keyed
from flywheel_assets.lib.storage.maintenance import footprint, maintain
from flywheel_assets.lib.tables import CURATED_TRAJECTORIES, DATASET_MANIFESTS, MODEL_REGISTRY


def _curated(n: int, tag: str) -> pa.Table:
    return conform(pa.Table.from_pylist([{"trajectory_id": f"t{i}", "messages_json": f"{tag}-{i}" * 50,
                                          "split": "train"} for i in range(n)]), CURATED_TRAJECTORIES)


def test_maintenance_shrinks_the_lake_and_keeps_pinned_versions(config, lake, monkeypatch):
    for rewrite in range(6):  # a table rewritten by every ingest, as curation does
        lake.overwrite(CURATED_TRAJECTORIES, _curated(200, f"v{rewrite}"))
        if rewrite == 2:
            pinned = lake.version(CURATED_TRAJECTORIES)
            lake.append(DATASET_MANIFESTS, conform(pa.Table.from_pylist([{
                "cycle": "c1", "input_versions_json": json.dumps({CURATED_TRAJECTORIES.name: pinned})}]),
                DATASET_MANIFESTS))
    for i in range(20):  # small appends, as the registry gets
        lake.append(MODEL_REGISTRY, conform(pa.Table.from_pylist([{"event_id": str(i), "version": "v"}]), MODEL_REGISTRY))
    current = lake.read(CURATED_TRAJECTORIES).sort_by("trajectory_id")
    at_pin = lake.read(CURATED_TRAJECTORIES, version=pinned).sort_by("trajectory_id")
    files, size = footprint(lake, CURATED_TRAJECTORIES)
    assert files == 6

    con = duckdb.connect()
    con.register("keys", pa.table({"key": ["t1"]}))
    assert keyed(con, lake, CURATED_TRAJECTORIES, "trajectory_id", "keys").num_rows == 1  # the column indexed
    upkeep = maintain(config, lake, retention_hours=0)
    done = {u.table: u for u in upkeep.tables}
    # the table's log checkpointed (its version stays under the Lake's own CHECKPOINT_EVERY)
    assert os.path.exists(os.path.join(lake.uri(CURATED_TRAJECTORIES), "_delta_log", "_last_checkpoint"))
    # the key index merged last, over the current file: its 200 ids, in one run that answers a
    # lookup alone (no file's own index read)
    assert upkeep.index_entries_merged == 200
    monkeypatch.setattr(key_index, "_hashes", None)
    assert keyed(con, lake, CURATED_TRAJECTORIES, "trajectory_id", "keys").column("trajectory_id").to_pylist() == ["t1"]

    curated = done["gold/curated_trajectories"]
    assert (curated.files_before, curated.files_after, curated.pinned) == (6, 2, [pinned])  # current + pinned
    assert curated.bytes_after < size / 2 and curated.vacuumed == 4
    assert lake.read(CURATED_TRAJECTORIES).sort_by("trajectory_id").equals(current)  # no row changed
    assert lake.read(CURATED_TRAJECTORIES, version=pinned).sort_by("trajectory_id").equals(at_pin)
    with pytest.raises(Exception):  # an unpinned old version's files are gone
        lake.read(CURATED_TRAJECTORIES, version=pinned + 1)
    registry = done["gold/model_registry"]
    assert registry.files_after == 1 and registry.compacted == 20 and lake.row_count(MODEL_REGISTRY) == 20


def test_lake_maintenance_job_runs_under_dagster(home, lake):
    from dagster_duckdb import DuckDBResource

    from flywheel_assets.defs.resources import FlywheelResource
    from flywheel_assets.defs.storage.jobs import lake_maintenance_job

    lake.overwrite(CURATED_TRAJECTORIES, _curated(10, "a"))
    lake.overwrite(CURATED_TRAJECTORIES, _curated(10, "b"))
    result = lake_maintenance_job.execute_in_process(
        run_config={"ops": {"maintain_lake": {"config": {"retention_hours": 0}}}},
        resources={"flywheel": FlywheelResource(home=str(home)),
                   "catalog": DuckDBResource(database=str(home / "flywheel.duckdb"))})
    assert result.success and footprint(lake, CURATED_TRAJECTORIES)[0] == 1
