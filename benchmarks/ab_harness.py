"""The A/B policy's statistical proof at the shipped defaults: `make ab-harness`.

Runs lib/experiments/harness.py's data model (its own, not the usage simulator's) at the
rollout's split with the plan the rollout would make, 1,000 experiments per claim (fewer
where the answer is near certain), each looked at daily and stopped at its first
decision. Prints the table README shows and writes benchmarks/results/ab_harness.json.

    .venv/bin/python benchmarks/ab_harness.py [--experiments 1000] [--seed 15] [--quick]

--quick runs 24 experiments per setting and writes to /tmp, never over the measured JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from flywheel_assets.lib.config import ABConfig, RolloutConfig
from flywheel_assets.lib.experiments.harness import Setting, plan_for, run_setting

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ab_harness.json"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "ab_harness-quick.json"


def wilson(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a rate measured on n experiments."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help=f"24 experiments per setting; JSON to {QUICK_RESULTS}")
    args = parser.parse_args()
    if args.quick:
        args.experiments = 24
    defaults, split = ABConfig(), RolloutConfig().treatment_share
    plan = plan_for(defaults, split, args.seed)
    config = defaults.model_copy(update={"planned_users": plan.planned_users})
    uncapped = config.model_copy(update={"max_sessions_per_user": 10 ** 9})
    n = args.experiments
    effect = defaults.minimum_detectable_effect
    claims = [  # (setting, config, experiments, the claim's measure, its bound)
        (Setting("A/A, daily looks", 0.0, split), config, n, "ship", "≤ 5%"),
        (Setting(f"true effect = minimum ({effect:+g})", effect, split), config, n, "ship", "≥ 80%"),
        (Setting("A/A, one heavy user (10,000 sessions)", 0.0, split, heavy_users=1), config, n, "ship", "≤ 5%"),
        (Setting("A/A, one heavy user, cap off (before issue 15)", 0.0, split, heavy_users=1), uncapped,
         max(n // 2, 1), "ship", "(contrast)"),
        (Setting("A/A, 10% of treatment users lost", 0.0, split, treatment_loss=0.1), config, max(n // 5, 1),
         "srm_detected", "≥ 95%"),
    ]
    print(f"plan at the defaults (split {split:.0%}, minimum effect {effect:+g}, α {defaults.alpha}, power "
          f"{defaults.power:.0%}, guardrail margin {defaults.guardrail_margin}): {plan.planned_users:,} users, "
          f"{plan.users_per_arm['treatment']:,} treatment; bound by {plan.binding}; σ per user "
          + ", ".join(f"{k} {v:.3f}" for k, v in plan.sigmas.items()))
    rows = []
    started = time.perf_counter()
    for index, (setting, setting_config, experiments, measure, bound) in enumerate(claims):
        t = time.perf_counter()
        outcome = run_setting(setting, setting_config, plan.planned_users, experiments, args.seed + 1 + index)
        row = outcome.row()
        value = row[measure]
        row.update(measure=measure, value=value, interval=wilson(value, experiments), bound=bound,
                   seconds=round(time.perf_counter() - t, 1))
        rows.append(row)
        print(f"  {setting.name}: {measure} {value:.1%} [{row['interval'][0]:.1%}, {row['interval'][1]:.1%}] of "
              f"{experiments} (claim {bound}); ship {row['ship']:.1%}, rollback {row['rollback']:.1%}, median day "
              f"to ship {row['median_days_to_ship']}, CUPED variance reduction {row['variance_reduction']:.1%}, "
              f"heavy flagged {row['heavy_flagged']:.0%} ({row['seconds']} s)", flush=True)
    print("\n| setting | experiments | measured | 95% interval | claim | shipped | rolled back | CUPED var. red. |")
    print("|---|---:|---|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['setting']} | {row['experiments']:,} | {row['measure'].replace('_', ' ')} {row['value']:.1%} | "
              f"[{row['interval'][0]:.1%}, {row['interval'][1]:.1%}] | {row['bound']} | {row['ship']:.1%} | "
              f"{row['rollback']:.1%} | {row['variance_reduction']:.1%} |")
    out = QUICK_RESULTS if args.quick else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seed": args.seed, "experiments": n, "split": split, "plan": plan.as_dict(),
                               "config": config.model_dump(), "rows": rows,
                               "seconds": round(time.perf_counter() - started, 1)}, indent=2, default=str) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
