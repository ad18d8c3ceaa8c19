"""What the trigger looks at, read from the lake in a few grouped queries."""

from __future__ import annotations

from datetime import datetime

import duckdb

from flywheel_assets.lib.automation.trigger import TriggerState, performance_change
from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.lake import Lake, sql_literal
from flywheel_assets.lib.tables import DATASET_MANIFESTS, SESSION_FEEDBACK, TRAJECTORIES, TRAJECTORY_SCORES
from flywheel_assets.lib.tenancy import SHARED, lane_of_cycle_sql


def trigger_state(config: FlywheelConfig, lake: Lake, now: datetime, champion: str | None,
                  champion_since: datetime | None = None, lane: str = SHARED) -> TriggerState:
    """champion_since: when the champion was promoted. Only its sessions since then count
    for its rolling quality: before, it served a canary's or a treatment's share of users,
    and comparing that subset with the whole population flagged a drop that was not one.
    `lane` (lib/tenancy.py): its cycles, the data it may train on and its users' sessions only."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for table in (DATASET_MANIFESTS, TRAJECTORY_SCORES, SESSION_FEEDBACK):
        lake.register(con, table)
    # only the champion's trajectories are joined: the files that hold none are not opened
    lake.register(con, TRAJECTORIES, prune=None if champion is None else f"model_version = {sql_literal(champion)}")
    last_training = con.execute(f"SELECT max(created_at) FROM dataset_manifests WHERE {lane_of_cycle_sql()} = $lane",
                                {"lane": lane}).fetchone()[0]
    real, new, high = con.execute(f"""
        SELECT count(*),
               count(*) FILTER (WHERE $last IS NULL OR created_at > $last),
               count(*) FILTER (WHERE ($last IS NULL OR created_at > $last) AND combined_score >= $threshold)
        FROM trajectory_scores WHERE origin = 'usage' AND created_at <= $now AND ({config.tenancy.lane_sql(lane)})
    """, {"last": last_training, "threshold": config.curation.high_quality_threshold, "now": now}).fetchone()
    daily = []
    if champion is not None:
        daily = con.execute(f"""
            SELECT date_trunc('hour', f.last_ts) AS hour, avg(f.quality_score), count(*)
            FROM session_feedback f JOIN trajectories t ON t.trajectory_id = f.final_trajectory_id
            WHERE t.model_version = $champion AND f.last_ts <= $now
              AND ($since IS NULL OR f.last_ts > $since) AND ({config.tenancy.served_sql(lane, 't.tenant_id')})
            GROUP BY 1 ORDER BY 1
        """, {"champion": champion, "now": now, "since": champion_since}).fetchall()
    return TriggerState(now=now, last_training=last_training, real_trajectories=real, new_scored=new,
                        new_high_quality=high, performance_change=performance_change(daily, now))
