"""The seed's trigger rules, in their order, on an injected clock."""

from datetime import datetime, timedelta, timezone

import pytest

from flywheel_assets.lib.automation.trigger import (
    PhaseConfig, TriggerState, blocked_by, performance_change, phase, should_train,
)

NOW = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)
PHASES = PhaseConfig()


def state(days_since=5.0, real=5000, new=600, high=300, perf=None) -> TriggerState:
    last = None if days_since is None else NOW - timedelta(days=days_since)
    return TriggerState(NOW, last, real, new, high, perf)


@pytest.mark.parametrize("kwargs,train,reason", [
    ({"days_since": 2.9}, False, "only 2.9d since last training"),
    ({"days_since": 2.9, "perf": -0.5}, False, "only 2.9d"),  # too soon beats everything
    ({"days_since": 14, "new": 0, "high": 0}, True, "force trigger: 14.0d"),
    ({"days_since": None, "new": 0, "high": 0}, True, "force trigger: never trained"),
    ({"perf": -0.05, "new": 0, "high": 0}, True, "emergency: champion quality changed -5.0%"),
    ({"perf": -0.049, "new": 0, "high": 0}, False, "not yet: 0 new"),
    ({"new": 500, "high": 200}, True, "500 new trajectories (40.0% high quality)"),
    ({"new": 499, "high": 499}, False, "not yet: 499 new"),
    ({"new": 1000, "high": 399}, False, "39.9% high quality (need 40%)"),
])
def test_phase_two_follows_the_seed(kwargs, train, reason):
    decision, why, current = should_train(state(**kwargs), PHASES)
    assert (decision, current) == (train, 2)
    assert reason in why


def test_phases_follow_data_volume_and_pick_thresholds():
    assert [phase(n, PHASES) for n in (0, 499, 500, 1999, 2000)] == [0, 0, 1, 1, 2]
    assert should_train(state(real=100, days_since=None), PHASES)[0] is False
    # phase 1: weekly, small batches
    assert should_train(state(real=800, days_since=5, new=150, high=100), PHASES)[:2] == (
        False, "only 5.0d since last training (minimum 7d)")
    assert should_train(state(real=800, days_since=8, new=150, high=100), PHASES)[0] is True


def test_performance_change_compares_the_last_day_with_the_week_before():
    daily = [(NOW - timedelta(days=d, hours=1), 0.5, 100) for d in range(1, 8)]
    assert performance_change(daily, NOW) is None  # nothing in the last day yet
    daily.append((NOW - timedelta(hours=2), 0.45, 100))
    assert performance_change(daily, NOW) == pytest.approx(-0.1)
    assert performance_change([(NOW - timedelta(hours=2), 0.5, 10)], NOW) is None
    # a champion promoted a day ago: its first hour is inside the last day, no baseline yet
    promoted = [(NOW - timedelta(days=1), 0.6, 40), (NOW - timedelta(hours=5), 0.5, 200)]
    assert performance_change(promoted, NOW) is None
    # 10 sessions of baseline are too few to call a drop
    assert performance_change([(NOW - timedelta(days=2), 0.9, 10), (NOW - timedelta(hours=5), 0.5, 200)], NOW) is None


def test_blocked_by_names_what_stops_a_cycle_before_the_rules():
    champion = {"version": "base-x", "status": "champion"}
    assert blocked_by([], [], None) == "no champion yet: simulated_users trains base_model once the cold start is ingested"
    assert blocked_by([], [], "simulation.enabled is false") == "no champion yet: materialize base_model first"
    assert blocked_by([champion], ["cycle-0001", "cycle-0002"], None) == (
        "cycle cycle-0002 has no adapter yet; one cycle at a time")
    testing = {"version": "cycle-0001-lora", "status": "canary"}
    assert blocked_by([champion, testing], ["cycle-0001"], None).startswith(
        "cycle-0001-lora is still being evaluated or A/B tested")
    retired = {"version": "cycle-0001-lora", "status": "retired"}
    assert blocked_by([champion, retired], ["cycle-0001"], None) is None
