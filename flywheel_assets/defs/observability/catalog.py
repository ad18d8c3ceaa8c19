"""FLYWHEEL_HOME/flywheel.duckdb: a view per Delta table, for DuckDB users (lib/catalog.py)."""

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from flywheel_assets.defs.observability.assets import AFTER_UPSTREAM
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.catalog import refresh_catalog

TABLE_ASSETS = ["session_events", "trajectories", "annotations", "session_feedback", "llm_judgments", "judge_scores",
                "trajectory_scores", "score_calibration", "curated_trajectories", "training_dataset"]


@dg.asset(group_name="observability", kinds={"duckdb"}, deps=TABLE_ASSETS, automation_condition=AFTER_UPSTREAM)
def duckdb_catalog(context: dg.AssetExecutionContext, flywheel: FlywheelResource,
                   catalog: DuckDBResource) -> dg.MaterializeResult:
    """FLYWHEEL_HOME/flywheel.duckdb: a view per Delta table that reads its current version at query time."""
    lake = flywheel.lake()
    try:
        with catalog.get_connection() as con:
            made = refresh_catalog(con, lake)
    except duckdb.IOException as busy:  # someone holds the file open; the views already read the newest data
        context.log.warning(f"{catalog.database} is open elsewhere; its views are unchanged: {busy}")
        return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(catalog.database),
                                              "updated": False, "reason": str(busy)})
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(catalog.database), "updated": True, "views": len(made["views"]),
        "view_names": ", ".join(made["views"]), "tables_not_created_yet": ", ".join(made["missing"]) or "none",
        "try": dg.MetadataValue.md(f"```\nduckdb {catalog.database} -readonly "
                                   "\"SELECT tier, count(*) FROM trajectory_scores GROUP BY tier\"\n```"),
    })
