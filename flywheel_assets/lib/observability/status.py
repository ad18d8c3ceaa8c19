"""The loop's state at a glance, as `flywheel status` shows it: a report from the lake and the
registry (collect_status), and its text (render_status). The trigger's answer is the one
training_trigger would give now: its checks before the rules (blocked_by), then the rules."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Optional

from flywheel_assets.lib.automation.state import trigger_state
from flywheel_assets.lib.automation.trigger import blocked_by, should_train
from flywheel_assets.lib.automation.trigger import phase as phase_of
from flywheel_assets.lib.clock import iso
from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import AB_RESULTS, DATASET_MANIFESTS
from flywheel_assets.lib.tenancy import SHARED, lane_of


def collect_status(config: FlywheelConfig, lake: Lake, registry: ModelRegistry, now: datetime) -> dict:
    """Phase, training trigger and why, running A/B tests and their last looks, champion, registry history."""
    history = registry.history()
    latest = {row["version"]: row for row in history}
    champion = next((row for row in latest.values() if row["status"] == "champion" and lane_of(row) == SHARED), None)
    state = trigger_state(config, lake, now, champion["version"] if champion else None,
                          champion["changed_at"] if champion else None)
    train, why, phase = should_train(state, config.trigger)
    cycles = lake.read(DATASET_MANIFESTS, columns=["cycle", "created_at"]).sort_by("created_at")
    cycle_keys = cycles.column("cycle").to_pylist()
    blocked = blocked_by(list(latest.values()), cycle_keys, config.simulation_off())
    arms = [row for row in latest.values() if row["status"] in ("canary", "treatment") and lane_of(row) == SHARED]
    looks = lake.read(AB_RESULTS).sort_by("looked_at").to_pylist()
    last_look = {row["test_id"]: row for row in looks}
    return {
        "home": str(config.home), "now": now,
        "phase": phase_of(state.real_trajectories, config.trigger),
        "real_trajectories": state.real_trajectories,
        "phase_thresholds": {"phase1": config.trigger.phase1_min_real, "phase2": config.trigger.phase2_min_real},
        "trigger": {
            "train": bool(train and blocked is None), "rules_say_train": train, "reason": why, "blocked_by": blocked,
            "phase": phase, "last_training": state.last_training, "new_scored": state.new_scored,
            "new_high_quality": state.new_high_quality, "performance_change": state.performance_change,
            "last_cycle": cycle_keys[-1] if cycle_keys else None,
        },
        "ab_tests": [{"version": arm["version"], "status": arm["status"], "traffic_share": arm["traffic_share"],
                      "since": arm["changed_at"], "last_look": _look(last_look.get(f"ab-{arm['version']}"))}
                     for arm in arms],
        "last_decision": _look(looks[-1]) if looks else None,
        "champion": None if champion is None else {
            # the champion serves what the canary and treatment arms leave (its row keeps the share it came in with)
            "version": champion["version"], "cycle": champion["cycle"],
            "traffic_share": max(0.0, 1.0 - sum(arm["traffic_share"] for arm in arms)),
            "since": champion["changed_at"], "actor": champion["actor"], "reason": champion["reason"]},
        "lanes": [_lane(registry, list(latest.values()), lane, policy)
                  for lane, policy in config.tenancy.private_lanes().items()],
        "versions": len(latest),
        "history": [{key: row[key] for key in ("changed_at", "version", "status", "traffic_share", "actor", "reason")}
                    for row in history],
    }


def _lane(registry: ModelRegistry, current: list[dict], lane: str, policy: str) -> dict:
    """A private lane (lib/tenancy.py): what serves its tenant's users, and its arms."""
    serving = registry.lane_champion(lane, current)
    live = registry.serving(current, lane)
    arms = [{"version": r["version"], "status": r["status"], "traffic_share": r["traffic_share"]}
            for r in live["canary"] + live["treatment"]]
    return {"lane": lane, "policy": policy, "serving": serving["version"] if serving else None,
            "own_champion": bool(live["champion"]), "arms": arms,
            "serving_share": max(0.0, 1.0 - sum(arm["traffic_share"] for arm in arms))}


def _look(row: Optional[dict]) -> Optional[dict]:
    """A look's essentials, with the A/B plan's planned vs observed users and power when it has one."""
    keys = ("test_id", "treatment", "control", "stage", "looked_at", "outcome", "rule", "reason", "effect",
            "effect_low", "effect_high", "users_control", "users_treatment")
    if row is None:
        return None
    decision = json.loads(row.get("decision_json") or "{}")
    return {**{key: row[key] for key in keys}, "plan": decision.get("plan") or None,
            "flags": decision.get("flags") or [],
            "variance_reduction": (decision.get("details") or {}).get("variance_reduction")}


def render_status(report: dict) -> str:
    """collect_status's report as the lines `flywheel status` prints."""
    trigger = report["trigger"]
    thresholds = report["phase_thresholds"]
    lines = [
        f"home       {report['home']}   now {iso(report['now'])}",
        f"phase      {report['phase']}: {report['real_trajectories']} real usage trajectories scored "
        f"(phase 1 from {thresholds['phase1']}, phase 2 from {thresholds['phase2']})",
        f"trigger    {'TRAIN' if trigger['train'] else 'wait'}: {trigger['blocked_by'] or trigger['reason']}",
        f"           since last training ({iso(trigger['last_training']) or 'never'}"
        f"{', ' + trigger['last_cycle'] if trigger['last_cycle'] else ''}): {trigger['new_scored']} new scored, "
        f"{trigger['new_high_quality']} high quality; champion quality change "
        f"{'n/a' if trigger['performance_change'] is None else format(trigger['performance_change'], '+.1%')}",
    ]
    if not report["ab_tests"]:
        lines.append("A/B test   none running")
    for test in report["ab_tests"]:
        lines.append(f"A/B test   {test['version']} as {test['status']} on {test['traffic_share']:.0%} of users "
                     f"since {iso(test['since'])}")
        look = test["last_look"]
        lines.append(f"           {_render_look(look) if look else 'no look recorded yet'}")
    if report["last_decision"] and not report["ab_tests"]:
        lines.append(f"last look  {report['last_decision']['test_id']}: {_render_look(report['last_decision'])}")
    champion = report["champion"]
    lines.append("champion   none" if champion is None else
                 f"champion   {champion['version']} on {champion['traffic_share']:.0%} of users since "
                 f"{iso(champion['since'])} ({champion['actor']}: {champion['reason']})")
    for lane in report["lanes"]:
        fallback = "its own champion" if lane["own_champion"] else (
            "the base: no champion of its own yet" if lane["policy"] == "isolated"
            else "the shared champion: no champion of its own yet")
        arms = "".join(f", {arm['status']} {arm['version']} on {arm['traffic_share']:.0%}" for arm in lane["arms"])
        lines.append(f"lane       {lane['lane']} ({lane['policy']}): {lane['serving']} on {lane['serving_share']:.0%} "
                     f"of its users ({fallback}){arms}")
    lines.append(f"history    {len(report['history'])} latest changes of {report['versions']} versions")
    for row in report["history"]:
        lines.append(f"  {iso(row['changed_at'])}  {row['version']:<20} {row['status']:<11} "
                     f"{row['traffic_share']:>4.0%}  {row['actor']:<18} {_short(row['reason'], 70)}")
    return "\n".join(lines)


def _render_look(look: dict) -> str:
    text = f"{look['outcome']} ({look['stage']}, rule {look['rule']}) at {iso(look['looked_at'])}: {look['reason']}"
    if look["effect"] is not None:
        text += (f"; effect {look['effect']:+.3f} [{look['effect_low']:+.3f}, {look['effect_high']:+.3f}], "
                 f"users {look['users_control']} control / {look['users_treatment']} treatment")
    plan = look.get("plan")
    if plan:
        def power(value):
            return "n/a" if value is None else f"{value:.0%}"
        text += (f"; planned {plan['planned_users']:,} users, observed {plan['observed_users']:,}; power "
                 f"{power(plan.get('power_now'))} now, {power(plan.get('power_at_plan'))} at the plan")
    if look.get("flags"):
        text += f"; flags: {', '.join(look['flags'])}"
    return text


def _short(text: Optional[str], width: int) -> str:
    text = text or ""
    return text if len(text) <= width else text[:width - 1] + "…"
