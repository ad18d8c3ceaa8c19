"""Bronze tables must have the declared schema and hold rows before anything is scored."""

import dagster as dg

from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.tables import SESSION_EVENTS, TRAJECTORIES, Table


def _schema_and_rows(table: Table):
    @dg.asset_check(asset=table.name, name=f"{table.name}_schema_and_rows", blocking=True,
                    description=f"{table.name} has the declared columns and types and is not empty.")
    def check(flywheel: FlywheelResource) -> dg.AssetCheckResult:
        lake = flywheel.lake()
        schema = lake.arrow_schema(table)
        if schema is None:
            return dg.AssetCheckResult(passed=False, description="table does not exist yet")
        # Delta names list items "element", arrow "item": the same type either way
        actual = {f.name: str(f.type).replace("<element:", "<item:") for f in schema}
        expected = {f.name: str(f.type) for f in table.schema}
        mismatched = {k: (expected[k], actual.get(k)) for k in expected if actual.get(k) != expected[k]}
        rows = lake.row_count(table)
        return dg.AssetCheckResult(
            passed=not mismatched and rows > 0,
            metadata={"rows": rows, "mismatched_columns": str(mismatched) if mismatched else "none"},
        )

    return check


session_events_check = _schema_and_rows(SESSION_EVENTS)
trajectories_check = _schema_and_rows(TRAJECTORIES)
