"""Staged rollout, one step per look: gate → canary (1%) → A/B treatment (9%) → champion.

* a candidate whose promotion gate passed goes to canary; one the gate blocked is retired;
* a canary that has served `canary_min_users` users becomes the A/B treatment unless its
  error-report rate is shown worse than the champion's beyond the guardrail margin (the
  same non-inferiority rule as the A/B test's guardrails, `ab.guardrail_check`), which
  rolls it back; when it becomes the treatment, the test's sample-size plan is made from
  the champion's recent traffic and kept in the registry (metadata `ab_plan`);
* the treatment is analysed against the champion with the sequential A/B test
  (lib/experiments/ab.py) at every look: SHIP promotes it, ROLLBACK rolls it back.
Every step is a registry change with its reason and a row in ab_results. Each lane
(lib/tenancy.py) rolls out on its own: a private lane's candidate is compared with the version
serving that lane's users, on those users' sessions only.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import duckdb
import pyarrow as pa

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.experiments.ab import Decision, decide, guardrail_check
from flywheel_assets.lib.experiments.ab_stats import arm_stats_by_metric, ratio_estimate
from flywheel_assets.lib.experiments.power import PRIMARY, Plan, make_plan
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.lake import Lake, sql_literal
from flywheel_assets.lib.tables import AB_RESULTS, OFFLINE_EVALUATIONS, SESSION_FEEDBACK, TRAJECTORIES
from flywheel_assets.lib.tenancy import SHARED, lane_of

METRICS = ("quality", "error_reported", "retried")


def sessions_since(lake: Lake, versions: tuple[str, str], since: datetime, until: datetime,
                   covariate_days: float = 0.0, served: str = "true") -> pa.Table:
    """(user_id, arm, quality, error_reported, retried, pre_quality) per session whose final
    trajectory one of the two versions served; arm = control for the first, treatment for
    the second. pre_quality is the user's mean quality on the first version (the champion)
    over the `covariate_days` before `since`, NULL without such sessions: the CUPED covariate,
    measured before the test and on one version, so it cannot differ between the arms.
    `served`: a SQL condition on `t.tenant_id`, the tenants of the lane under test
    (TenancyConfig.served_sql): a hybrid lane's control is the shared champion, on its users only."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    lake.register(con, SESSION_FEEDBACK)
    # files that hold neither version are skipped on their statistics, unopened
    lake.register(con, TRAJECTORIES, prune=f"model_version IN ({sql_literal(versions[0])}, {sql_literal(versions[1])})")
    return con.execute(f"""
        WITH pre AS (
            SELECT f.user_id, avg(f.quality_score) FILTER (WHERE isfinite(f.quality_score)) AS pre_quality
            FROM session_feedback f JOIN trajectories t ON t.trajectory_id = f.final_trajectory_id
            WHERE t.model_version = $control AND f.last_ts > $pre_since AND f.last_ts <= $since AND ({served})
            GROUP BY f.user_id
        )
        SELECT f.user_id, CASE WHEN t.model_version = $control THEN 'control' ELSE 'treatment' END AS arm,
               f.quality_score AS quality, f.error_reported::DOUBLE AS error_reported,
               (f.retry_count > 0)::DOUBLE AS retried, pre.pre_quality
        FROM session_feedback f JOIN trajectories t ON t.trajectory_id = f.final_trajectory_id
        LEFT JOIN pre ON pre.user_id = f.user_id
        WHERE t.model_version IN ($control, $treatment) AND f.last_ts > $since AND f.last_ts <= $until
          AND ({served})
    """, {"control": versions[0], "treatment": versions[1], "since": since, "until": until,
          "pre_since": since - timedelta(days=covariate_days)}).to_arrow_table()


def champion_plan(config: FlywheelConfig, lake: Lake, champion: str, now: datetime, share: float,
                  champion_share: float, test_share: float, served: str = "true") -> Plan:
    """The A/B plan from the champion's sessions over the last max_days: each metric's
    per-user σ (capped as the test will be), and the users the test's arms can reach in
    max_days, scaled from the champion's `champion_share` of traffic to the test's `test_share`."""
    ab = config.ab
    pilot = sessions_since(lake, (champion, champion), now - timedelta(days=ab.max_days), now, served=served)
    stats = arm_stats_by_metric(pilot, list(METRICS), cap=ab.max_sessions_per_user)
    sigmas = {PRIMARY if name == "quality" else name: ratio_estimate(stats[name]["control"]).per_user_sigma
              for name in METRICS}
    if any(sigma != sigma for sigma in sigmas.values()):  # NaN: fewer than two users to learn from
        sigmas = {name: 0.5 for name in sigmas}  # the largest σ a metric in [0, 1] can have: a cautious plan
    reachable = stats["quality"]["control"].users * test_share / champion_share if champion_share > 0 else None
    return make_plan(ab.model_copy(update={"treatment_share": share}), sigmas, share, reachable)


def advance(config: FlywheelConfig, lake: Lake, registry: ModelRegistry, now: datetime,
            waiting: list[str] | None = None, apply: bool = True, cycle: str | None = None) -> list[dict]:
    """One look at every live candidate (or only `cycle`'s); returns the ab_results rows
    written. Why a live candidate moved nothing (a canary short of users) is appended to
    `waiting`. With apply=False nothing is written: the rows are what a look would decide
    (ab_monitor decides so; the run it requests looks again and acts)."""
    if not apply:
        registry = _DryRun(registry)
    current = registry.current()
    if registry.lane_champion(SHARED, current) is None:
        return []
    rows = []
    # Only candidates need their gate: the evaluation files of other versions are skipped unopened.
    candidates = [r["version"] for r in current if r["status"] == "candidate"]
    gates = {r["version"]: r for r in lake.read(
        OFFLINE_EVALUATIONS, filter_sql="role = 'candidate' AND scope = 'overall'",
        prune=f"version IN ({', '.join(sql_literal(v) for v in candidates)})").to_pylist()} if candidates else {}
    for version in current:
        name, status = version["version"], version["status"]
        if cycle is not None and version["cycle"] != cycle:
            continue
        # each lane's candidates against the version serving that lane's users (lib/tenancy.py)
        champion = registry.lane_champion(lane_of(version), current)
        if status == "candidate" and name in gates:
            rows.append(_after_gate(config, registry, version, champion, gates[name], now))
        elif status == "canary":
            rows.append(_canary(config, lake, registry, version, champion, now, waiting))
        elif status == "treatment":
            rows.append(_treatment(config, lake, registry, version, champion, now))
    rows = [r for r in rows if r]
    if rows and apply:
        lake.append(AB_RESULTS, pa.Table.from_pylist(rows, schema=AB_RESULTS.schema))
    return rows


class _DryRun:
    """The registry as advance reads it, with every change left unwritten."""

    def __init__(self, registry: ModelRegistry):
        self._registry = registry

    def __getattr__(self, name):
        if name in ("transition", "rollback", "register"):
            return lambda *args, **kwargs: None
        return getattr(self._registry, name)


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


def _served(config: FlywheelConfig, version: dict) -> str:
    return config.tenancy.served_sql(lane_of(version), "t.tenant_id")


def _canary(config, lake, registry, version, champion, now, waiting: list[str] | None = None) -> dict | None:
    sessions = sessions_since(lake, (champion["version"], version["version"]),
                              _stage_start(registry, version["version"], "canary"), now,
                              served=_served(config, version))
    stats = arm_stats_by_metric(sessions, list(METRICS), cap=config.ab.max_sessions_per_user)
    users = stats["error_reported"]["treatment"].users
    if users < config.rollout.canary_min_users:  # nothing to record until the canary has served enough users
        if waiting is not None:
            waiting.append(f"canary {version['version']} has served {users} of the {config.rollout.canary_min_users} "
                           f"users it needs (rollout.canary_min_users; it gets rollout.canary_share = "
                           f"{config.rollout.canary_share:.0%} of users)")
        return None
    control, treatment = stats["error_reported"]["control"], stats["error_reported"]["treatment"]
    # The A/B test's non-inferiority rule on the canary's few users: rolled back only when the
    # harm is shown beyond the margin (a point estimate over 20-odd users is ±12 points of noise).
    check = guardrail_check("error_reported", control, treatment, config.ab)
    if check.status == "violated":
        reason = (f"canary error-report rate {treatment.mean:.1%} vs champion {control.mean:.1%} over {users} users "
                  f"(harm ≥ {check.interval[0]:+.1%} anytime-valid, beyond the margin {check.margin:+.0%})")
        registry.rollback(version["version"], reason=reason, actor="ab_monitor")
        return _row(version, champion, "canary", now, "ROLLBACK", "guardrail", reason)
    live = registry.serving(lane=lane_of(version))
    others = sum(r["traffic_share"] for r in live["canary"] + live["treatment"] if r["version"] != version["version"])
    champion_share = 1.0 - others - version["traffic_share"]
    test_share = 1.0 - others  # the champion's part once this canary's slice returns to it, plus the treatment's
    split = config.rollout.treatment_share / test_share
    plan = champion_plan(config, lake, champion["version"], now, split, champion_share, test_share,
                         served=_served(config, version))
    reason = (f"canary healthy over {users} users (error reports {treatment.mean:.1%} vs {control.mean:.1%}, "
              f"harm not shown beyond {check.margin:+.0%}: interval from {check.interval[0]:+.1%}); "
              f"A/B plan {plan.planned_users:,} users ({plan.users_per_arm['treatment']:,} treatment), power "
              f"{plan.power:.0%}, bound by {plan.binding}" + "".join(f". WARNING: {w}" for w in plan.warnings))
    registry.transition(version["version"], "treatment", traffic_share=config.rollout.treatment_share,
                        reason=reason, actor="ab_monitor", metadata={"ab_plan": plan.as_dict()})
    return _row(version, champion, "canary", now, "PROCEED", "canary", reason)


def _planned_split(registry: ModelRegistry, version: dict) -> float:
    """The treatment's share of the users the test compares (its own and the champion's),
    from the layout the router serves now: the champion has what no canary or treatment
    holds, so a canary of a later candidate, when there is one, shrinks the champion's part."""
    live = registry.serving(lane=lane_of(version))
    treatment = next(r["traffic_share"] for r in live["treatment"] if r["version"] == version["version"])
    champion = 1.0 - sum(r["traffic_share"] for r in live["canary"] + live["treatment"])
    return treatment / (treatment + champion)


def _treatment(config, lake, registry, version, champion, now) -> dict:
    started = _stage_start(registry, version["version"], "treatment")
    ab = config.ab
    sessions = sessions_since(lake, (champion["version"], version["version"]), started, now,
                              ab.cuped_lookback_days if ab.cuped else 0.0, served=_served(config, version))
    stats = arm_stats_by_metric(sessions, list(METRICS), covariate_column="pre_quality" if ab.cuped else None,
                                cap=ab.max_sessions_per_user)
    share = _planned_split(registry, version)
    plan = json.loads(version.get("metadata_json") or "{}").get("ab_plan") or {}
    settings = {"treatment_share": share, "planned_users": ab.planned_users or plan.get("planned_users")}
    decision = decide(stats["quality"]["control"], stats["quality"]["treatment"], ab.model_copy(update=settings),
                      started_at=started, now=now,
                      guardrails={"error_reported": (stats["error_reported"]["control"],
                                                     stats["error_reported"]["treatment"]),
                                  "retried": (stats["retried"]["control"], stats["retried"]["treatment"])})
    if plan.get("warnings"):
        decision.plan["warnings"] = plan["warnings"]
    if decision.outcome == "SHIP":
        registry.transition(version["version"], "champion", reason=f"A/B SHIP: {decision.reason}", actor="ab_monitor")
    elif decision.outcome == "ROLLBACK":
        registry.rollback(version["version"], reason=f"A/B ROLLBACK: {decision.reason}", actor="ab_monitor")
    return _row(version, champion, "treatment", now, decision.outcome, decision.rule, decision.reason, decision)
