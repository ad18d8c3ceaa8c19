"""Isolated and hybrid tenants train, are gated, A/B tested and routed in lanes of their own
(lib/tenancy.py): the rules one at a time, on hand-made tables. The whole chain with real
training: defs/test_tenant_lanes.py."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from flywheel_assets.lib.automation.trigger import blocked_by
from flywheel_assets.lib.config import TenancyConfig
from flywheel_assets.lib.curation.curate import curate
from flywheel_assets.lib.curation.select import select_training_rows
from flywheel_assets.lib.experiments.registry import ModelRegistry, RegistryError
from flywheel_assets.lib.experiments.rollout import advance
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.observability.status import collect_status, render_status
from flywheel_assets.lib.tables import (
    CURATED_TRAJECTORIES, OFFLINE_EVALUATIONS, SESSION_FEEDBACK, TRAJECTORIES, TRAJECTORY_SCORES,
)
from flywheel_assets.lib.tenancy import lane_of_cycle, next_cycle

POLICIES = {"acme": "pooled", "initech": "opt_out", "globex": "isolated", "umbrella": "hybrid"}
T0 = datetime(2026, 11, 20, tzinfo=timezone.utc)


def test_lane_names_and_cycle_keys():
    tenancy = TenancyConfig(policies=POLICIES)
    assert tenancy.lanes() == ["", "globex", "umbrella"]
    assert [tenancy.lane(t) for t in ("acme", "initech", "globex", "umbrella", None)] == ["", "", "globex",
                                                                                        "umbrella", ""]
    assert lane_of_cycle("cycle-0003@globex") == "globex" and lane_of_cycle("cycle-0003") == ""
    assert lane_of_cycle(None) == "" and lane_of_cycle("c1") == ""
    existing = ["cycle-0001", "cycle-0002", "cycle-0001@globex", "manual", "cycle-0007@umbrella"]
    assert next_cycle(existing) == "cycle-0003"
    assert next_cycle(existing, "globex") == "cycle-0002@globex"
    assert next_cycle(existing, "umbrella") == "cycle-0008@umbrella"
    assert next_cycle([], "globex") == "cycle-0001@globex"
    assert tenancy.served_sql("") == "coalesce(tenant_id, 'default') NOT IN ('globex', 'umbrella')"
    assert tenancy.served_sql("globex", "t") == "coalesce(t, 'default') = 'globex'"


def _curated(n_per_tenant: int = 40) -> pa.Table:
    rows = []
    for tenant in (*POLICIES, None):
        for i in range(n_per_tenant):
            name = tenant or "default"
            rows.append({"trajectory_id": f"{name}-{i}", "session_id": f"s-{name}-{i}", "tenant_id": tenant,
                         "task_type": ("weather", "math")[i % 2], "tier": ("gold", "silver")[i % 2], "weight": 1.0,
                         "combined_score": 0.9, "messages_json": "[]", "tools_json": "[]",
                         "prompt_key": f"p-{name}-{i}", "dedup_status": "kept", "origin": "usage",
                         "split": "opt_out" if POLICIES.get(tenant) == "opt_out" else "train"})
    return conform(pa.Table.from_pylist(rows), CURATED_TRAJECTORIES)


def test_each_lane_selects_only_the_tenants_it_may_train_on(config):
    config.tenancy = TenancyConfig(policies=POLICIES)
    curated = _curated()
    tenant = {r["trajectory_id"]: r["tenant_id"] for r in curated.to_pylist()}

    def tenants(cycle):
        return {tenant[t] for t in select_training_rows(curated, cycle, config).column("trajectory_id").to_pylist()}

    assert tenants("cycle-0001") == {"acme", None}  # pooled: acme and rows without a tenant
    assert tenants("cycle-0001@globex") == {"globex"}
    assert tenants("cycle-0001@umbrella") == {"umbrella"}
    assert tenants("cycle-0001@initech") == set() and tenants("cycle-0001@acme") == set()
    # without lanes every tenant but the opted-out one trains the shared model
    config.tenancy = TenancyConfig(policies={"initech": "opt_out"})
    assert tenants("cycle-0001") == {"acme", "globex", "umbrella", None}


def test_duplicates_are_found_within_a_lane_never_across(config):
    """The same conversation from a pooled and an isolated tenant: each lane keeps its own copy
    (de-duplicated across lanes, one lane would lose it to a copy it may not train on)."""
    config.tenancy = TenancyConfig(policies={"globex": "isolated"})
    turns = [{"role": "user", "content": "What is the weather in Oslo?"}, {"role": "assistant", "content": "Rain."}]
    ids = ["a1", "a2", "g1"]
    tenants = ["acme", "acme", "globex"]
    scores = conform(pa.Table.from_pylist([
        {"trajectory_id": t, "session_id": f"s-{t}", "tenant_id": tenant, "task_type": "weather", "tier": "gold",
         "weight": 1.0, "combined_score": 0.9 - i / 10, "human_verified": False, "origin": "golden"}
        for i, (t, tenant) in enumerate(zip(ids, tenants))]), TRAJECTORY_SCORES)
    trajectories = conform(pa.Table.from_pylist([
        {"trajectory_id": t, "tenant_id": tenant, "turns": turns, "tool_calls": [], "tools_json": "[]",
         "user_prompt": turns[0]["content"]} for t, tenant in zip(ids, tenants)]), TRAJECTORIES)
    status = {r["trajectory_id"]: r["dedup_status"] for r in curate(scores, trajectories, config).to_pylist()}
    assert status == {"a1": "kept", "a2": "exact_duplicate", "g1": "kept"}


def _register(registry, version, cycle, parent="base", base_path="models/base"):
    registry.register(version, base="base", base_path=base_path, adapter_path=f"models/{version}", parent=parent,
                      cycle=cycle, reason="trained", actor="test")


def test_lanes_keep_their_own_champion_arms_and_routing(lake):
    tenancy = TenancyConfig(policies=POLICIES)
    registry = ModelRegistry(lake, tenancy=tenancy)
    registry.register("base", base="base", base_path="models/base", reason="start", actor="test")
    _register(registry, "cycle-0001-lora", "cycle-0001")
    registry.transition("cycle-0001-lora", "canary", reason="gate", actor="test")
    registry.transition("cycle-0001-lora", "champion", reason="ship", actor="test")
    # before a private lane has a champion: isolated serves the base, hybrid the shared champion
    assert registry.lane_champion("globex")["version"] == "base"
    assert registry.lane_champion("umbrella")["version"] == "cycle-0001-lora"
    assert registry.training_parent("globex")["version"] == "base"
    assert registry.training_parent("umbrella")["version"] == "cycle-0001-lora"

    _register(registry, "cycle-0001@globex-lora", "cycle-0001@globex")
    _register(registry, "cycle-0001@umbrella-lora", "cycle-0001@umbrella", parent="cycle-0001-lora")
    _register(registry, "cycle-0002-lora", "cycle-0002", parent="cycle-0001-lora")
    # a lane's shares are its own users': 1% canary + 90% treatment fits in a lane, not in two
    registry.transition("cycle-0001@globex-lora", "treatment", traffic_share=0.9, reason="t", actor="test")
    registry.transition("cycle-0002-lora", "canary", reason="c", actor="test")
    registry.transition("cycle-0001@umbrella-lora", "canary", traffic_share=0.5, reason="c", actor="test")
    _register(registry, "cycle-0002@globex-lora", "cycle-0002@globex")
    with pytest.raises(RegistryError, match="exceeds 1"):  # globex's 90% + 20% is more than its users
        registry.transition("cycle-0002@globex-lora", "canary", traffic_share=0.2, reason="c", actor="test")
    registry.transition("cycle-0001@umbrella-lora", "champion", reason="ship", actor="test")
    # a lane's promotion retires nothing in another lane
    assert registry.champion()["version"] == "cycle-0001-lora"
    assert registry.champion("umbrella")["version"] == "cycle-0001@umbrella-lora"
    assert registry.champion("globex") is None

    private = {"globex": {"cycle-0001@globex-lora"}, "umbrella": {"cycle-0001@umbrella-lora"}}
    allowed = {"acme": {"cycle-0001-lora", "cycle-0002-lora"}, "initech": {"cycle-0001-lora", "cycle-0002-lora"},
               "globex": {"base", "cycle-0001@globex-lora"}, "umbrella": {"cycle-0001@umbrella-lora"}}
    router = registry.router()
    served = {tenant: {router(f"user-{u}", tenant) for u in range(4000)} for tenant in POLICIES}
    assert served == allowed  # every arm reached, and nothing outside the tenant's lane
    for tenant, versions in served.items():
        others = set().union(*(v for lane, v in private.items() if lane != tenant))
        assert not versions & others  # never a version trained on another tenant's private data

    # umbrella's champion was trained over the shared model: once umbrella is isolated it is not served
    isolated = ModelRegistry(lake, tenancy=TenancyConfig(policies={**POLICIES, "umbrella": "isolated"}))
    assert registry.lane_champion("umbrella")["version"] == "cycle-0001@umbrella-lora"
    assert isolated.lane_champion("umbrella")["version"] == "base"
    assert isolated.training_parent("umbrella")["version"] == "base"

    # the lane's first champion rolled back: the lane serves its fallback again, not an error
    registry.rollback("cycle-0001@umbrella-lora", reason="regression", actor="test")
    assert registry.champion("umbrella") is None
    assert {registry.router()(f"user-{u}", "umbrella") for u in range(500)} == {"cycle-0001-lora"}
    # the shared champion rolled back: the hybrid lane's fallback follows it
    registry.rollback("cycle-0001-lora", reason="regression", actor="test")
    assert {registry.router()(f"user-{u}", "umbrella") for u in range(500)} == {"base"}


def test_one_cycle_at_a_time_per_lane():
    current = [{"version": "base", "status": "champion", "cycle": None},
               {"version": "cycle-0001-lora", "status": "retired", "cycle": "cycle-0001"},
               {"version": "cycle-0002-lora", "status": "treatment", "cycle": "cycle-0002"},
               {"version": "cycle-0001@globex-lora", "status": "champion", "cycle": "cycle-0001@globex"}]
    cycles = ["cycle-0001", "cycle-0002", "cycle-0001@globex", "cycle-0001@umbrella"]
    assert "cycle-0002-lora is still being" in blocked_by(current, cycles, None)
    assert blocked_by(current, cycles, None, "globex") is None  # the shared A/B test does not hold it
    assert "cycle-0001@umbrella has no adapter" in blocked_by(current, cycles, None, "umbrella")
    assert "no champion yet" in blocked_by(current[1:], cycles, None, "globex")


def _traffic(lake, registry, day, users, quality_of, rng):
    router = registry.router()
    feedback, trajectories = [], []
    for tenant in ("acme", "umbrella"):
        for u in range(users):
            version = router(f"user-{u}", tenant)
            for s in range(2):
                at = day + timedelta(hours=1 + s, minutes=u % 50)
                quality = max(-1.0, min(1.0, quality_of[tenant][version] + rng.gauss(0, 0.2)))
                sid = f"{tenant}-{day:%j}-{u}-{s}"
                feedback.append({"session_id": sid, "user_id": f"user-{u}", "quality_score": quality,
                                 "error_reported": quality < 0, "retry_count": 0, "last_ts": at,
                                 "final_trajectory_id": f"t-{sid}"})
                trajectories.append({"trajectory_id": f"t-{sid}", "model_version": version, "created_at": at,
                                     "tenant_id": tenant})
    lake.append(SESSION_FEEDBACK, conform(pa.Table.from_pylist(feedback), SESSION_FEEDBACK))
    lake.append(TRAJECTORIES, conform(pa.Table.from_pylist(trajectories), TRAJECTORIES))


def test_a_lane_is_ab_tested_on_its_own_users(config, lake):
    """A hybrid tenant's candidate, good for its users, against the shared champion it falls back to;
    at the same time a shared candidate that is bad for everyone. Each test sees its own users only:
    the lane's adapter ships for its tenant, the shared one is rolled back, neither moves the other."""
    config.tenancy = TenancyConfig(policies={"umbrella": "hybrid"})
    config.ab.min_users_per_arm, config.ab.planned_users = 60, 2000
    config.rollout.canary_min_users = 20
    config.rollout.canary_share, config.rollout.treatment_share = 0.1, 0.45
    clock = {"now": T0}
    registry = ModelRegistry(lake, clock=lambda: clock["now"], tenancy=config.tenancy)
    registry.register("base", base="base", base_path="models/base", reason="start", actor="test")
    _register(registry, "cycle-0001-lora", "cycle-0001")
    _register(registry, "cycle-0001@umbrella-lora", "cycle-0001@umbrella")
    for version, cycle in (("cycle-0001-lora", "cycle-0001"), ("cycle-0001@umbrella-lora", "cycle-0001@umbrella")):
        lake.append(OFFLINE_EVALUATIONS, conform(pa.Table.from_pylist([{
            "cycle": cycle, "version": version, "role": "candidate", "scope": "overall", "gate_passed": True,
            "gate_reason": "ok"}]), OFFLINE_EVALUATIONS))
    quality = {"acme": {"base": 0.5, "cycle-0001-lora": 0.2},
               "umbrella": {"base": 0.3, "cycle-0001-lora": 0.2, "cycle-0001@umbrella-lora": 0.6}}
    rng = random.Random(0)
    looks = []
    for day in range(6):
        clock["now"] = T0 + timedelta(days=day, hours=23)
        looks += advance(config, lake, registry, clock["now"])
        _traffic(lake, registry, T0 + timedelta(days=day + 1), 600, quality, rng)
    outcomes = {(r["treatment"], r["stage"], r["outcome"]) for r in looks}
    assert ("cycle-0001@umbrella-lora", "treatment", "SHIP") in outcomes
    assert registry.champion("umbrella")["version"] == "cycle-0001@umbrella-lora"
    assert registry.champion()["version"] == "base"  # the shared candidate did not ship
    assert registry.get("cycle-0001-lora")["status"] == "rolled_back"
    lane_looks = [r for r in looks if r["treatment"] == "cycle-0001@umbrella-lora" and r["stage"] == "treatment"]
    # compared with the shared champion, on umbrella's 600 users only: never more users than it has
    assert {r["control"] for r in lane_looks} == {"base"}
    assert all(r["users_control"] + r["users_treatment"] <= 600 for r in lane_looks)
    text = render_status(collect_status(config, lake, registry, clock["now"]))
    assert "lane       umbrella (hybrid): cycle-0001@umbrella-lora on 100% of its users (its own champion)" in text
    assert "champion   base on 100% of users" in text
