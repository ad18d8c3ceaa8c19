"""flywheel_velocity on a hand-made timeline whose stage times, latencies and score are computed by hand."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.observability.timeline import CycleFacts, cycle_facts
from flywheel_assets.lib.observability.velocity import velocity, with_cycle_steps

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


def at(days: float) -> datetime:
    return T0 + timedelta(days=days)


# trajectory: (logged, scored, high quality), in days after T0
USAGE = {"a": (0.0, 0.1, False), "b": (1.0, 1.0, True), "c": (2.0, 2.5, True), "d": (4.0, 4.0, True),
         "e": (5.0, 5.0, False), "g": (5.5, 5.5, False), "f": (7.5, 7.5, True)}
MEMBERSHIP = {"cycle-0001": "abc", "cycle-0002": "bcde"}
# cycle 1: dataset at 3.0, adapter at 3.5, treatment at 3.5, champion at 5.0;
# cycle 2: dataset at 6.0, adapter at 6.0, rolled back at 7.0
FACTS = [
    CycleFacts("cycle-0001", at(3.0), 3, "cycle-0001-lora", at(3.5), at(3.5), at(5.0), at(5.0), "promoted"),
    CycleFacts("cycle-0002", at(6.0), 4, "cycle-0002-lora", at(6.0), at(6.0), None, at(7.0), "rolled_back"),
]
NOW = at(8.0)


@pytest.fixture
def config() -> FlywheelConfig:
    config = FlywheelConfig()
    config.trigger.phase1_min_real = 2
    config.trigger.phase1 = config.trigger.phase1.model_copy(update={"min_new_trajectories": 2,
                                                                      "min_high_quality_rate": 0.6})
    return config


@pytest.fixture
def result(config) -> dict:
    usage = pl.DataFrame({"trajectory_id": list(USAGE), "logged_at": [at(v[0]) for v in USAGE.values()],
                          "scored_at": [at(v[1]) for v in USAGE.values()],
                          "high_quality": [v[2] for v in USAGE.values()]})
    membership = pl.DataFrame([(cycle, t) for cycle, ids in MEMBERSHIP.items() for t in ids],
                              schema=["cycle", "trajectory_id"], orient="row")
    return velocity(config, with_cycle_steps(usage, membership, FACTS), FACTS, NOW)


def test_each_cycle_splits_into_the_seeds_stages(result):
    # cycle 1: 2 new scored by 1.0 (count met), high-quality share 1/2 < 0.6 until c at 2.5 (2/3), dataset at 3.0
    # cycle 2: d, e, g after 3.0: count met at 5.0 with 1/2 high quality, never 0.6: quality waits until 6.0
    # open: only f since 6.0, 1 of the 2 needed: collecting until now (8.0)
    expected = [
        {"collection": 1.0, "data_quality": 1.5, "trigger": 0.5, "training": 0.5, "verification": 1.5},
        {"collection": 2.0, "data_quality": 1.0, "trigger": 0.0, "training": 0.0, "verification": 1.0},
        {"collection": 2.0, "data_quality": 0.0, "trigger": 0.0, "training": 0.0, "verification": 0.0},
    ]
    assert [t["stages"] for t in result["turns"]] == [pytest.approx(e) for e in expected]
    assert [t["outcome"] for t in result["turns"]] == ["promoted", "rolled_back", "collecting"]
    assert [t["cycle_days"] for t in result["turns"]] == pytest.approx([5.0, 4.0, 2.0])


def test_velocity_score_cycle_time_and_projection(result):
    assert result["velocity_score"] == pytest.approx(7 * 1 / 9.0)  # one promotion in 5 + 4 cycle days
    assert result["cycle_time_days"] == pytest.approx(4.5) and result["ship_rate"] == 0.5
    assert result["turns_per_week"] == pytest.approx(7 / 4.5)
    # collection at the seed's lower 2x: 4.5 − 1.5 · (1 − 1/2) = 3.75 days per cycle
    assert result["projected_score"] == pytest.approx(7 * 0.5 / 3.75)


def test_the_bottleneck_is_the_stage_holding_the_most_days(result):
    # collection 1 + 2 + 2 = 5 of 11 days; data quality 2.5, verification 2.5, trigger 0.5, training 0.5
    bottleneck = result["bottleneck"]
    assert (bottleneck["stage"], bottleneck["name"], bottleneck["remedy"]) == (
        "collection", "Trajectory collection", "Internal use, beta, synthetic data")
    assert bottleneck["share"] == pytest.approx(5 / 11) and bottleneck["days"] == pytest.approx(5.0)
    assert "expected 2-5x" in bottleneck["reason"]
    assert [row["bottleneck"] for row in result["seed_stages"]] == [True, False, False, False, False]


def test_throughput_latency_and_yield_per_step(result):
    steps = {row["step"]: row for row in result["steps"]}
    assert [steps[s]["trajectories"] for s in steps] == [7, 7, 5, 5, 3]
    assert steps["logged"]["per_day"] == pytest.approx(7 / 8)  # 8 days observed, under the 14-day window
    assert steps["selected"]["latency_median_h"] == pytest.approx(48.0)  # 69.6, 48, 12, 48, 24 h
    assert steps["trained"]["latency_median_h"] == pytest.approx(12.0)  # 12, 12, 12, 0, 0 h
    assert steps["served"]["latency_median_h"] == pytest.approx(36.0)
    assert steps["logged"]["latency_median_h"] is None
    # logged by the last dataset (6.0): a b c d e g; selected a-e; served (promoted cycle 1) a b c
    assert result["data_yield"] == pytest.approx(5 / 6) and result["served_yield"] == pytest.approx(3 / 6)


def test_cycle_facts_from_the_registry_history():
    history = [
        {"version": "base", "cycle": None, "status": "champion", "changed_at": at(0)},
        {"version": "c1-lora", "cycle": "c1", "status": "candidate", "changed_at": at(3.5)},
        {"version": "c1-lora", "cycle": "c1", "status": "canary", "changed_at": at(4.0)},
        {"version": "c1-lora", "cycle": "c1", "status": "treatment", "changed_at": at(4.5)},
        {"version": "c1-lora", "cycle": "c1", "status": "rolled_back", "changed_at": at(6.0)},
    ]
    manifests = [{"cycle": "c2", "created_at": at(7), "n_rows": 5}, {"cycle": "c1", "created_at": at(3), "n_rows": 9}]
    facts = cycle_facts(manifests, history)
    assert facts[0] == CycleFacts("c1", at(3), 9, "c1-lora", at(3.5), at(4.0), None, at(6.0), "rolled_back")
    assert facts[1] == CycleFacts("c2", at(7), 5)


def test_no_usage_yet_names_collection_and_scores_zero(config):
    empty = pl.DataFrame(schema={"trajectory_id": pl.String, "logged_at": pl.Datetime("us", "UTC"),
                                 "scored_at": pl.Datetime("us", "UTC"), "high_quality": pl.Boolean})
    membership = pl.DataFrame(schema={"cycle": pl.String, "trajectory_id": pl.String})
    result = velocity(config, with_cycle_steps(empty, membership, []), [], NOW)
    assert result["velocity_score"] == 0.0 and result["data_yield"] is None
    assert result["bottleneck"]["stage"] == "collection"
    assert result["bottleneck"]["reason"].startswith("no usage trajectory logged yet")
