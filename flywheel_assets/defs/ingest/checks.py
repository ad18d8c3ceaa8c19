"""Bronze tables must have the declared schema; an absent or empty one is only a warning.

A landing zone may hold events alone or trajectories alone: each still feeds the scores it
can (events → session_feedback, trajectories → judge_scores and trajectory_scores). What must
not be empty is what trains a model, and that is checked where it is built (curation/checks.py).
"""

import dagster as dg

from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.tables import SESSION_EVENTS, TRAJECTORIES, Table


def _schema_and_rows(table: Table):
    @dg.asset_check(asset=table.name, name=f"{table.name}_schema_and_rows", blocking=True,
                    description=f"{table.name} has the declared columns and types (blocks scoring if not); "
                                "absent or empty is a warning that blocks nothing.")
    def check(flywheel: FlywheelResource) -> dg.AssetCheckResult:
        lake = flywheel.lake()
        schema = lake.arrow_schema(table)
        if schema is None:
            # nothing of this kind has landed yet: the scorers read it as an empty table with the declared schema
            return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN,
                                       description="table does not exist yet", metadata={"rows": 0})
        mismatched = _mismatched_columns(schema, table)
        rows = lake.row_count(table)
        metadata = {"rows": rows, "mismatched_columns": str(mismatched) if mismatched else "none"}
        if mismatched:
            return dg.AssetCheckResult(passed=False, metadata=metadata,
                                       description="schema differs from the declared one")
        if rows == 0:
            return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, metadata=metadata,
                                       description="table is empty")
        return dg.AssetCheckResult(passed=True, metadata=metadata)

    return check


def _mismatched_columns(schema, table: Table) -> dict:
    # Delta names list items "element", arrow "item": the same type either way
    actual = {f.name: str(f.type).replace("<element:", "<item:") for f in schema}
    expected = {f.name: str(f.type) for f in table.schema}
    return {k: (expected[k], actual.get(k)) for k in expected if actual.get(k) != expected[k]}


session_events_check = _schema_and_rows(SESSION_EVENTS)
trajectories_check = _schema_and_rows(TRAJECTORIES)
