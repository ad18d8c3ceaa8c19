"""loop_health: hand-computed pieces, then whole runs of the loop with healthy and with biased users,
and the Dagster assets with their charts on the biased run's lake."""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta, timezone

import dagster as dg
import polars as pl
import pytest

from flywheel_assets.defs.observability.assets import flywheel_velocity, loop_health
from flywheel_assets.lib.observability.loop_health import (
    CHECKS, _grade, distinct_ngrams, first_attempts, measure_loop_health, worst,
)
from flywheel_assets_tests.observability.scenario import run_flywheel

BIAS_SIGNALS = ("online_divergence", "judge_disagreement")


@pytest.mark.parametrize("texts, n, expected", [
    ([["a", "b", "a", "b"]], 2, 2 / 3),  # ab, ba, ab
    ([["a", "b"], ["a", "b"]], 2, 1 / 2),  # the same bigram twice
    ([["a", "b", "c"]], 1, 1.0),
    ([["a"]], 2, 0.0),  # no bigram at all
])
def test_distinct_ngrams(texts, n, expected):
    assert distinct_ngrams(texts, n) == pytest.approx(expected)


@pytest.mark.parametrize("value, higher_is_worse, status", [
    (0.05, True, "ok"), (0.1, True, "warn"), (0.2, True, "alert"),
    (0.9, False, "ok"), (0.8, False, "warn"), (0.6, False, "alert"),
])
def test_grades_at_their_edges(value, higher_is_worse, status):
    warn, alert = (0.1, 0.2) if higher_is_worse else (0.8, 0.6)
    assert _grade(value, warn, alert, higher_is_worse) == status


def test_worst_status_orders_na_ok_warn_alert():
    assert worst(["ok", "n/a"]) == "ok" and worst(["ok", "alert", "warn"]) == "alert" and worst([]) == "n/a"


def test_a_retry_is_not_a_first_attempt():
    t0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
    usage = pl.DataFrame({
        "trajectory_id": ["t1", "t2", "t3", "t4", "t5"], "session_id": ["s1", "s1", "s1", "s2", None],
        "created_at": [t0 + timedelta(minutes=m) for m in (0, 1, 2, 0, 0)],
        "retried": [True, False, False, False, False]})
    marked = {r["trajectory_id"]: r["first_attempt"] for r in first_attempts(usage).to_dicts()}
    # t2 answers t1's retry; t3 follows an answer the user did not retry (a follow-up task)
    assert marked == {"t1": True, "t2": False, "t3": True, "t4": True, "t5": True}


def _run(tmp_path_factory, biased_users: float) -> tuple[dict, list[dict]]:
    per_cycle = []
    run = run_flywheel(tmp_path_factory.mktemp(f"biased-{biased_users}"), biased_users=biased_users,
                       after_cycle=lambda cycle, config, lake, now: per_cycle.append(
                           measure_loop_health(config, lake, now)))
    return run, per_cycle


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    return _run(tmp_path_factory, biased_users=0.0)


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    return _run(tmp_path_factory, biased_users=0.5)


def _statuses(result: dict) -> dict[str, dict[str, str]]:
    return {row["cycle"] or "open": {name: row["checks"][name][0] for name in CHECKS} for row in result["cycles"]}


def test_biased_users_are_flagged_within_two_cycles(biased):
    _, per_cycle = biased
    first, second = per_cycle
    # Users who accept wrong answers: first attempts accepted as they are run well above what the
    # verifier passes on held-out tasks for the same model, and judges fail what they accepted.
    flagged = [r for r in (first, second) if r["status"] == "alert"]
    assert flagged, [_statuses(r) for r in per_cycle]
    row = second["cycles"][1]
    assert row["divergence"] >= 0.15 and row["divergence_z"] >= 2
    assert row["online_acceptance"] > row["heldout_success"] + 0.15
    assert {c["check"] for c in second["checks"] if c["status"] == "alert"} & set(BIAS_SIGNALS)
    # the users are the problem, not the data mix or its diversity
    assert {c["check"]: c["status"] for c in second["checks"]}["loop_data_share"] == "ok"


def test_a_healthy_run_is_not_flagged(healthy):
    _, per_cycle = healthy
    for result in per_cycle:
        statuses = _statuses(result)
        assert all(s in ("ok", "n/a") for row in statuses.values() for s in row.values()), statuses
    row = per_cycle[-1]["cycles"][1]
    assert abs(row["divergence"]) < 0.08 and row["judge_disagreement"] < 0.1
    # both cycles measured every check on their own training set and usage window
    assert all(per_cycle[-1]["cycles"][i]["checks"][name][0] == "ok" for i in (0, 1) for name in CHECKS)


def test_assets_show_the_alert_and_charts_and_write_the_reports(biased):
    run, _ = biased
    result = dg.materialize([flywheel_velocity, loop_health], resources=run["resources"], instance=run["instance"])
    assert result.success
    health = result.asset_materializations_for_node("loop_health")[0].metadata
    assert health["status"].value == "alert" and health["alerts"].value >= 1
    assert "| online_divergence | **ALERT** |" in health["checks"].value
    check = result.get_asset_check_evaluations()[0]
    assert check.check_name == "no_negative_feedback_loop" and not check.passed
    velocity = result.asset_materializations_for_node("flywheel_velocity")[0].metadata
    assert velocity["velocity_score"].value > 0 and velocity["bottleneck"].value
    reports = run["config"].reports
    for name, metadata in (("quality_trend", health), ("tier_mix", health), ("chart", velocity)):
        embedded = re.search(r"base64,([A-Za-z0-9+/=]+)\)", metadata[name].value).group(1)
        assert base64.b64decode(embedded)[:8] == b"\x89PNG\r\n\x1a\n"
        assert metadata[f"{name}_file"].value.startswith(str(reports))
    assert {p.name for p in reports.iterdir()} >= {
        "velocity_by_stage.png", "quality_trend.png", "tier_mix.png", "velocity.json", "loop_health.json"}


def test_assets_on_an_empty_home(home):
    from flywheel_assets.defs.resources import FlywheelResource

    result = dg.materialize([flywheel_velocity, loop_health], resources={"flywheel": FlywheelResource(home=str(home))})
    assert result.success
    health = result.asset_materializations_for_node("loop_health")[0].metadata
    assert health["status"].value == "n/a"
    velocity = result.asset_materializations_for_node("flywheel_velocity")[0].metadata
    assert velocity["bottleneck"].value == "Trajectory collection" and "chart" not in velocity
