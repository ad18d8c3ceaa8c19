"""The release settings: when a cycle trains (trigger), how its candidate is tested (ab) and
rolled out (rollout). Part of the one configuration object (lib/config.py re-exports them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator


class TriggerConfig(BaseModel):
    """The seed's automated training trigger (75.5)."""

    min_new_trajectories: int = 500
    min_high_quality_rate: float = 0.4
    max_days_since_last_training: float = 14
    min_days_between_training: float = 3
    performance_degradation_threshold: float = -0.05


class PhaseConfig(BaseModel):
    """Cold-start phases (75.2) by real usage trajectories: 0 below phase1_min_real,
    1 (weekly small LoRA) below phase2_min_real, then 2 (the seed's trigger)."""

    phase1_min_real: int = 500
    phase2_min_real: int = 2000
    phase1: TriggerConfig = Field(default_factory=lambda: TriggerConfig(
        min_new_trajectories=100, min_days_between_training=7))
    phase2: TriggerConfig = Field(default_factory=TriggerConfig)


class ABConfig(BaseModel):
    """A/B settings; the seed's numbers are the defaults (10% treatment, ≥1000 samples,
    14 days, ship at ≥2% improvement).

    minimum_detectable_effect replaces the seed's "≥2% relative improvement" with an
    absolute 0.02: relative lift is meaningless for a score near or below 0, and on the
    [-1, 1] quality scale 0.02 is 1% of the range, about 2–4% of a typical session score
    of 0.5–1.0. It is the effect the sample-size plan (lib/experiments/power.py) gives
    `power` to; an estimate must also reach minimum_effect_to_ship, set below it, or a
    true effect of exactly the minimum would ship only half the time.
    """

    policy: Literal["sequential", "classic"] = "sequential"
    treatment_share: float = Field(0.1, gt=0, lt=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    power: float = Field(0.8, gt=0, lt=1)
    min_users_per_arm: int = Field(1000, ge=2)
    minimum_detectable_effect: float = Field(0.02, gt=0)
    minimum_effect_to_ship: float = Field(0.01, ge=0)
    # non-inferiority margin of every guardrail (a bad-is-high rate), in canary and A/B alike
    guardrail_margin: float = Field(0.02, gt=0)
    max_days: float = Field(14.0, gt=0)
    srm_alpha: float = Field(0.001, gt=0, lt=1)
    # Users of both arms at which the confidence sequence is narrowest. None: the plan's size,
    # derived when the A/B stage starts from the champion's recent traffic; a number is
    # checked against that plan, with a warning when it is short of it.
    planned_users: int | None = Field(None, ge=2)
    # A user's sessions beyond this count weigh as this many (their mean is kept): one heavy
    # user cannot decide a test, and the delta method's no-dominant-user assumption holds.
    max_sessions_per_user: int = Field(20, ge=1)
    heavy_user_share: float = Field(0.05, gt=0, le=1)  # one user above this share of an arm's sessions: flagged (1% is routine in a 100-user arm)
    # Per-user σ never taken below this: an arm of identical values gets a width, not [x, x].
    sigma_floor: float = Field(0.05, ge=0)
    cuped: bool = True  # each user's pre-experiment mean quality as covariate (CUPED)
    cuped_lookback_days: float = Field(28.0, gt=0)
    classic_min_sessions: int = 30
    classic_min_lift_pct: float = 2.0

    @model_validator(mode="after")
    def _ship_below_planned_effect(self) -> "ABConfig":
        if self.minimum_effect_to_ship >= self.minimum_detectable_effect:
            raise ValueError(f"ab.minimum_effect_to_ship ({self.minimum_effect_to_ship}) must be below "
                             f"ab.minimum_detectable_effect ({self.minimum_detectable_effect}): a true effect of "
                             "the minimum could otherwise ship at most half the time")
        return self


class RolloutConfig(BaseModel):
    """Staged rollout: canary (1%) → A/B treatment (9%) → champion, the seed's 90/9/1 layout."""

    canary_share: float = 0.01
    treatment_share: float = 0.09
    canary_min_users: int = 20
