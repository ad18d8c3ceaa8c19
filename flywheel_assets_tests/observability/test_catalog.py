"""flywheel.duckdb: one file opens every table, and its views follow the tables' new versions."""

from datetime import datetime, timezone

import dagster as dg
import duckdb
import pyarrow as pa
from dagster_duckdb import DuckDBResource

from flywheel_assets.defs.observability.catalog import duckdb_catalog
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.tables import SESSION_EVENTS, TRAJECTORIES


def _events(n: int, start: int = 0) -> pa.Table:
    return conform(pa.Table.from_pylist([
        {"event_id": f"e{i}", "session_id": f"s{i % 3}", "event_type": "output_accepted",
         "ts": datetime(2026, 11, 1, tzinfo=timezone.utc)} for i in range(start, start + n)]), SESSION_EVENTS)


def test_the_catalog_answers_for_every_table_and_sees_the_next_append(home, lake):
    lake.append(SESSION_EVENTS, _events(5))
    lake.append(TRAJECTORIES, conform(pa.Table.from_pylist([{"trajectory_id": "t1"}]), TRAJECTORIES))
    database = str(home / "flywheel.duckdb")
    result = dg.materialize([duckdb_catalog], resources={"flywheel": FlywheelResource(home=str(home)),
                                                         "catalog": DuckDBResource(database=database)})
    assert result.success
    metadata = result.asset_materializations_for_node("duckdb_catalog")[0].metadata
    assert metadata["views"].value == 2 and "trajectory_scores" in metadata["tables_not_created_yet"].value

    def count(table: str) -> int:
        with duckdb.connect(database, read_only=True) as con:  # a user's own connection: the extension autoloads
            return con.sql(f"SELECT count(*) FROM {table}").fetchone()[0]

    assert (count("session_events"), count("trajectories")) == (5, 1)
    lake.append(SESSION_EVENTS, _events(4, start=5))  # the next ingest: no catalog refresh in between
    assert count("session_events") == 9
    with duckdb.connect(database, read_only=True) as con:
        joined = con.sql("SELECT count(DISTINCT e.session_id) FROM session_events e "
                         "LEFT JOIN trajectories t USING (trajectory_id)").fetchone()[0]
    assert joined == 3
