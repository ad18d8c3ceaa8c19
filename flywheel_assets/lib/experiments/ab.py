"""A/B decisions on user-randomized experiments: SHIP, ROLLBACK or CONTINUE.

The default policy, "sequential", fixes the seed's flaws: the user (not the session) is
the unit, the effect is the absolute difference treatment − control of the per-session
mean (CUPED-adjusted, heavy users capped), results may be looked at after every batch
because the interval is an anytime-valid confidence sequence, a sample-ratio mismatch
pauses shipping (never a rollback for clear harm or the time limit), and the seed's
min_samples and 14 days are enforced. The seed's own rule stays available as the
policy "classic" so that the two can be compared on the same data.

Statistics live in `ab_stats`; this module holds the rules and their report.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal


from flywheel_assets.lib.config import ABConfig
from flywheel_assets.lib.experiments.ab_stats import (
    ARMS,
    ArmStats,
    arm_stats,
    arm_stats_by_metric,
    confidence_sequence,
    ratio_estimate,
    session_t_test,
    srm_p_value,
    t_quantile,
    welch_difference,
)
from flywheel_assets.lib.experiments.power import PRIMARY, joint_power

__all__ = ["ABConfig", "ArmStats", "Decision", "GuardrailResult", "arm_stats", "arm_stats_by_metric", "assign",
           "decide", "effect_chart", "guardrail_check", "ratio_estimate", "report_markdown"]

Outcome = Literal["SHIP", "ROLLBACK", "CONTINUE"]


def assign(user_id: str, test_id: str, treatment_share: float) -> Literal["treatment", "control"]:
    """Sticky arm: the first 8 bytes of sha256(user_id:test_id) / 2**64 below the share."""
    digest = hashlib.sha256(f"{user_id}:{test_id}".encode()).digest()
    return "treatment" if int.from_bytes(digest[:8], "big") / 2**64 < treatment_share else "control"


@dataclass(frozen=True)
class GuardrailResult:
    """A bad-is-high metric (error-report rate, retry rate): treatment − control."""

    name: str
    effect: float
    interval: tuple[float, float]
    margin: float
    status: Literal["pass", "violated", "inconclusive"]


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str
    rule: str  # what decided: srm, min_users, negative, guardrail, ship, max_duration, inconclusive
    policy: str
    effect: float  # treatment − control, absolute
    interval: tuple[float, float]  # anytime-valid for "sequential", fixed-horizon for "classic"
    p_value: float  # fixed horizon, for information: Welch over users ("classic": Student over sessions)
    srm_p: float
    users: dict[str, int]
    sessions: dict[str, int]
    means: dict[str, float]
    guardrails: tuple[GuardrailResult, ...]
    elapsed_days: float
    looked_at: datetime
    minimum_effect: float
    alpha: float
    details: dict[str, float] = field(default_factory=dict)
    plan: dict[str, float] = field(default_factory=dict)  # planned vs observed users, power now and at the plan
    flags: tuple[str, ...] = ()  # srm, heavy_user, rejected_values: what a reader must know about the data

    def as_dict(self) -> dict:
        """JSON-ready (NaN becomes None, the time an ISO string)."""
        def clean(value):
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [clean(v) for v in value]
            return value.isoformat() if isinstance(value, datetime) else value
        return clean(asdict(self))


def decide(control: ArmStats, treatment: ArmStats, config: ABConfig | None = None, *, started_at: datetime,
           now: datetime, guardrails: Mapping[str, tuple[ArmStats, ArmStats]] | None = None) -> Decision:
    """The decision at one look. `guardrails` maps a name to (control, treatment) stats of
    a bad-is-high metric (error-report rate, retry rate).

    The sequential policy, in order, once both arms have min_users_per_arm users:
    clear harm rolls back (the interval below 0, or a guardrail's interval wholly above
    its margin), even under a sample-ratio mismatch; a mismatch then pauses shipping
    (CONTINUE, rule srm) until max_days, when it rolls back; SHIP needs the interval
    above 0, the estimate at least minimum_effect_to_ship and every guardrail's upper
    bound under its margin; after max_days anything short of that rolls back.
    """
    config = config or ABConfig()
    if config.policy == "classic":
        return _classic(control, treatment, config, started_at, now)
    planned = planned_users(config)
    diff = welch_difference(control, treatment, sigma_floor=config.sigma_floor, cuped=config.cuped)
    interval = confidence_sequence(diff, config.alpha, planned)
    pairs = dict(guardrails or {})
    checks = tuple(guardrail_check(name, *pair, config) for name, pair in pairs.items())
    srm_p = srm_p_value(control.users, treatment.users, config.treatment_share)
    flags = _flags(control, treatment, pairs, config, srm_p)
    details = {"se": diff.se, "df": diff.df, "raw_effect": diff.raw_effect, "theta": diff.theta,
               "variance_reduction": diff.variance_reduction,
               "top_user_share": max(control.top_user_share, treatment.top_user_share),
               "rejected": float(sum(c.rejected + t.rejected for c, t in [(control, treatment), *pairs.values()]))}
    progress = _progress(diff, pairs, config, planned)

    def result(outcome: Outcome, rule: str, reason: str) -> Decision:
        notes = [_FLAG_NOTES[flag].format(**details) for flag in flags if flag != "srm"]
        return _decision(outcome, rule, " ".join([reason, *notes]), config, control, treatment, diff.effect,
                         interval, diff.p_value, started_at, now, checks, details, progress, flags)

    elapsed = (now - started_at).total_seconds() / 86400
    expired = elapsed >= config.max_days
    level = f"{1 - config.alpha:.0%}"
    short = {arm: stats.users for arm, stats in zip(ARMS, (control, treatment))
             if stats.users < config.min_users_per_arm}
    if not short:
        if interval[1] < 0:
            return result("ROLLBACK", "negative", (
                f"Treatment is worse: the effect is {diff.effect:+.4f} and its anytime-valid {level} interval "
                f"[{interval[0]:+.4f}, {interval[1]:+.4f}] lies below 0."))
        violated = [g for g in checks if g.status == "violated"]
        if violated:
            return result("ROLLBACK", "guardrail", "Guardrail broken, treatment is worse beyond the margin on "
                          + "; ".join(f"{g.name} ({g.effect:+.4f}, interval [{g.interval[0]:+.4f}, "
                                      f"{g.interval[1]:+.4f}] above +{g.margin})" for g in violated) + ".")
    if "srm" in flags:
        mismatch = (f"sample-ratio mismatch: {control.users:,} control and {treatment.users:,} treatment users do "
                    f"not fit the planned {1 - config.treatment_share:.0%}/{config.treatment_share:.0%} split "
                    f"(χ² p = {srm_p:.1e})")
        if expired:
            return result("ROLLBACK", "max_duration", f"Rolled back after {config.max_days:g} days without a "
                          f"trustworthy result: {mismatch}.")
        return result("CONTINUE", "srm", f"SRM ALERT, shipping paused: {mismatch}; repair the assignment. Clear "
                      "harm or the time limit still end the test.")
    if short:
        have = " and ".join(f"{arm} has {users:,}" for arm, users in short.items())
        if expired:
            return result("ROLLBACK", "max_duration", f"Rolled back: no detectable improvement within "
                          f"{config.max_days:g} days; fewer than {config.min_users_per_arm:,} users per arm ({have}).")
        return result("CONTINUE", "min_users", f"Waiting for {config.min_users_per_arm:,} users per arm: {have}.")
    missing = []
    if not interval[0] > 0:
        missing.append(f"the {level} interval [{interval[0]:+.4f}, {interval[1]:+.4f}] still includes 0")
    if not diff.effect >= config.minimum_effect_to_ship:
        missing.append(f"the effect {diff.effect:+.4f} is below the minimum to ship of "
                       f"{config.minimum_effect_to_ship:+.4f}")
    missing += [f"{g.name} is not yet shown within +{g.margin} of control (upper bound {g.interval[1]:+.4f})"
                for g in checks if g.status != "pass"]
    if not missing:
        guarded = ", every guardrail within its margin" if checks else ""
        return result("SHIP", "ship", (
            f"Treatment is better: the effect is {diff.effect:+.4f}, anytime-valid {level} interval "
            f"[{interval[0]:+.4f}, {interval[1]:+.4f}]{guarded}."))
    if expired:
        return result("ROLLBACK", "max_duration",
                      f"Rolled back: no detectable improvement within {config.max_days:g} days; "
                      + "; ".join(missing) + ".")
    return result("CONTINUE", "inconclusive", "Keep collecting: " + "; ".join(missing) + ".")


_FLAG_NOTES = {
    "heavy_user": "Heavy user: one user holds {top_user_share:.1%} of an arm's sessions (their weight is capped).",
    "rejected_values": "{rejected:.0f} NaN or infinite metric values were rejected.",
}


def planned_users(config: ABConfig) -> int:
    """Where the confidence sequence is tuned: the plan's size, or without one the size at
    which the smaller arm reaches min_users_per_arm."""
    share = config.treatment_share
    return config.planned_users or math.ceil(config.min_users_per_arm / min(share, 1 - share))


def guardrail_check(name: str, control: ArmStats, treatment: ArmStats, config: ABConfig,
                    planned: int | None = None) -> GuardrailResult:
    """The one non-inferiority rule, for canary and A/B alike, on the anytime-valid
    interval of treatment − control: violated when it lies wholly above the margin (harm
    beyond it is shown), pass when wholly below it, inconclusive otherwise. A harm inside
    the margin is accepted by design: that is what the margin means."""
    diff = welch_difference(control, treatment, sigma_floor=config.sigma_floor, cuped=config.cuped)
    low, high = confidence_sequence(diff, config.alpha, planned or planned_users(config))
    margin = config.guardrail_margin
    status = "violated" if low > margin else "pass" if high < margin else "inconclusive"
    return GuardrailResult(name, diff.effect, (low, high), margin, status)


def _flags(control: ArmStats, treatment: ArmStats, guardrails: Mapping[str, tuple[ArmStats, ArmStats]],
           config: ABConfig, srm_p: float) -> tuple[str, ...]:
    flags = []
    if srm_p < config.srm_alpha:
        flags.append("srm")
    if max(control.top_user_share, treatment.top_user_share) > config.heavy_user_share:
        flags.append("heavy_user")
    if control.rejected + treatment.rejected or any(c.rejected + t.rejected for c, t in guardrails.values()):
        flags.append("rejected_values")
    return tuple(flags)


def _per_user_sigma(se: float, users: int, share: float) -> float:
    return se * math.sqrt(users * share * (1 - share)) if users and math.isfinite(se) else math.nan


def _progress(diff, guardrails: Mapping[str, tuple[ArmStats, ArmStats]], config: ABConfig,
              planned: int) -> dict[str, float]:
    """Planned vs observed users and the chance to ship a true minimum effect: at the plan's
    size and if the test ended now, from the σ (after CUPED and capping) seen so far."""
    users = diff.control.users + diff.treatment.users
    share = config.treatment_share
    sigmas = {PRIMARY: _per_user_sigma(diff.se, users, share)}
    for name, (control, treatment) in guardrails.items():
        pair = welch_difference(control, treatment, sigma_floor=config.sigma_floor, cuped=config.cuped)
        sigmas[name] = _per_user_sigma(pair.se, users, share)
    known = all(math.isfinite(sigma) for sigma in sigmas.values())
    return {"planned_users": planned, "observed_users": users,
            "planned_treatment": round(planned * share), "observed_treatment": diff.treatment.users,
            "power_at_plan": joint_power(sigmas, planned, share, config, planned)[0] if known else math.nan,
            "power_now": joint_power(sigmas, users, share, config, planned)[0] if known else math.nan}


def _classic(control: ArmStats, treatment: ArmStats, config: ABConfig, started_at: datetime,
             now: datetime) -> Decision:
    """The seed's rule, kept for comparison only: Student's t over sessions at every look,
    relative lift against the control mean (so its sign flips when that mean is negative)."""
    test = session_t_test(control, treatment)
    effect = test.treatment_mean - test.control_mean
    half_width = math.nan if math.isnan(test.se) else t_quantile(1 - config.alpha / 2, test.df) * test.se
    lift = effect / test.control_mean * 100 if test.control_mean else math.nan

    def result(outcome: Outcome, rule: str, reason: str) -> Decision:
        return _decision(outcome, rule, reason, config, control, treatment, effect,
                         (effect - half_width, effect + half_width), test.p_value, started_at, now, (),
                         {"se": test.se, "df": test.df, "relative_lift_pct": lift})

    if min(control.sessions, treatment.sessions) < config.classic_min_sessions:
        return result("CONTINUE", "min_sessions", f"Waiting for {config.classic_min_sessions} sessions per arm.")
    significant = test.p_value < config.alpha
    summary = f"session t-test p = {test.p_value:.4f}, relative lift {lift:+.2f}%"
    if significant and lift >= config.classic_min_lift_pct:
        return result("SHIP", "ship", f"Significant improvement: {summary}.")
    if significant and lift < 0:
        return result("ROLLBACK", "negative", f"Significant decline: {summary}.")
    return result("CONTINUE", "inconclusive", f"Not significant or too small: {summary}.")


def _decision(outcome: Outcome, rule: str, reason: str, config: ABConfig, control: ArmStats, treatment: ArmStats,
              effect: float, interval: tuple[float, float], p_value: float, started_at: datetime, now: datetime,
              checks: tuple[GuardrailResult, ...], details: dict[str, float], plan: dict | None = None,
              flags: tuple[str, ...] = ()) -> Decision:
    return Decision(
        outcome=outcome, reason=reason, rule=rule, policy=config.policy, effect=effect,
        interval=(float(interval[0]), float(interval[1])), p_value=p_value,
        srm_p=srm_p_value(control.users, treatment.users, config.treatment_share),
        users={"control": control.users, "treatment": treatment.users},
        sessions={"control": control.sessions, "treatment": treatment.sessions},
        means={"control": control.mean, "treatment": treatment.mean}, guardrails=checks,
        elapsed_days=(now - started_at).total_seconds() / 86400, looked_at=now,
        minimum_effect=config.minimum_effect_to_ship, alpha=config.alpha, details=details, plan=plan or {},
        flags=flags)


def _number(value: float, digits: int = 4, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _interval(interval: tuple[float, float]) -> str:
    return f"[{_number(interval[0], signed=True)}, {_number(interval[1], signed=True)}]"


def _p(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2e}" if value < 1e-4 else f"{value:.4f}"


def report_markdown(decision: Decision, history: list[Decision]) -> str:
    """The decision, its numbers per arm, the guardrails and every look, as markdown."""
    kind = "anytime-valid" if decision.policy == "sequential" else "fixed-horizon"
    level = f"{1 - decision.alpha:.0%}"
    lines = [
        f"**{decision.outcome}** ({decision.policy} policy, day {decision.elapsed_days:.1f}): {decision.reason}", "",
        "| | control | treatment |", "|---|---:|---:|",
        f"| users | {decision.users['control']:,} | {decision.users['treatment']:,} |",
        f"| sessions | {decision.sessions['control']:,} | {decision.sessions['treatment']:,} |",
        f"| mean per session | {_number(decision.means['control'])} | {_number(decision.means['treatment'])} |", "",
        "| statistic | value |", "|---|---|",
        f"| effect (treatment − control) | {_number(decision.effect, signed=True)} |",
        f"| {kind} {level} interval | {_interval(decision.interval)} |",
        f"| minimum effect to ship | {_number(decision.minimum_effect, signed=True)} |",
        f"| p-value (fixed horizon, information only) | {_p(decision.p_value)} |",
        f"| sample-ratio mismatch p-value | {_p(decision.srm_p)} |",
    ]
    if decision.details.get("variance_reduction") is not None and decision.policy == "sequential":
        lines.append(f"| variance reduction (CUPED) | {decision.details['variance_reduction']:.1%} |")
    if decision.plan:
        lines += plan_rows(decision.plan)
    if decision.flags:
        lines.append(f"| flags | {', '.join(decision.flags)} |")
    if decision.guardrails:
        lines += ["", "| guardrail | effect | interval | margin | status |", "|---|---:|---|---:|---|"]
        lines += [f"| {g.name} | {_number(g.effect, signed=True)} | {_interval(g.interval)} | +{g.margin} "
                  f"| {g.status} |"
                  for g in decision.guardrails]
    if history:
        lines += ["", "| look | day | users (control / treatment) | effect | interval | outcome |",
                  "|---:|---:|---|---:|---|---|"]
        lines += [f"| {k} | {d.elapsed_days:.1f} | {d.users['control']:,} / {d.users['treatment']:,} | "
                  f"{_number(d.effect, signed=True)} | {_interval(d.interval)} | {d.outcome} |"
                  for k, d in enumerate(history, start=1)]
    return "\n".join(lines) + "\n"


def plan_rows(plan: dict) -> list[str]:
    """Planned vs observed users and the power, as rows of a | statistic | value | table."""
    def power(value) -> str:
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.0%}"
    return [f"| users, observed / planned | {plan['observed_users']:,} / {plan['planned_users']:,} |",
            f"| treatment users, observed / planned | {plan['observed_treatment']:,} / {plan['planned_treatment']:,} |",
            f"| power at the plan / if it ended now | {power(plan.get('power_at_plan'))} / "
            f"{power(plan.get('power_now'))} |"]


def effect_chart(history: list[Decision], path: str | Path) -> Path:
    """A PNG of the effect and its interval at each look, with the 0 and minimum-effect lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("an effect chart needs at least one look")
    days = [d.elapsed_days for d in history]
    effects = [d.effect for d in history]
    below = [d.effect - d.interval[0] for d in history]
    above = [d.interval[1] - d.effect for d in history]
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    kind = "anytime-valid" if history[-1].policy == "sequential" else "fixed-horizon"
    axes.errorbar(days, effects, yerr=[below, above], fmt="o", capsize=3, color="tab:blue",
                  label=f"effect, {kind} {1 - history[-1].alpha:.0%} interval")
    axes.axhline(0, color="black", linewidth=1)
    axes.axhline(history[-1].minimum_effect, color="tab:green", linestyle="--", label="minimum effect to ship")
    axes.set_xlabel("days since start")
    axes.set_ylabel("treatment − control")
    axes.set_title(f"{history[-1].outcome} ({history[-1].policy} policy)")
    axes.legend(loc="best")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
