"""A/B sufficient statistics: `arm_stats` over a sessions table, against a polars reference.

Generates S sessions over U users with numpy (string user ids, arms from the real
`assign`, a quality score per session), then times the one grouped DuckDB query of
`arm_stats` and, in the same run on the same arrow table, the same two-level
aggregation written in polars. Checks that both give the same ArmStats and prints the
ratio. The best of --repeats runs counts, because other jobs share the machine.
Prints a results table and writes benchmarks/results/bench_ab-latest.json.

    .venv/bin/python benchmarks/bench_ab.py [--sessions 10000000] [--users 1000000] [--repeats 3] [--quick]

--quick checks that it works in a few seconds (10,000 sessions, 1,000 users, 1 repeat) and
writes its JSON to /tmp, never over a measured -latest.json.
The 2 s target is reported as ✓/✗ and never fails the run: wall-clock time is not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from common import machine, mark  # noqa: E402  (benchmarks/ is on sys.path)
from flywheel_assets.lib.experiments.ab import ArmStats, arm_stats, assign

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_ab-latest.json"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "bench_ab-quick.json"
QUICK = {"sessions": 10_000, "users": 1_000, "repeats": 1}
TARGET_S = 2.0
TARGET_SESSIONS = 10_000_000  # the target is for this many sessions; smaller runs are not judged


def sessions_table(sessions: int, users: int, seed: int) -> tuple[pa.Table, float]:
    """The sessions table and the seconds `assign` took for all users."""
    rng = np.random.default_rng(seed)
    user_ids = [f"user-{k:08d}" for k in range(users)]
    started = time.perf_counter()
    arms = [assign(user_id, "bench", 0.1) for user_id in user_ids]
    assign_s = time.perf_counter() - started
    owner = pa.array(rng.integers(0, users, size=sessions))
    user_effect = rng.normal(0.0, 0.3, size=users)
    quality = np.clip(0.5 + user_effect[owner.to_numpy()] + rng.normal(0.0, 0.4, size=sessions), -1.0, 1.0)
    table = pa.table({
        "user_id": pa.array(user_ids).take(owner),
        "arm": pa.array(arms).take(owner),
        "metric": quality,
    })
    return table, assign_s


def polars_reference(table: pa.Table) -> dict[str, ArmStats]:
    per_user = (pl.from_arrow(table).group_by("arm", "user_id")
                .agg(y=pl.col("metric").sum(), n=pl.len(), q=(pl.col("metric") ** 2).sum()))
    per_arm = per_user.group_by("arm").agg(
        users=pl.len(), sessions=pl.col("n").sum(), sum_y=pl.col("y").sum(), sum_y2=(pl.col("y") ** 2).sum(),
        sum_n2=(pl.col("n").cast(pl.Float64) ** 2).sum(), sum_yn=(pl.col("y") * pl.col("n")).sum(),
        sum_m2=pl.col("q").sum(), max_sessions=pl.col("n").max())
    return {row.pop("arm"): ArmStats(**row) for row in per_arm.to_dicts()}


def best_of(repeats: int, work) -> tuple[float, float, object]:
    """Best wall-clock seconds, the CPU seconds of that run (all threads), the result."""
    runs, result = [], None
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        result = work()
        runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    wall_s, cpu_s = min(runs)
    return wall_s, cpu_s, result


def same(a: ArmStats, b: ArmStats) -> bool:
    return all(math.isclose(getattr(a, k), getattr(b, k), rel_tol=1e-9) for k in a.__dataclass_fields__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"smallest sizes, to check the script ({QUICK}); JSON to {QUICK_RESULTS}")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)

    started = time.perf_counter()
    table, assign_s = sessions_table(args.sessions, args.users, args.seed)
    generation_s = time.perf_counter() - started
    print(f"generated {args.sessions:,} sessions over {args.users:,} users in {generation_s:.1f} s "
          f"(assign: {args.users / assign_s:,.0f} users/s); {os.cpu_count()} CPUs, duckdb {duckdb.__version__}")

    con = duckdb.connect()
    load_before = os.getloadavg()
    ours_s, ours_cpu, ours = best_of(args.repeats, lambda: arm_stats(table, "metric", con=con))
    reference_s, reference_cpu, reference = best_of(args.repeats, lambda: polars_reference(table))
    agree = all(same(ours[arm], reference[arm]) for arm in ("control", "treatment"))
    load_after = os.getloadavg()

    print()
    print(f"| what | best of {args.repeats} (s) | CPU s in that run | sessions/s | vs polars |")
    print("|---|---:|---:|---:|---:|")
    print(f"| arm_stats (one DuckDB query) | {ours_s:.2f} | {ours_cpu:.2f} | {args.sessions / ours_s:,.0f} | "
          f"{reference_s / ours_s:.2f}× |")
    print(f"| polars two-level group_by (reference) | {reference_s:.2f} | {reference_cpu:.2f} | "
          f"{args.sessions / reference_s:,.0f} | 1.00× |")
    print()
    for arm in ("control", "treatment"):
        s = ours[arm]
        print(f"{arm:9s} users {s.users:,} sessions {s.sessions:,} mean {s.mean:.4f}")
    print(f"results agree with the reference: {mark(agree)}")
    target_met = ours_s <= TARGET_S if args.sessions >= TARGET_SESSIONS else None
    verdict = "not judged at this size" if target_met is None else mark(target_met)
    print(f"target ≤ {TARGET_S:.0f} s for {TARGET_SESSIONS:,} sessions: {verdict} ({ours_s:.2f} s)")
    print(f"load average after the run: {load_after[0]:.1f} on {os.cpu_count()} CPUs "
          "(other jobs slow the wall clock; the CPU seconds are what the query itself costs)")

    results = {
        "sessions": args.sessions, "users": args.users, "repeats": args.repeats, "seed": args.seed,
        "generation_s": generation_s, "assign_users_per_s": args.users / assign_s,
        "arm_stats_s": ours_s, "arm_stats_cpu_s": ours_cpu, "arm_stats_sessions_per_s": args.sessions / ours_s,
        "polars_reference_s": reference_s, "polars_reference_cpu_s": reference_cpu,
        "ratio_polars_over_arm_stats": reference_s / ours_s, "agree": agree,
        "arms": {arm: {"users": ours[arm].users, "sessions": ours[arm].sessions, "mean": ours[arm].mean}
                 for arm in ("control", "treatment")},
        "target_s": TARGET_S, "target_sessions": TARGET_SESSIONS, "target_met": target_met,
        # Other work on the machine slows the wall clock; 1-minute load before and after the timed runs.
        "load_avg_1m": [round(load_before[0], 2), round(load_after[0], 2)],
        "machine": machine(duckdb=duckdb.__version__, polars=pl.__version__),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = QUICK_RESULTS if args.quick else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {path}")


if __name__ == "__main__":
    main()
