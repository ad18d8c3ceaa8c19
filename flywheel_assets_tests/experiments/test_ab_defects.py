"""Each input that fooled the A/B policy before issue 15, as a case the old code got wrong:
a heavy user, a sample-ratio mismatch outranking harm and the time limit, guardrails that
rolled back harms inside their margin, zero variance, NaN, and CUPED's arithmetic."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from flywheel_assets.lib.experiments.ab import ABConfig, ArmStats, arm_stats_by_metric, decide, guardrail_check
from flywheel_assets.lib.experiments.ab_stats import welch_difference

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
EQUAL = ABConfig(treatment_share=0.5)


def day(days: float) -> datetime:
    return T0 + timedelta(days=days)


def normal_arm(users: int, mean: float, sd: float = 0.3) -> ArmStats:
    """One-session users whose scores have exactly this mean and sample sd."""
    second = (users - 1) * sd ** 2 + users * mean ** 2
    return ArmStats(users, users, users * mean, second, users, users * mean, second)


def rate_arm(users: int, rate: float) -> ArmStats:
    hits = users * rate
    return ArmStats(users, users, hits, hits, users, hits, hits)


def test_one_heavy_user_no_longer_decides_the_test():
    """3,000 one-session users per arm at the same quality, plus one treatment user with
    10,000 sessions at 0.9: uncapped, that user is 77% of the treatment's sessions and the
    old policy shipped with interval [0.112, 0.657]."""
    rng = np.random.default_rng(15)
    control_y = rng.normal(0.5, 0.3, 3000)
    treatment_y = rng.normal(0.5, 0.3, 3000)
    control = ArmStats.from_users(control_y, np.ones(3000), cap=20)
    treatment = ArmStats.from_users(np.append(treatment_y, 0.9 * 10_000), np.append(np.ones(3000), 10_000),
                                    np.append(treatment_y ** 2, 0.81 * 10_000), cap=20)
    decision = decide(control, treatment, EQUAL, started_at=T0, now=day(3))
    assert decision.outcome == "CONTINUE"
    assert abs(decision.effect) < 0.02  # capped at 20 sessions, the heavy user moves the mean by ≈ 0.4·20/3020
    assert "heavy_user" in decision.flags
    assert decision.details["top_user_share"] == pytest.approx(10_000 / 13_000)
    assert "Heavy user: one user holds 76.9%" in decision.reason
    uncapped = ArmStats.from_users(np.append(treatment_y, 9000.0), np.append(np.ones(3000), 10_000),
                                   np.append(treatment_y ** 2, 8100.0))
    assert uncapped.mean > 0.8 and treatment.mean < 0.51  # what the cap changes
    assert decide(control, uncapped, EQUAL, started_at=T0, now=day(3)).outcome == "SHIP"  # the defect, uncapped


def test_the_cap_is_the_same_in_the_lake_query_and_from_per_user_sums():
    rng = np.random.default_rng(3)
    owner = np.concatenate([rng.integers(0, 200, 1500), np.zeros(400, dtype=int)])  # user 0 is heavy
    quality = rng.uniform(-1, 1, owner.size)
    frame = pl.DataFrame({"user_id": [f"u{k}" for k in owner], "arm": ["control"] * owner.size, "q": quality})
    got = arm_stats_by_metric(frame, ["q"], cap=20)["q"]["control"]
    per_user = frame.group_by("user_id").agg(y=pl.col("q").sum(), n=pl.len(), m2=(pl.col("q") ** 2).sum())
    expected = ArmStats.from_users(per_user["y"].to_numpy(), per_user["n"].to_numpy(), per_user["m2"].to_numpy(), cap=20)
    assert got.max_sessions == expected.max_sessions > 400
    assert got.sum_n == pytest.approx(expected.sum_n) and got.sum_n < got.sessions
    for name in ("sum_y", "sum_y2", "sum_n2", "sum_yn"):
        assert getattr(got, name) == pytest.approx(getattr(expected, name))


def test_clear_harm_rolls_back_even_under_a_sample_ratio_mismatch():
    """Day 300, effect −0.4, arms 10,000/11,000 on a 50/50 plan: the old policy said CONTINUE (srm)."""
    decision = decide(normal_arm(10_000, 0.5), normal_arm(11_000, 0.1), EQUAL, started_at=T0, now=day(300))
    assert decision.srm_p < 0.001 and "srm" in decision.flags
    assert (decision.outcome, decision.rule) == ("ROLLBACK", "negative")


def test_the_time_limit_ends_a_test_under_a_sample_ratio_mismatch():
    control, treatment = normal_arm(10_000, 0.5), normal_arm(11_000, 0.56)
    paused = decide(control, treatment, EQUAL, started_at=T0, now=day(5))
    ended = decide(control, treatment, EQUAL, started_at=T0, now=day(14))
    assert (paused.outcome, paused.rule) == ("CONTINUE", "srm")
    assert paused.interval[0] > 0  # it would have shipped: the mismatch is what pauses it
    assert paused.reason.startswith("SRM ALERT, shipping paused")
    assert (ended.outcome, ended.rule) == ("ROLLBACK", "max_duration")
    assert "sample-ratio mismatch" in ended.reason


def test_a_guardrail_harm_inside_its_margin_does_not_roll_back_a_win():
    """+1 point of error rate, half the 2-point margin, with a +0.1 quality win: the old
    rule rolled back on any significant harm."""
    users = 200_000
    guardrails = {"error_reported": (rate_arm(users, 0.05), rate_arm(users, 0.06))}
    decision = decide(normal_arm(users, 0.5), normal_arm(users, 0.6), EQUAL.model_copy(update={"planned_users": 2 * users}),
                      started_at=T0, now=day(5), guardrails=guardrails)
    check = decision.guardrails[0]
    assert check.interval[0] > 0  # the harm is significant...
    assert check.interval[1] < check.margin  # ...and shown inside the margin
    assert (decision.outcome, check.status) == ("SHIP", "pass")


@pytest.mark.parametrize("treatment_rate, status", [(0.06, "inconclusive"), (0.12, "inconclusive"),
                                                    (0.30, "violated")])
def test_canary_and_ab_share_one_non_inferiority_rule(treatment_rate, status):
    """On a canary's 200 users: a harm is violated only when shown beyond the margin."""
    config = ABConfig(guardrail_margin=0.02)
    check = guardrail_check("error_reported", rate_arm(2000, 0.05), rate_arm(200, treatment_rate), config)
    assert check.status == status
    assert (check.interval[0] > config.guardrail_margin) is (status == "violated")


def test_a_zero_variance_arm_cannot_ship():
    """Two users per arm at 0.5 and 0.53: the old policy shipped with the interval [0.03, 0.03]."""
    config = EQUAL.model_copy(update={"min_users_per_arm": 2})
    control = ArmStats.from_users([0.5, 0.5], [1, 1])
    treatment = ArmStats.from_users([0.53, 0.53], [1, 1])
    decision = decide(control, treatment, config, started_at=T0, now=day(1))
    assert decision.outcome == "CONTINUE"
    assert decision.interval[1] - decision.interval[0] > 0.1
    diff = welch_difference(control, treatment, sigma_floor=0.05)
    assert diff.se == pytest.approx(0.05 * math.sqrt(1 / 2 + 1 / 2))


def test_nan_and_infinite_metrics_are_rejected_at_the_door_and_counted():
    rng = np.random.default_rng(5)
    users = [f"u{k}" for k in range(2000)]
    arm = ["control" if k % 2 else "treatment" for k in range(2000)]
    quality = np.where(np.array(arm) == "treatment", 0.2, 0.5) + rng.normal(0, 0.2, 2000)
    quality[[0, 2]] = np.nan  # two treatment sessions
    quality[4] = np.inf
    frame = pl.DataFrame({"user_id": users, "arm": arm, "quality": quality}, nan_to_null=False)
    stats = arm_stats_by_metric(frame, ["quality"])["quality"]
    assert stats["treatment"].rejected == 3 and stats["control"].rejected == 0
    assert stats["treatment"].users == 997 and math.isfinite(stats["treatment"].mean)
    decision = decide(stats["control"], stats["treatment"], EQUAL.model_copy(update={"min_users_per_arm": 500}),
                      started_at=T0, now=day(2))
    assert (decision.outcome, decision.rule) == ("ROLLBACK", "negative")  # the old NaN interval never rolled back
    assert "rejected_values" in decision.flags and "3 NaN or infinite" in decision.reason
    from_sums = ArmStats.from_users([0.5, math.nan, 0.7], [1, 1, 1])
    assert (from_sums.users, from_sums.rejected, from_sums.sum_y) == (2, 1, pytest.approx(1.2))


def test_cuped_is_the_ancova_estimate_with_the_pooled_within_arm_slope():
    rng = np.random.default_rng(7)
    n = 4000
    x = rng.normal(0.4, 0.3, n)
    treated = rng.random(n) < 0.3
    y = 0.1 + 0.8 * x + 0.05 * treated + rng.normal(0, 0.2, n)
    control = ArmStats.from_users(y[~treated], np.ones((~treated).sum()), x=x[~treated])
    treatment = ArmStats.from_users(y[treated], np.ones(treated.sum()), x=x[treated])
    diff = welch_difference(control, treatment)
    design = np.column_stack([np.ones(n), treated, x])
    coefficients = np.linalg.lstsq(design, y, rcond=None)[0]
    assert diff.effect == pytest.approx(coefficients[1], rel=1e-9)
    within = np.concatenate([x[~treated] - x[~treated].mean(), x[treated] - x[treated].mean()])
    residual = np.concatenate([y[~treated] - y[~treated].mean(), y[treated] - y[treated].mean()])
    assert diff.theta == pytest.approx(within @ residual / (within @ within), rel=1e-9)
    rho2 = np.corrcoef(x, y - 0.05 * treated)[0, 1] ** 2
    assert diff.variance_reduction == pytest.approx(rho2, abs=0.03)  # ≈ 0.56 here
    plain = welch_difference(control, treatment, cuped=False)
    assert plain.se > 1.4 * diff.se and plain.variance_reduction == 0


def test_a_missing_covariate_gets_the_mean_of_the_known_ones():
    frame = pl.DataFrame({"user_id": ["a", "a", "b", "c", "d"], "arm": ["control"] * 2 + ["treatment"] * 3,
                          "q": [0.2, 0.4, 0.5, 0.6, 0.9], "pre": [0.1, 0.1, None, 0.4, 0.7]})
    stats = arm_stats_by_metric(frame, ["q"], covariate_column="pre")["q"]
    imputed = (0.1 + 0.4 + 0.7) / 3
    assert stats["control"].sum_x == pytest.approx(0.1)
    assert stats["treatment"].sum_x == pytest.approx(imputed + 0.4 + 0.7)
    assert stats["control"].sum_xy == pytest.approx(0.1 * 0.6)
    assert stats["treatment"].sum_xn == pytest.approx(imputed + 0.4 + 0.7)
