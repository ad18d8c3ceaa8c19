"""The statistical proof at the shipped defaults and the rollout's split, on the harness's own
data model (lib/experiments/harness.py), small and seeded; `make ab-harness` runs the same
settings on 1,000 experiments each for README's table."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from flywheel_assets.lib.config import ABConfig, RolloutConfig
from flywheel_assets.lib.experiments.harness import Population, Setting, _chances, _sessions, plan_for, run_setting
from flywheel_assets.lib.experiments.power import PRIMARY, joint_power, required_users

SEED = 1515
DEFAULTS = ABConfig()
SPLIT = RolloutConfig().treatment_share  # the canary has become the treatment: 9 of every 100 users


@pytest.fixture(scope="module")
def plan():
    return plan_for(DEFAULTS, SPLIT, SEED)


@pytest.fixture(scope="module")
def config(plan):
    """What the rollout hands `decide`: the defaults with the plan's size."""
    return DEFAULTS.model_copy(update={"planned_users": plan.planned_users})


def test_the_harness_effect_is_exactly_the_one_asked_for_on_skewed_discrete_scores():
    population = Population()
    shape = (1, 400_000)
    chances = _chances(np.random.default_rng(SEED), population, shape)
    base = _sessions(np.random.default_rng(1), population, chances, (*shape, 1))["quality"].ravel()
    better = _sessions(np.random.default_rng(1), population, chances, (*shape, 1), 0.02 * population.rescue)
    assert better["quality"].mean() - base.mean() == pytest.approx(0.02, abs=0.001)  # same draws, so tight
    assert np.unique(np.round(base, 6)).size < 60  # the seed's formula over discrete outcomes
    assert stats.skew(base) < -0.2 and np.median(base) > base.mean()  # most sessions good, a long bad tail


def test_the_plan_covers_the_split_the_effect_and_every_guardrail(plan):
    assert set(plan.power_by_metric) == {PRIMARY, "error_reported", "retried"}
    assert plan.power >= DEFAULTS.power
    assert plan.power == pytest.approx(np.prod(list(plan.power_by_metric.values())))
    assert plan.users_per_arm["treatment"] == round(plan.planned_users * SPLIT)
    alone = required_users({PRIMARY: plan.sigmas[PRIMARY]}, SPLIT, DEFAULTS)
    equal = required_users(plan.sigmas, 0.5, DEFAULTS)
    assert plan.planned_users > 1.2 * alone  # the guardrails add users
    assert plan.planned_users > 2.5 * equal  # a 9% split needs far more users than 50/50
    assert plan.planned_users * SPLIT > DEFAULTS.min_users_per_arm  # the seed's 1,000 per arm never binds


def test_no_false_ship_under_daily_peeking_at_the_defaults(plan, config):
    outcome = run_setting(Setting("A/A", 0.0, SPLIT), config, plan.planned_users, 32, SEED + 1)
    print(f"\nA/A at the defaults, {plan.planned_users:,} users, 32 experiments: false SHIP {outcome.ship:.1%}")
    assert outcome.ship <= 0.05
    assert outcome.rollback + outcome.ship == 1.0  # every test ends by max_days


def test_power_for_the_minimum_effect_at_the_defaults_with_guardrails(plan, config):
    effect = DEFAULTS.minimum_detectable_effect
    outcome = run_setting(Setting("minimum effect", effect, SPLIT), config, plan.planned_users, 60, SEED + 2)
    print(f"\n+{effect} at the defaults, {plan.planned_users:,} users, 60 experiments: shipped {outcome.ship:.1%}, "
          f"CUPED variance reduction {outcome.variance_reduction:.1%}")
    assert outcome.ship >= 0.8
    assert 0.02 < outcome.variance_reduction < 0.5


def test_a_heavy_user_does_not_make_a_false_ship(plan, config):
    setting = Setting("A/A heavy user", 0.0, SPLIT, heavy_users=1)
    outcome = run_setting(setting, config, plan.planned_users, 24, SEED + 3)
    print(f"\nA/A with one heavy user, 24 experiments: false SHIP {outcome.ship:.1%}, flagged {outcome.heavy_flagged:.0%}")
    assert outcome.ship <= 0.05
    assert outcome.heavy_flagged == 1.0


def test_a_ten_percent_shortfall_of_treatment_users_is_detected_within_the_plan(plan, config):
    setting = Setting("SRM", 0.0, SPLIT, treatment_loss=0.1)
    outcome = run_setting(setting, config, plan.planned_users, 12, SEED + 4)
    assert outcome.srm_detected == 1.0
    assert outcome.ship == 0.0


def test_power_now_and_at_the_plan_follow_the_observed_sigma(plan):
    """Power at the plan's size is config.power by construction; half the users give less."""
    at_plan = joint_power(plan.sigmas, plan.planned_users, SPLIT, DEFAULTS)[0]
    half = joint_power(plan.sigmas, plan.planned_users / 2, SPLIT, DEFAULTS, plan.planned_users)[0]
    assert at_plan == pytest.approx(plan.power)
    assert half < 0.5 * at_plan
