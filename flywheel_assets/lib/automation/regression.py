"""After a promotion: is the new champion worse online than the one it replaced?

The champion's mean session quality since its promotion is compared with the
previous champion's over the week before the promotion. A relative drop beyond the
trigger's degradation threshold (−5%), on at least `min_sessions` sessions on each
side, means roll back: the previous champion serves again. Each lane (lib/tenancy.py) is
watched on its own: its promotions, its users' sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import duckdb

from flywheel_assets.lib.lake import Lake, sql_literal
from flywheel_assets.lib.tables import SESSION_FEEDBACK, TRAJECTORIES
from flywheel_assets.lib.tenancy import SHARED, lane_of


@dataclass(frozen=True)
class RegressionVerdict:
    rollback: bool
    reason: str
    champion_quality: float | None = None
    previous_quality: float | None = None


def quality_by_version(lake: Lake, version: str, start: datetime, end: datetime,
                       served: str = "true") -> tuple[float | None, int]:
    """Mean quality_score and count of sessions whose final trajectory this version served
    (`served`: a SQL condition on t.tenant_id, the lane's users)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    lake.register(con, SESSION_FEEDBACK)
    lake.register(con, TRAJECTORIES, prune=f"model_version = {sql_literal(version)}")  # skip files without it
    mean, count = con.execute(f"""
        SELECT avg(f.quality_score), count(*)
        FROM session_feedback f JOIN trajectories t ON t.trajectory_id = f.final_trajectory_id
        WHERE t.model_version = $version AND f.last_ts > $start AND f.last_ts <= $end AND ({served})
    """, {"version": version, "start": start, "end": end}).fetchone()
    return mean, count


def check_regression(lake: Lake, history: list[dict], now: datetime, threshold: float = -0.05,
                     min_sessions: int = 50, baseline_days: float = 7, lane: str = SHARED,
                     served: str = "true") -> RegressionVerdict:
    """`history` is the registry's, oldest first; `lane` and `served` (TenancyConfig.served_sql):
    the lane whose promotions are watched, on its users' sessions."""
    promotions = [r for r in history if r["status"] == "champion" and lane_of(r) == lane]
    if len(promotions) < 2:
        return RegressionVerdict(False, "no promotion to watch: the first champion has no predecessor")
    current, previous = promotions[-1], next(
        (r for r in reversed(promotions[:-1]) if r["version"] != promotions[-1]["version"]), None)
    if previous is None:
        return RegressionVerdict(False, "no previous champion")
    promoted_at = current["changed_at"]
    champion_quality, champion_n = quality_by_version(lake, current["version"], promoted_at, now, served)
    previous_quality, previous_n = quality_by_version(
        lake, previous["version"], promoted_at - timedelta(days=baseline_days), promoted_at, served)
    if champion_n < min_sessions or previous_n < min_sessions or not previous_quality:
        return RegressionVerdict(False, f"waiting for data: {champion_n} sessions of {current['version']} since "
                                        f"promotion, {previous_n} of {previous['version']} before (need {min_sessions})",
                                 champion_quality, previous_quality)
    change = (champion_quality - previous_quality) / abs(previous_quality)
    if change <= threshold:
        return RegressionVerdict(True, f"{current['version']} quality {champion_quality:.3f} vs {previous['version']} "
                                       f"{previous_quality:.3f} ({change:+.1%}, threshold {threshold:+.0%})",
                                 champion_quality, previous_quality)
    return RegressionVerdict(False, f"{current['version']} holds: {change:+.1%} against {previous['version']}",
                             champion_quality, previous_quality)
