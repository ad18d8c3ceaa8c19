"""The sample-size plan of an A/B test as the rollout runs it, and its power at any size.

SHIP needs every one of these at once: the primary metric's anytime-valid interval above
0 with the estimate at least `minimum_effect_to_ship`, and each guardrail's upper bound
under its non-inferiority margin. So the plan is the smallest number of users of both
arms, at the test's split, for which the chance that all hold, when the treatment is
better by `minimum_detectable_effect` and no guardrail moves, reaches `power`. The
guardrails, not the effect, often set it: a harmless retry rate must be *shown* within
its margin, which is as hard as detecting an effect of the margin's size.

Each requirement's chance at the last look is Φ((distance to its bar − h)/se): se is
σ/sqrt(n·π(1 − π)), h the confidence sequence's half-width at n when tuned for n. The
requirements are taken as independent (their product); quality and the guardrails share
sessions and move together, which makes the joint chance higher, and every earlier look
adds chances to ship, so the plan is on the safe side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from scipy import special

from flywheel_assets.lib.config import ABConfig
from flywheel_assets.lib.experiments.ab_stats import cs_margin, cs_rho2

PRIMARY = "quality"


@dataclass(frozen=True)
class Plan:
    """How many users the test needs and whether the traffic brings them in time."""

    planned_users: int  # both arms; what the confidence sequence is tuned for
    required_users: int  # what the power target alone asks for
    users_per_arm: dict[str, int]
    treatment_share: float
    power: float  # at planned_users, every requirement together
    power_by_metric: dict[str, float]
    binding: str  # the requirement with the lowest chance at planned_users
    sigmas: dict[str, float]
    reachable_users: float | None  # users the arms can get within max_days, from recent traffic
    days_needed: float | None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def requirement_power(name: str, sigma: float, users: float, share: float, config: ABConfig,
                      planned_users: float, effect: float | None = None) -> float:
    """The chance that requirement `name` holds at a look with `users` users of both arms.
    The primary metric's true effect is `effect` (by default the minimum detectable one);
    a guardrail's is 0."""
    if users < 2 or not math.isfinite(sigma):
        return 0.0
    se = max(sigma, config.sigma_floor) / math.sqrt(users * share * (1 - share))
    half_width = math.sqrt(users) * se * cs_margin(users, cs_rho2(planned_users, config.alpha), config.alpha)
    if name == PRIMARY:
        true = config.minimum_detectable_effect if effect is None else effect
        return float(special.ndtr((true - max(half_width, config.minimum_effect_to_ship)) / se))
    return float(special.ndtr((config.guardrail_margin - half_width) / se))


def joint_power(sigmas: Mapping[str, float], users: float, share: float, config: ABConfig,
                planned_users: float | None = None) -> tuple[float, dict[str, float]]:
    """(every requirement's chance multiplied, each one's chance)."""
    planned = users if planned_users is None else planned_users
    each = {name: requirement_power(name, sigma, users, share, config, planned) for name, sigma in sigmas.items()}
    return math.prod(each.values()), each


def required_users(sigmas: Mapping[str, float], share: float, config: ABConfig) -> int:
    """The smallest n (both arms) whose joint power, the sequence tuned for n, reaches config.power."""
    def enough(n: int) -> bool:
        return joint_power(sigmas, n, share, config)[0] >= config.power

    high = 4
    while not enough(high):
        high *= 2
        if high > 1 << 40:
            raise ValueError(f"no sample size reaches power {config.power} with σ {dict(sigmas)}")
    low = high // 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high


def make_plan(config: ABConfig, sigmas: Mapping[str, float], share: float | None = None,
              reachable_users: float | None = None) -> Plan:
    """The plan for per-user σ of each metric (PRIMARY first, then the guardrails), at the
    test's split, and the users the arms can reach within max_days (None: unknown).

    planned_users is the configured one when set, else the larger of the requirement and
    the size at which the smaller arm reaches min_users_per_arm (below that the test
    cannot ship, so a plan under it would tune the sequence for a look that never decides).
    """
    share = config.treatment_share if share is None else share
    sigmas = {name: max(float(sigma), config.sigma_floor) for name, sigma in sigmas.items()}
    required = required_users(sigmas, share, config)
    floor_users = math.ceil(config.min_users_per_arm / min(share, 1 - share))
    planned = config.planned_users or max(required, floor_users)
    power, each = joint_power(sigmas, planned, share, config)
    warnings = []
    if config.planned_users and config.planned_users < required:
        warnings.append(f"ab.planned_users = {config.planned_users:,} is below the {required:,} users the plan needs "
                        f"for {config.power:.0%} power: the power at that size is {power:.0%}")
    if floor_users > planned:
        warnings.append(f"ab.min_users_per_arm = {config.min_users_per_arm:,} needs {floor_users:,} users at a "
                        f"{share:.0%} split, more than the {planned:,} planned: the test cannot ship before that")
    days = None
    if reachable_users is not None:
        days = planned / reachable_users * config.max_days if reachable_users > 0 else math.inf
        if reachable_users < planned:
            reach_power = joint_power(sigmas, reachable_users, share, config, planned)[0] if reachable_users else 0.0
            warnings.append(f"traffic too low: about {reachable_users:,.0f} users reach the two arms within "
                            f"ab.max_days = {config.max_days:g}, the plan needs {planned:,}; the power by then is "
                            f"{reach_power:.0%} (raise the treatment share or max_days, or accept a larger "
                            "minimum_detectable_effect)")
    return Plan(planned_users=int(planned), required_users=required,
                users_per_arm={"control": round(planned * (1 - share)), "treatment": round(planned * share)},
                treatment_share=share, power=power, power_by_metric=each, binding=min(each, key=each.get),
                sigmas=sigmas, reachable_users=reachable_users, days_needed=days, warnings=warnings)


def fixed_horizon_users(mde: float, sigma: float, share: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The textbook size (both arms) of a single-look two-sided z-test, for comparison."""
    z = float(special.ndtri(1 - alpha / 2) + special.ndtri(power))
    return z * z * sigma * sigma / (mde * mde * share * (1 - share))
