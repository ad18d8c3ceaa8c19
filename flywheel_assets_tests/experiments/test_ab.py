"""A/B statistics: estimators against hand-computed cases and scipy, the decision rules,
and simulated proof that the sequential policy survives peeking where the seed's rule
does not. Simulations build sufficient statistics with numpy, never rows."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest
from scipy import stats

from flywheel_assets.lib.experiments.ab import (
    ABConfig,
    ArmStats,
    arm_stats,
    arm_stats_by_metric,
    assign,
    decide,
    effect_chart,
    ratio_estimate,
    report_markdown,
)
from flywheel_assets.lib.experiments.ab_stats import srm_p_value, welch_difference
from flywheel_assets.lib.experiments.power import PRIMARY, fixed_horizon_users, required_users

SEED = 754
T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
EQUAL = ABConfig(treatment_share=0.5)

# The simulated users: 1–5 sessions each, a session's quality is the user's own level
# plus noise, both uniform, so that even with the +0.1 effect every score stays within
# [-1, 1] (0.2 + 0.1 + 0.3 + 0.4 = 1.0) and no clipping shrinks the effect.
BASE_QUALITY, USER_SPREAD, SESSION_SPREAD, MAX_SESSIONS = 0.2, 0.3, 0.4, 5
LOOKS = 20
TRUE_EFFECT = 0.1


def day(days: float) -> datetime:
    return T0 + timedelta(days=days)


def normal_arm(users: int, mean: float, sd: float = 0.3) -> ArmStats:
    """An arm of one-session users whose scores have exactly this mean and sample sd."""
    return ArmStats(users=users, sessions=users, sum_y=users * mean, sum_y2=(users - 1) * sd ** 2 + users * mean ** 2,
                    sum_n2=users, sum_yn=users * mean, sum_m2=(users - 1) * sd ** 2 + users * mean ** 2)


def rate_arm(users: int, rate: float) -> ArmStats:
    """An arm of one-session users with a 0/1 metric (error reported) at this rate."""
    hits = users * rate
    return ArmStats(users, users, hits, hits, users, hits, hits)


def simulate_looks(rng: np.random.Generator, experiments: int, users_per_look: int, effect: float,
                   share: float = 0.5, looks: int = LOOKS) -> np.ndarray:
    """Cumulative ArmStats fields, shape (experiments, looks, arm [control, treatment], 7)."""
    totals = np.zeros((experiments, looks, 2, 7))
    positions = np.arange(MAX_SESSIONS)
    for look in range(looks):
        sessions = rng.integers(1, MAX_SESSIONS + 1, size=(experiments, users_per_look))
        treated = rng.random((experiments, users_per_look)) < share
        level = BASE_QUALITY + rng.uniform(-USER_SPREAD, USER_SPREAD, sessions.shape) + effect * treated
        quality = level[..., None] + rng.uniform(-SESSION_SPREAD, SESSION_SPREAD, (*sessions.shape, MAX_SESSIONS))
        quality *= positions < sessions[..., None]
        y, m2 = quality.sum(-1), (quality * quality).sum(-1)
        per_user = np.stack([np.ones_like(y), sessions, y, y * y, sessions * sessions, y * sessions, m2], -1)
        for arm, members in enumerate((~treated, treated)):
            totals[:, look, arm] = (per_user * members[..., None]).sum(axis=1)
    return totals.cumsum(axis=1)


def as_arm(row: np.ndarray) -> ArmStats:
    return ArmStats(int(row[0]), int(row[1]), *(float(v) for v in row[2:]))


def first_decisions(totals: np.ndarray, config: ABConfig) -> list[str]:
    """Each experiment looked at after every batch over 14 days, stopped at its first
    SHIP or ROLLBACK: the way an automated rollout uses the rule."""
    looks = totals.shape[1]
    outcomes = []
    for experiment in totals:
        outcome = "CONTINUE"
        for look, (control, treatment) in enumerate(experiment, start=1):
            decision = decide(as_arm(control), as_arm(treatment), config, started_at=T0,
                              now=day(config.max_days * look / looks))
            if decision.outcome != "CONTINUE":
                outcome = decision.outcome
                break
        outcomes.append(outcome)
    return outcomes


@pytest.fixture(scope="module")
def plan() -> dict:
    """The planned sample size for a +0.1 effect at an equal split without guardrails, σ
    measured on a simulated pilot: the policy's core, apart from the rollout's defaults
    (test_ab_harness.py proves those)."""
    pilot = simulate_looks(np.random.default_rng(SEED), 1, 20_000, 0.0, looks=1)[0, -1, 0]
    sigma = ratio_estimate(as_arm(pilot)).per_user_sigma
    config = ABConfig(treatment_share=0.5, min_users_per_arm=100, minimum_detectable_effect=TRUE_EFFECT,
                      minimum_effect_to_ship=0.02)
    users = required_users({PRIMARY: sigma}, 0.5, config)
    return {"sigma": sigma, "users_per_arm": users // 2, "config": config.model_copy(update={"planned_users": users})}


def test_delta_variance_matches_a_hand_computed_case():
    # Y = [1, .5, -.5, 2], N = [1, 2, 1, 3]: μ_Y = .75, μ_N = 1.75, s²_Y = 3.25/3,
    # s²_N = 2.75/3, s_YN = 2.25/3, so var = ¼(1.0833/3.0625 − 2·.75·.75/5.3594 + .5625·.9167/9.3789).
    estimate = ratio_estimate(ArmStats.from_users([1.0, 0.5, -0.5, 2.0], [1, 2, 1, 3], m2=[1, 0.2, 0.25, 1.5]))
    assert estimate.mean == pytest.approx(3 / 7)
    assert estimate.variance == pytest.approx(0.25 * (3.25 / 3 / 1.75 ** 2 - 2 * 0.75 * 0.75 / 1.75 ** 3
                                                      + 0.75 ** 2 * 2.75 / 3 / 1.75 ** 4))
    assert estimate.variance == pytest.approx(0.049701, abs=1e-6)


def test_delta_variance_matches_the_bootstrap():
    rng = np.random.default_rng(SEED)
    n = rng.integers(1, 6, size=2000)
    y = n * rng.normal(0.4, 0.3, size=2000) + rng.normal(0, 0.5, size=2000) * np.sqrt(n)
    resamples = rng.integers(0, 2000, size=(2000, 2000))
    bootstrap = (y[resamples].sum(1) / n[resamples].sum(1)).var(ddof=1)
    delta = ratio_estimate(ArmStats.from_users(y, n, m2=np.zeros(2000))).variance
    assert delta == pytest.approx(bootstrap, rel=0.1)


@pytest.mark.parametrize("control_users, treatment_users, control_sd, treatment_sd", [
    (50, 50, 1.0, 1.0), (3000, 300, 0.3, 0.8), (40, 900, 2.0, 0.5)])
def test_welch_matches_scipy_when_every_user_has_one_session(control_users, treatment_users, control_sd, treatment_sd):
    rng = np.random.default_rng(SEED)
    control = rng.normal(0.2, control_sd, control_users)
    treatment = rng.normal(0.3, treatment_sd, treatment_users)
    diff = welch_difference(ArmStats.from_users(control, np.ones(control_users)),
                            ArmStats.from_users(treatment, np.ones(treatment_users)))
    expected = stats.ttest_ind(treatment, control, equal_var=False)
    assert diff.effect / diff.se == pytest.approx(expected.statistic, rel=1e-9)
    assert diff.df == pytest.approx(expected.df, rel=1e-9)
    assert diff.p_value == pytest.approx(expected.pvalue, rel=1e-6)


@pytest.mark.parametrize("treatment_users, halted", [(10_600, True), (10_050, False)])
def test_a_sample_ratio_mismatch_halts_a_decision_that_would_ship(treatment_users, halted):
    decision = decide(normal_arm(10_000, 0.50), normal_arm(treatment_users, 0.56), EQUAL,
                      started_at=T0, now=day(3))
    assert (decision.srm_p < 0.001) is halted
    assert decision.outcome == ("CONTINUE" if halted else "SHIP")
    assert decision.reason.startswith("SRM ALERT, shipping paused") is halted
    assert ("srm" in decision.flags) is halted


def test_srm_is_judged_against_the_planned_split():
    assert srm_p_value(9_000, 1_000, 0.1) > 0.5
    assert srm_p_value(9_000, 1_000, 0.5) < 1e-100


def test_the_sequential_policy_survives_peeking_and_the_seeds_rule_does_not(plan):
    rng = np.random.default_rng(SEED + 1)
    users_per_look = math.ceil(2 * plan["users_per_arm"] / LOOKS)
    totals = simulate_looks(rng, 500, users_per_look, effect=0.0)
    sequential = first_decisions(totals, plan["config"])
    classic = first_decisions(totals, plan["config"].model_copy(update={"policy": "classic"}))
    sequential_rate = sequential.count("SHIP") / len(sequential)
    classic_rate = classic.count("SHIP") / len(classic)
    print(f"\nA/A, 500 experiments, {LOOKS} looks up to {plan['users_per_arm']} users per arm: false SHIP "
          f"sequential {sequential_rate:.1%}, classic {classic_rate:.1%}")
    assert sequential_rate <= 0.05
    assert classic_rate > 0.05


def test_a_true_effect_ships_at_the_planned_sample_size(plan):
    rng = np.random.default_rng(SEED + 2)
    users_per_look = math.ceil(2 * plan["users_per_arm"] / LOOKS)
    outcomes = first_decisions(simulate_looks(rng, 200, users_per_look, effect=TRUE_EFFECT), plan["config"])
    power = outcomes.count("SHIP") / len(outcomes)
    print(f"\nσ per user {plan['sigma']:.3f}, planned {plan['users_per_arm']} users per arm for +{TRUE_EFFECT}: "
          f"shipped {power:.1%} of 200")
    assert power >= 0.8


def test_unequal_arms_keep_the_false_ship_rate(plan):
    rng = np.random.default_rng(SEED + 3)
    config = plan["config"].model_copy(update={"treatment_share": 0.1, "planned_users": 10_000})
    outcomes = first_decisions(simulate_looks(rng, 300, 500, effect=0.0, share=0.1), config)
    rate = outcomes.count("SHIP") / len(outcomes)
    print(f"\nA/A at a 90/10 split, 300 experiments: false SHIP {rate:.1%}")
    assert rate <= 0.05


def test_no_decision_below_the_minimum_users():
    below = decide(normal_arm(999, 0.5), normal_arm(999, 0.8), EQUAL, started_at=T0, now=day(5))
    at = decide(normal_arm(1000, 0.5), normal_arm(1000, 0.8), EQUAL, started_at=T0, now=day(1))
    expired = decide(normal_arm(999, 0.5), normal_arm(999, 0.8), EQUAL, started_at=T0, now=day(14))
    assert (below.outcome, below.rule) == ("CONTINUE", "min_users")
    assert "1,000 users per arm" in below.reason
    assert at.outcome == "SHIP"
    assert (expired.outcome, expired.rule) == ("ROLLBACK", "max_duration")


def test_the_test_ends_after_fourteen_days_without_an_improvement():
    control, treatment = normal_arm(5000, 0.5), normal_arm(5000, 0.505)
    assert decide(control, treatment, EQUAL, started_at=T0, now=day(13.9)).outcome == "CONTINUE"
    ended = decide(control, treatment, EQUAL, started_at=T0, now=day(14))
    assert (ended.outcome, ended.rule) == ("ROLLBACK", "max_duration")
    assert "no detectable improvement within 14 days" in ended.reason


def test_a_clear_negative_effect_rolls_back():
    decision = decide(normal_arm(3000, 0.5), normal_arm(3000, 0.4), EQUAL, started_at=T0, now=day(2))
    assert (decision.outcome, decision.rule) == ("ROLLBACK", "negative")
    assert decision.interval[1] < 0


def test_a_significant_effect_below_the_minimum_to_ship_does_not_ship():
    decision = decide(normal_arm(200_000, 0.5), normal_arm(200_000, 0.505), EQUAL, started_at=T0, now=day(5))
    assert decision.interval[0] > 0
    assert decision.outcome == "CONTINUE"
    assert "below the minimum to ship" in decision.reason


@pytest.mark.parametrize("errors_control, errors_treatment, users, outcome, status", [
    (0.05, 0.05, 20_000, "SHIP", "pass"),  # the same error rate, measured tightly
    (0.05, 0.06, 3_000, "CONTINUE", "inconclusive"),  # maybe worse by more than the margin
    (0.05, 0.10, 3_000, "ROLLBACK", "violated"),  # worse beyond the margin, shown
])
def test_guardrails_must_pass_before_shipping(errors_control, errors_treatment, users, outcome, status):
    decision = decide(normal_arm(users, 0.5), normal_arm(users, 0.6), EQUAL, started_at=T0, now=day(3),
                      guardrails={"error_rate": (rate_arm(users, errors_control), rate_arm(users, errors_treatment))})
    assert decision.outcome == outcome
    assert decision.guardrails[0].status == status
    if outcome != "SHIP":
        assert "error_rate" in decision.reason


def test_the_classic_policy_is_the_seeds_session_t_test():
    rng = np.random.default_rng(SEED)
    control, treatment = rng.normal(0.50, 0.3, 400), rng.normal(0.56, 0.3, 300)
    decision = decide(ArmStats.from_users(control, np.ones(400)), ArmStats.from_users(treatment, np.ones(300)),
                      ABConfig(policy="classic", treatment_share=0.5), started_at=T0, now=day(1))
    expected = stats.ttest_ind(control, treatment)
    assert decision.p_value == pytest.approx(expected.pvalue, rel=1e-6)
    assert decision.outcome == "SHIP"
    assert decision.details["relative_lift_pct"] == pytest.approx((treatment.mean() / control.mean() - 1) * 100)
    few = decide(normal_arm(29, 0.5), normal_arm(29, 0.9), ABConfig(policy="classic"), started_at=T0, now=day(1))
    assert few.outcome == "CONTINUE"


def test_arm_stats_aggregates_users_then_arms_in_duckdb():
    rng = np.random.default_rng(SEED)
    users = [f"u{k}" for k in range(300)]
    owner = rng.integers(0, 300, size=2000)
    quality = rng.uniform(-1, 1, size=2000)
    errors = (rng.random(2000) < 0.1).astype(float)
    sessions = pl.DataFrame({"user_id": [users[k] for k in owner],
                             "arm": [assign(users[k], "t1", 0.5) for k in owner],
                             "quality": quality, "error": errors})
    sessions = sessions.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.col("quality"))
                                     .alias("quality"))
    result = arm_stats_by_metric(sessions, ["quality", "error"])
    for arm in ("control", "treatment"):
        per_user = (sessions.filter(pl.col("arm") == arm).drop_nulls("quality").group_by("user_id")
                    .agg(y=pl.col("quality").sum(), n=pl.len(), q=(pl.col("quality") ** 2).sum()))
        expected = ArmStats.from_users(per_user["y"].to_numpy(), per_user["n"].to_numpy(), per_user["q"].to_numpy())
        got = result["quality"][arm]
        assert (got.users, got.sessions) == (expected.users, expected.sessions)
        for name in ("sum_y", "sum_y2", "sum_n2", "sum_yn", "sum_m2"):
            assert getattr(got, name) == pytest.approx(getattr(expected, name))
    assert result["error"]["control"].sessions + result["error"]["treatment"].sessions == 2000
    assert arm_stats(sessions.to_arrow(), "error") == result["error"]


def test_arm_stats_of_disjoint_users_add_up():
    rng = np.random.default_rng(SEED)
    n = rng.integers(1, 6, size=1000)
    y = rng.normal(0.3, 0.5, size=1000) * n
    m2 = rng.uniform(0, 1, size=1000) * n
    whole = ArmStats.from_users(y, n, m2)
    halves = ArmStats.from_users(y[:400], n[:400], m2[:400]) + ArmStats.from_users(y[400:], n[400:], m2[400:])
    assert halves.users == whole.users and halves.sessions == whole.sessions
    for name in ("sum_y", "sum_y2", "sum_n2", "sum_yn", "sum_m2"):
        assert getattr(halves, name) == pytest.approx(getattr(whole, name))


def test_assignment_is_sticky_and_splits_as_planned():
    users = [f"user-{k}" for k in range(100_000)]
    arms = [assign(user, "ab_v2", 0.1) for user in users]
    assert arms[:1000] == [assign(user, "ab_v2", 0.1) for user in users[:1000]]
    assert abs(arms.count("treatment") / len(arms) - 0.1) < 0.01
    other_test = [assign(user, "ab_v3", 0.5) for user in users]
    assert abs(other_test.count("treatment") / len(users) - 0.5) < 0.01
    both = sum(a == b == "treatment" for a, b in zip(arms, other_test))
    assert abs(both / len(users) - 0.05) < 0.01  # tests are assigned independently


def test_planned_size_needs_more_users_than_a_fixed_horizon_test():
    config = ABConfig(treatment_share=0.5, minimum_detectable_effect=0.05, minimum_effect_to_ship=0.0)
    fixed_horizon = fixed_horizon_users(0.05, 0.3, 0.5)
    assert fixed_horizon == pytest.approx(4 * 0.3 ** 2 * (1.959964 + 0.841621) ** 2 / 0.05 ** 2 / 1, rel=1e-5)
    planned = required_users({PRIMARY: 0.3}, 0.5, config)
    assert fixed_horizon < planned < 4 * fixed_horizon
    smaller = config.model_copy(update={"minimum_detectable_effect": 0.025})
    assert required_users({PRIMARY: 0.3}, 0.5, smaller) > 3.5 * planned


def test_report_and_chart_show_every_look(tmp_path):
    history = [decide(normal_arm(users, 0.5), normal_arm(users, 0.53), EQUAL, started_at=T0, now=day(d))
               for d, users in ((1, 500), (2, 1500), (4, 4000), (6, 9000))]
    report = report_markdown(history[-1], history)
    assert report.startswith(f"**{history[-1].outcome}**")
    assert report.count("\n| ") >= 4 + 4 + 5
    assert "| 4 | 6.0 | 9,000 / 9,000 |" in report
    chart = effect_chart(history, tmp_path / "ab" / "effect.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert history[-1].as_dict()["interval"] == list(history[-1].interval)
