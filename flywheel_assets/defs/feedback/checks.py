"""Scores must stay within [-1, 1] before any of them selects training data."""

import dagster as dg

from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.tables import TRAJECTORY_SCORES


@dg.asset_check(asset="trajectory_scores", blocking=True,
                description="Every implicit, judge and combined score lies in [-1, 1] and every row has a tier.")
def scores_within_bounds(flywheel: FlywheelResource) -> dg.AssetCheckResult:
    scores = flywheel.lake().read(TRAJECTORY_SCORES, filter_sql=(
        "NOT (combined_score BETWEEN -1 AND 1) OR combined_score IS NULL OR tier IS NULL"
        " OR NOT coalesce(implicit_score BETWEEN -1 AND 1, true) OR NOT coalesce(judge_score BETWEEN -1 AND 1, true)"))
    return dg.AssetCheckResult(passed=scores.num_rows == 0, metadata={
        "rows_out_of_bounds": scores.num_rows,
        "examples": str(scores.column("trajectory_id").to_pylist()[:5]) if scores.num_rows else "none",
    })
