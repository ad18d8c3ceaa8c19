"""The seed's training trigger, exactly, with its performance check made real.

Order of the rules (75.5): too soon → no; too long → forced; performance drop →
emergency; enough new scored data of enough quality → yes; else not yet. The
cold-start phase (75.2) follows from the volume of real usage and picks the
thresholds: phase 0 trains only on cold-start data, phase 1 (500–2000 real
trajectories) trains weekly on small batches, phase 2 is the seed's defaults.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from flywheel_assets.lib.config import PhaseConfig
from flywheel_assets.lib.tenancy import SHARED, lane_of, lane_of_cycle


@dataclass(frozen=True)
class TriggerState:
    now: datetime
    last_training: datetime | None
    real_trajectories: int  # usage trajectories ever scored
    new_scored: int  # usage trajectories scored since the last training
    new_high_quality: int  # of those, combined_score ≥ the high-quality threshold
    performance_change: float | None  # relative change of the champion's rolling quality; None without data


def phase(real_trajectories: int, config: PhaseConfig) -> int:
    if real_trajectories >= config.phase2_min_real:
        return 2
    return 1 if real_trajectories >= config.phase1_min_real else 0


def should_train(state: TriggerState, phases: PhaseConfig) -> tuple[bool, str, int]:
    """(train?, why, phase)."""
    current = phase(state.real_trajectories, phases)
    if current == 0:
        return False, (f"{state.real_trajectories} real trajectories, training starts at "
                       f"{phases.phase1_min_real} (the cold-start base serves until then)"), 0
    config = phases.phase1 if current == 1 else phases.phase2
    days = (state.now - state.last_training).total_seconds() / 86400 if state.last_training else float("inf")
    if days < config.min_days_between_training:
        return False, f"only {days:.1f}d since last training (minimum {config.min_days_between_training:g}d)", current
    if days >= config.max_days_since_last_training:
        shown = "never trained" if state.last_training is None else f"{days:.1f}d since last training"
        return True, f"force trigger: {shown}", current
    if state.performance_change is not None and state.performance_change <= config.performance_degradation_threshold:
        return True, f"emergency: champion quality changed {state.performance_change:+.1%}", current
    rate = state.new_high_quality / state.new_scored if state.new_scored else 0.0
    if state.new_scored >= config.min_new_trajectories and rate >= config.min_high_quality_rate:
        return True, f"{state.new_scored} new trajectories ({rate:.1%} high quality)", current
    return False, (f"not yet: {state.new_scored} new (need {config.min_new_trajectories}), "
                   f"{rate:.1%} high quality (need {config.min_high_quality_rate:.0%})"), current


def retrain_requested(champion: dict, last_training: datetime | None) -> str | None:
    """Why a cycle must start now, whatever the rules say: the champion was put back by `flywheel
    forget` with the policy retrain (registry metadata retrain_after) and no cycle was made since."""
    after = json.loads(champion.get("metadata_json") or "{}").get("retrain_after")
    if after is None or (last_training is not None and last_training >= datetime.fromisoformat(after)):
        return None
    return f"retrain requested: {champion['version']} was put back after a forget request; retraining without the data"


def performance_change(daily_quality: list[tuple[datetime, float, int]], now: datetime, recent_days: float = 1,
                       baseline_days: float = 7, min_sessions: int = 30) -> float | None:
    """Relative change of the champion's mean session quality: the last `recent_days`
    against the `baseline_days` before them (session-weighted). None when either
    window has fewer than `min_sessions` sessions (an hour's handful is noise, not a
    drop) or the baseline mean is 0."""
    # `day` starts its bucket (an hour): one that starts exactly `recent_days` ago lies inside them
    recent = [(q, n) for day, q, n in daily_quality if 0 <= (now - day).total_seconds() / 86400 <= recent_days]
    base = [(q, n) for day, q, n in daily_quality
            if recent_days < (now - day).total_seconds() / 86400 <= recent_days + baseline_days]
    if sum(n for _, n in recent) < min_sessions or sum(n for _, n in base) < min_sessions:
        return None
    mean = lambda rows: sum(q * n for q, n in rows) / sum(n for _, n in rows)  # noqa: E731
    baseline = mean(base)
    return None if baseline == 0 else (mean(recent) - baseline) / abs(baseline)


def blocked_by(current: Sequence[dict], cycles: Sequence[str], simulation_off: str | None,
               lane: str = SHARED) -> str | None:
    """Why no cycle of `lane` may start whatever the rules say, or None: training_trigger's checks
    before them.

    current: the registry's latest row per version; cycles: the cycles made so far, oldest first;
    simulation_off: the configuration's reason simulated users are off (None in demo mode). One
    cycle at a time per lane (lib/tenancy.py): lanes train side by side."""
    if not any(row["status"] == "champion" and lane_of(row) == SHARED for row in current):
        return "no champion yet: " + ("materialize base_model first" if simulation_off
                                      else "simulated_users trains base_model once the cold start is ingested")
    registered = {row["version"] for row in current}
    if in_flight := [cycle for cycle in cycles if lane_of_cycle(cycle) == lane and f"{cycle}-lora" not in registered]:
        return f"cycle {in_flight[-1]} has no adapter yet; one cycle at a time"
    if testing := [row["version"] for row in current
                   if row["status"] in ("candidate", "canary", "treatment") and lane_of(row) == lane]:
        return (f"{testing[0]} is still being evaluated or A/B tested; one cycle at a time, so the next one "
                "trains over the winner")
    return None
