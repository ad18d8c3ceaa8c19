"""Staged rollout, one step per look: gate → canary (1%) → A/B treatment (9%) → champion.

* a candidate whose promotion gate passed goes to canary; one the gate blocked is retired;
* a canary that has served `canary_min_users` users becomes the A/B treatment unless its
  error-report rate is shown worse than the champion's beyond the guardrail margin (the
  lower 97.5% bound of the difference), which rolls it back;
* the treatment is analysed against the champion with the sequential A/B test
  (lib/experiments/ab.py) at every look: SHIP promotes it, ROLLBACK rolls it back.
Every step is a registry change with its reason and a row in ab_results.
"""

from __future__ import annotations

import json
import math
from datetime import datetime

import duckdb
import pyarrow as pa

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.experiments.ab import Decision, decide
from flywheel_assets.lib.experiments.ab_stats import arm_stats_by_metric, welch_difference
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.lake import Lake, sql_literal
from flywheel_assets.lib.tables import AB_RESULTS, OFFLINE_EVALUATIONS, SESSION_FEEDBACK, TRAJECTORIES

METRICS = ("quality", "error_reported", "retried")


def sessions_since(lake: Lake, versions: tuple[str, str], since: datetime, until: datetime) -> pa.Table:
    """(user_id, arm, quality, error_reported, retried) per session whose final trajectory
    one of the two versions served; arm = control for the first, treatment for the second."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    lake.register(con, SESSION_FEEDBACK)
    # files that hold neither version are skipped on their statistics, unopened
    lake.register(con, TRAJECTORIES, prune=f"model_version IN ({sql_literal(versions[0])}, {sql_literal(versions[1])})")
    return con.execute("""
        SELECT f.user_id, CASE WHEN t.model_version = $control THEN 'control' ELSE 'treatment' END AS arm,
               f.quality_score AS quality, f.error_reported::DOUBLE AS error_reported,
               (f.retry_count > 0)::DOUBLE AS retried
        FROM session_feedback f JOIN trajectories t ON t.trajectory_id = f.final_trajectory_id
        WHERE t.model_version IN ($control, $treatment) AND f.last_ts > $since AND f.last_ts <= $until
    """, {"control": versions[0], "treatment": versions[1], "since": since, "until": until}).to_arrow_table()


def advance(config: FlywheelConfig, lake: Lake, registry: ModelRegistry, now: datetime,
            waiting: list[str] | None = None) -> list[dict]:
    """One look at every live candidate; returns the ab_results rows written. Why a live
    candidate moved nothing (a canary short of users) is appended to `waiting`."""
    current = registry.current()
    champion = next((r for r in current if r["status"] == "champion"), None)
    if champion is None:
        return []
    rows = []
    # Only candidates need their gate: the evaluation files of other versions are skipped unopened.
    candidates = [r["version"] for r in current if r["status"] == "candidate"]
    gates = {r["version"]: r for r in lake.read(
        OFFLINE_EVALUATIONS, filter_sql="role = 'candidate' AND scope = 'overall'",
        prune=f"version IN ({', '.join(sql_literal(v) for v in candidates)})").to_pylist()} if candidates else {}
    for version in current:
        name, status = version["version"], version["status"]
        if status == "candidate" and name in gates:
            rows.append(_after_gate(config, registry, version, champion, gates[name], now))
        elif status == "canary":
            rows.append(_canary(config, lake, registry, version, champion, now, waiting))
        elif status == "treatment":
            rows.append(_treatment(config, lake, registry, version, champion, now))
    rows = [r for r in rows if r]
    if rows:
        lake.append(AB_RESULTS, pa.Table.from_pylist(rows, schema=AB_RESULTS.schema))
    return rows


def _row(version: dict, champion: dict, stage: str, now: datetime, outcome: str, rule: str, reason: str,
         decision: Decision | None = None) -> dict:
    row = {"test_id": f"ab-{version['version']}", "cycle": version["cycle"], "treatment": version["version"],
           "control": champion["version"], "stage": stage, "looked_at": now, "outcome": outcome, "rule": rule,
           "reason": reason}
    if decision is not None:
        row.update(effect=decision.effect, effect_low=decision.interval[0], effect_high=decision.interval[1],
                   p_value=decision.p_value, srm_p=decision.srm_p, users_control=decision.users.get("control"),
                   users_treatment=decision.users.get("treatment"),
                   decision_json=json.dumps(decision.as_dict(), default=str))
    return row


def _after_gate(config, registry, version, champion, gate, now) -> dict:
    if gate["gate_passed"]:
        registry.transition(version["version"], "canary", traffic_share=config.rollout.canary_share,
                            reason=f"passed the promotion gate: {gate['gate_reason']}", actor="ab_monitor")
        return _row(version, champion, "gate", now, "PROCEED", "gate", gate["gate_reason"])
    registry.transition(version["version"], "retired", reason=f"blocked by the promotion gate: {gate['gate_reason']}",
                        actor="ab_monitor")
    return _row(version, champion, "gate", now, "ROLLBACK", "gate", gate["gate_reason"])


def _stage_start(registry: ModelRegistry, version: str, status: str) -> datetime:
    return [r for r in registry.history(version) if r["status"] == status][-1]["changed_at"]


def _canary(config, lake, registry, version, champion, now, waiting: list[str] | None = None) -> dict | None:
    sessions = sessions_since(lake, (champion["version"], version["version"]),
                              _stage_start(registry, version["version"], "canary"), now)
    stats = arm_stats_by_metric(sessions, list(METRICS))
    users = stats["error_reported"]["treatment"].users
    if users < config.rollout.canary_min_users:  # nothing to record until the canary has served enough users
        if waiting is not None:
            waiting.append(f"canary {version['version']} has served {users} of the {config.rollout.canary_min_users} "
                           f"users it needs (rollout.canary_min_users; it gets rollout.canary_share = "
                           f"{config.rollout.canary_share:.0%} of users)")
        return None
    control, treatment = stats["error_reported"]["control"], stats["error_reported"]["treatment"]
    # Rolled back when shown worse: the harm's lower 97.5% bound beyond the guardrail margin.
    # A point estimate over a canary's few users is mostly noise (23 users: ±12 points), and
    # the A/B test's non-inferiority guardrails judge small harms on many more users.
    harm = welch_difference(control, treatment)
    low = harm.effect - 1.96 * harm.se if math.isfinite(harm.se) else harm.effect
    if low > config.ab.guardrail_margin:
        reason = (f"canary error-report rate {treatment.mean:.1%} vs champion {control.mean:.1%} over {users} users "
                  f"(harm ≥ {low:+.1%} at 97.5%, margin {config.ab.guardrail_margin:+.0%})")
        registry.rollback(version["version"], reason=reason, actor="ab_monitor")
        return _row(version, champion, "canary", now, "ROLLBACK", "guardrail", reason)
    reason = (f"canary healthy over {users} users (error reports {treatment.mean:.1%} vs {control.mean:.1%}, "
              f"not shown worse than {config.ab.guardrail_margin:+.0%}: harm ≥ {low:+.1%})")
    registry.transition(version["version"], "treatment", traffic_share=config.rollout.treatment_share,
                        reason=reason, actor="ab_monitor")
    return _row(version, champion, "canary", now, "PROCEED", "canary", reason)


def _planned_split(registry: ModelRegistry, version: dict) -> float:
    """The treatment's share of the users the test compares (its own and the champion's),
    from the layout the router serves now: the champion has what no canary or treatment
    holds, so a canary of a later candidate, when there is one, shrinks the champion's part."""
    live = registry.serving()
    treatment = next(r["traffic_share"] for r in live["treatment"] if r["version"] == version["version"])
    champion = 1.0 - sum(r["traffic_share"] for r in live["canary"] + live["treatment"])
    return treatment / (treatment + champion)


def _treatment(config, lake, registry, version, champion, now) -> dict:
    started = _stage_start(registry, version["version"], "treatment")
    sessions = sessions_since(lake, (champion["version"], version["version"]), started, now)
    stats = arm_stats_by_metric(sessions, list(METRICS))
    share = _planned_split(registry, version)
    decision = decide(stats["quality"]["control"], stats["quality"]["treatment"],
                      config.ab.model_copy(update={"treatment_share": share}), started_at=started, now=now,
                      guardrails={"error_reported": (stats["error_reported"]["control"],
                                                     stats["error_reported"]["treatment"]),
                                  "retried": (stats["retried"]["control"], stats["retried"]["treatment"])})
    if decision.outcome == "SHIP":
        registry.transition(version["version"], "champion", reason=f"A/B SHIP: {decision.reason}", actor="ab_monitor")
    elif decision.outcome == "ROLLBACK":
        registry.rollback(version["version"], reason=f"A/B ROLLBACK: {decision.reason}", actor="ab_monitor")
    return _row(version, champion, "treatment", now, decision.outcome, decision.rule, decision.reason, decision)
