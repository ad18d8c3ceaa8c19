"""Model registry: statuses, one-commit promotions and rollbacks, and stable routing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from flywheel_assets.lib.experiments.registry import ModelRegistry, RegistryError, bucket, route
from flywheel_assets.lib.tables import MODEL_REGISTRY

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class StepClock:
    """One minute later at every call."""

    def __init__(self):
        self.calls = 0

    def __call__(self) -> datetime:
        self.calls += 1
        return T0 + timedelta(minutes=self.calls)


@pytest.fixture
def registry(lake) -> ModelRegistry:
    return ModelRegistry(lake, clock=StepClock())


def with_base(registry: ModelRegistry, version: str = "base-v0") -> dict:
    return registry.register(version, base=version, base_path=f"models/{version}", reason="initial", actor="demo")


def with_adapter(registry: ModelRegistry, version: str, parent: str = "base-v0", **kwargs) -> dict:
    return registry.register(version, base="base-v0", base_path="models/base-v0", adapter_path=f"models/{version}",
                             parent=parent, cycle=version[:10], reason="trained", actor="sensor:training", **kwargs)


def statuses(registry: ModelRegistry) -> dict[str, tuple[str, float]]:
    return {r["version"]: (r["status"], r["traffic_share"]) for r in registry.current()}


def test_a_base_model_becomes_champion_with_all_traffic(registry):
    row = with_base(registry)
    assert (row["status"], row["traffic_share"], row["parent"], row["adapter_path"]) == ("champion", 1.0, None, None)
    assert registry.champion()["version"] == "base-v0"
    assert with_base(registry, "base-v1")["status"] == "candidate"  # a champion exists already
    with pytest.raises(RegistryError, match="base-v0 is already registered"):
        with_base(registry)


def test_promotion_path_retires_the_old_champion_in_one_commit(registry, lake):
    with_base(registry)
    with_adapter(registry, "cycle-0001-lora", metadata={"eval_score": 0.61})
    assert registry.transition("cycle-0001-lora", "canary", reason="offline eval passed", actor="demo")["traffic_share"] == 0.01
    assert registry.transition("cycle-0001-lora", "treatment", reason="canary healthy", actor="demo")["traffic_share"] == 0.09
    assert [r["version"] for r in registry.serving()["treatment"]] == ["cycle-0001-lora"]
    before = lake.version(MODEL_REGISTRY)

    promoted = registry.transition("cycle-0001-lora", "champion", reason="A/B +3.1%", actor="sensor:ab",
                                   metadata={"lift": 0.031})

    assert lake.version(MODEL_REGISTRY) == before + 1
    assert lake.read(MODEL_REGISTRY, version=before).num_rows + 2 == lake.read(MODEL_REGISTRY).num_rows
    assert statuses(registry) == {"base-v0": ("retired", 0.0), "cycle-0001-lora": ("champion", 1.0)}
    assert json.loads(promoted["metadata_json"]) == {"eval_score": 0.61, "lift": 0.031}
    assert registry.get("cycle-0001-lora") == promoted
    assert registry.get("base-v0")["reason"] == "replaced by cycle-0001-lora: A/B +3.1%"
    assert registry.serving() == {"champion": [promoted], "treatment": [], "canary": []}


@pytest.mark.parametrize("path, to_status", [
    ((), "champion"),                              # candidate must be tested first
    (("canary", "treatment"), "canary"),           # no way back to a smaller arm
    (("treatment", "champion"), "treatment"),
    (("retired",), "candidate"),                   # final
    (("treatment", "rolled_back"), "treatment"),   # final
    ((), "promoted"),                              # not a status
])
def test_invalid_transitions_raise_and_write_nothing(registry, lake, path, to_status):
    with_base(registry)
    with_adapter(registry, "cycle-0002-lora")
    for status in path:
        registry.transition("cycle-0002-lora", status, reason="setup", actor="demo")
    from_status = registry.get("cycle-0002-lora")["status"]
    before = lake.version(MODEL_REGISTRY)
    with pytest.raises(RegistryError, match=f"cycle-0002-lora cannot go from {from_status} to {to_status}"):
        registry.transition("cycle-0002-lora", to_status, reason="bad", actor="demo")
    assert lake.version(MODEL_REGISTRY) == before


def test_invalid_transition_message_names_version_from_and_to(registry):
    with_base(registry)
    with pytest.raises(RegistryError, match="base-v0 cannot go from champion to canary"):
        registry.transition("base-v0", "canary", reason="x", actor="demo")
    with pytest.raises(RegistryError, match="unknown version 'nope'"):
        registry.transition("nope", "canary", reason="x", actor="demo")


def test_arm_shares_over_one_are_refused(registry):
    with_base(registry)
    with_adapter(registry, "cycle-0001-lora")
    with_adapter(registry, "cycle-0002-lora")
    registry.transition("cycle-0001-lora", "treatment", reason="A/B", actor="demo", traffic_share=0.6)
    with pytest.raises(RegistryError, match="exceeds 1"):
        registry.transition("cycle-0002-lora", "treatment", reason="A/B", actor="demo", traffic_share=0.5)


def test_history_keeps_every_change_with_reason_and_actor_in_order(registry):
    with_base(registry)
    with_adapter(registry, "cycle-0001-lora")
    registry.transition("cycle-0001-lora", "canary", reason="eval passed", actor="sensor:eval")
    registry.transition("cycle-0001-lora", "champion", reason="canary clean", actor="cli:ana")
    expected = [
        ("base-v0", "champion", "initial", "demo"),
        ("cycle-0001-lora", "candidate", "trained", "sensor:training"),
        ("cycle-0001-lora", "canary", "eval passed", "sensor:eval"),
        ("base-v0", "retired", "replaced by cycle-0001-lora: canary clean", "cli:ana"),
        ("cycle-0001-lora", "champion", "canary clean", "cli:ana"),
    ]
    assert [(r["version"], r["status"], r["reason"], r["actor"]) for r in registry.history()] == expected
    assert [r["status"] for r in registry.history("cycle-0001-lora")] == ["candidate", "canary", "champion"]
    assert len({r["event_id"] for r in registry.history()}) == 5


def test_rolling_back_a_champion_reinstates_the_previous_one_in_one_commit(registry, lake):
    with_base(registry)
    for version in ("cycle-0001-lora", "cycle-0002-lora"):
        with_adapter(registry, version)
        registry.transition(version, "treatment", reason="A/B", actor="demo")
        registry.transition(version, "champion", reason="won", actor="demo")
    with_adapter(registry, "cycle-0003-lora")
    registry.transition("cycle-0003-lora", "canary", reason="canary", actor="demo")
    before = lake.version(MODEL_REGISTRY)

    row = registry.rollback("cycle-0002-lora", reason="error reports +40%", actor="sensor:health")

    assert lake.version(MODEL_REGISTRY) == before + 1
    assert row["status"] == "rolled_back"
    assert statuses(registry) == {"base-v0": ("retired", 0.0), "cycle-0001-lora": ("champion", 0.99),
                                  "cycle-0002-lora": ("rolled_back", 0.0), "cycle-0003-lora": ("canary", 0.01)}
    assert registry.champion()["reason"] == "reinstated after rollback of cycle-0002-lora: error reports +40%"
    assert [r["status"] for r in registry.history()[-2:]] == ["rolled_back", "champion"]
    with pytest.raises(RegistryError, match="cycle-0002-lora cannot go from rolled_back to rolled_back"):
        registry.rollback("cycle-0002-lora", reason="again", actor="demo")


def test_rollback_of_the_only_champion_is_refused_and_of_a_canary_leaves_the_champion(registry):
    with_base(registry)
    with pytest.raises(RegistryError, match="no retired champion to reinstate"):
        registry.rollback("base-v0", reason="x", actor="demo")
    with_adapter(registry, "cycle-0001-lora")
    registry.transition("cycle-0001-lora", "canary", reason="canary", actor="demo")
    registry.transition("cycle-0001-lora", "rolled_back", reason="crashes", actor="demo")
    assert statuses(registry) == {"base-v0": ("champion", 1.0), "cycle-0001-lora": ("rolled_back", 0.0)}


# Computed once with sha256("::acme:user-N"); literal so that any change of the hash shows.
# Canaries sit at the bottom of [0, 1), treatments at the top (0.91 and up at the default shares).
FIXED_USERS = [("user-0", 0.40102831959165325, "champion"), ("user-3", 0.9174278385238261, "treatment"),
               ("user-30", 0.07829912430287861, "champion"), ("user-51", 0.002900107244153952, "canary")]


def test_routing_is_stable_across_calls_and_processes():
    for user, u, arm in FIXED_USERS:
        assert bucket(user, "acme") == u
        answers = {route(user, "acme", champion="champion", treatment="treatment", canary="canary") for _ in range(1000)}
        assert answers == {arm}
    code = ("from flywheel_assets.lib.experiments.registry import bucket;"
            "print([bucket(u, 'acme') for u in ('user-0', 'user-3', 'user-30', 'user-51')])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == repr([u for _, u, _ in FIXED_USERS])


def test_default_layout_is_90_9_1_over_100k_users():
    arms = Counter(route(f"user-{i}", f"tenant-{i % 7}", champion="C", treatment="T", canary="K")
                   for i in range(100_000))
    assert abs(arms["C"] / 1e5 - 0.90) < 0.01
    assert abs(arms["T"] / 1e5 - 0.09) < 0.01
    assert abs(arms["K"] / 1e5 - 0.01) < 0.01


def test_absent_arms_fall_back_to_the_champion():
    users = [f"user-{i}" for i in range(2000)]
    assert {route(u, "acme", champion="C") for u in users} == {"C"}
    full = [route(u, "acme", champion="C", treatment="T", canary="K") for u in users]
    no_canary = [route(u, "acme", champion="C", treatment="T") for u in users]
    assert [("C" if arm == "K" else arm) for arm in full] == no_canary  # treatment users keep their arm


def test_a_canary_starting_and_ending_during_an_ab_test_moves_no_user_of_either_arm(registry):
    """Before the layout was carved from both ends, a canary that went live during a test
    pushed the treatment's slice up by its share: 1/9 of treatment users moved to control."""
    with_base(registry)
    with_adapter(registry, "cycle-0001-lora")
    with_adapter(registry, "cycle-0002-lora")
    registry.transition("cycle-0001-lora", "treatment", reason="A/B", actor="demo")
    users = [f"user-{i}" for i in range(20_000)]

    def arms() -> list[str]:
        pick = registry.router()
        return [pick(u, "acme") for u in users]
    before = arms()
    registry.transition("cycle-0002-lora", "canary", reason="canary", actor="demo")
    during = arms()
    registry.rollback("cycle-0002-lora", reason="canary ended", actor="demo")
    after = arms()
    treated = {u for u, arm in zip(users, before) if arm == "cycle-0001-lora"}
    assert 1500 < len(treated) < 2100  # about 9% of 20,000
    for layout in (during, after):
        assert {u for u, arm in zip(users, layout) if arm == "cycle-0001-lora"} == treated
    moved = [(b, d) for b, d in zip(before, during) if b != d]
    assert 120 < len(moved) < 290 and set(moved) == {("base-v0", "cycle-0002-lora")}  # ~1% of control, to the canary
    assert after == before


def test_registry_routes_its_serving_layout_salted_by_the_champion(registry):
    with_base(registry)
    assert {registry.route(f"user-{i}", "acme") for i in range(200)} == {"base-v0"}
    with_adapter(registry, "cycle-0001-lora")
    with_adapter(registry, "cycle-0002-lora")
    registry.transition("cycle-0001-lora", "treatment", reason="A/B", actor="demo")
    registry.transition("cycle-0002-lora", "canary", reason="canary", actor="demo")
    pick = registry.router()
    users = [f"user-{i}" for i in range(3000)]
    assert [pick(u, "acme") for u in users] == [
        route(u, "acme", champion="base-v0", treatment="cycle-0001-lora", canary="cycle-0002-lora", salt="base-v0")
        for u in users]
    assert registry.route("user-7", "acme") == pick("user-7", "acme")
    assert len({pick(u, "acme") for u in users}) == 3


def test_changed_at_comes_from_the_injected_clock_and_never_goes_back(lake):
    times = iter([T0, T0 + timedelta(hours=1), T0])  # the third reading goes back in time
    registry = ModelRegistry(lake, clock=lambda: next(times))
    with_base(registry)
    with_adapter(registry, "cycle-0001-lora")
    registry.transition("cycle-0001-lora", "canary", reason="canary", actor="demo")
    assert [r["changed_at"] for r in registry.history()] == [
        T0, T0 + timedelta(hours=1), T0 + timedelta(hours=1, microseconds=1)]


def test_a_rollback_never_reinstates_a_version_withdrawn_by_a_forget_request(registry):
    with_base(registry)
    for version in ("cycle-0001-lora", "cycle-0002-lora"):
        with_adapter(registry, version)
        registry.transition(version, "treatment", reason="A/B", actor="demo")
        registry.transition(version, "champion", reason="won", actor="demo")
    # cycle-0001-lora (retired) was trained on a forgotten user's data: withdrawn, it keeps its status
    registry.withdraw({"cycle-0001-lora"}, clean=lambda row: True, reason="forget", actor="cli:dpo",
                      metadata={"tainted_by": "forget-1"})
    registry.rollback("cycle-0002-lora", reason="regression", actor="sensor:health")
    assert registry.champion()["version"] == "base-v0"  # the newest retired champion that is not withdrawn
    assert statuses(registry)["cycle-0001-lora"] == ("retired", 0.0)
