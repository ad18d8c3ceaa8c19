"""The lake's footprint over simulated days, without upkeep and after `lake_maintenance`.

Runs the embedded flywheel's days as `make demo` does — the simulated users' sessions land, the
landing sensor's ingest runs (bronze, scores, the teacher's corrections, curation: the tables
every ingest rewrites) — with no training cycle (the training trigger is not ticked: this
measures the data, not the models), in a home of its own. After each day it measures every table's data files
(count and bytes) as they are; every `--every` days (and on the last) it copies the lake and runs
lake_maintenance (lib/storage/maintenance.py) on the copy, and measures that. The simulated days
pass in minutes, so the copy is vacuumed with no retention: what a nightly run with its 24-hour
retention leaves once the day's files have aged. A second copy is maintained with the cold tier on
(lib/storage/tiers.py): the rows of the days more than `--cold-after` simulated days old move
to it (the cut-off is the wall clock when that day's ingest ended: rows age by ingested_at).

    .venv/bin/python benchmarks/bench_storage.py [--days 30] [--users 300] [--every 5] [--cold-after 7] [--quick]

Writes benchmarks/results/bench_storage-latest.json (--quick: 2 days, to /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from common import machine, print_rows  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_storage-latest.json"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "bench_storage-quick.json"


def footprints(lake) -> dict[str, tuple[int, int]]:
    """Per table, (files, bytes); a cold tier as `cold/<layer>/<name>`."""
    from flywheel_assets.lib.storage.maintenance import footprint
    from flywheel_assets.lib.tables import ALL_TABLES

    sizes = {f"{t.layer}/{t.name}": footprint(lake, t) for t in ALL_TABLES if lake.delta(t) is not None}
    return sizes | {f"cold/{t.layer}/{t.name}": footprint(lake, t, cold=True) for t in ALL_TABLES
                    if lake.cold(t) is not None}


def maintained(config, scratch: Path, cold_before=None) -> tuple[dict[str, tuple[int, int]], float]:
    """The lake's footprint after lake_maintenance, on a copy (the run goes on unmaintained);
    `cold_before`: the cold tier on, rows ingested before it moved there."""
    from flywheel_assets.lib.config import load_config
    from flywheel_assets.lib.lake import Lake
    from flywheel_assets.lib.storage.maintenance import maintain

    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(config.lake, scratch / "lake")
    copy = load_config(scratch, os.environ["FLYWHEEL_CONFIG"])
    lake = Lake(copy)
    started = time.monotonic()
    copy.maintenance.cold_after_days = None if cold_before is None else copy.maintenance.cold_after_days
    maintain(copy, lake, retention_hours=0, cold_before=cold_before)
    return footprints(lake), time.monotonic() - started


def total(sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    return sum(f for f, _ in sizes.values()), sum(b for _, b in sizes.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--users", type=int, default=300, help="simulated users a day (the demo's)")
    parser.add_argument("--every", type=int, default=5, help="measure the maintained copy every N days")
    parser.add_argument("--cold-after", type=int, default=7, help="simulated days before rows go cold")
    parser.add_argument("--quick", action="store_true", help="2 days, results to /tmp")
    args = parser.parse_args(argv)
    if args.quick:
        args.days, args.every, args.cold_after = 2, 1, 1
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    (work / "profile.json").write_text(json.dumps({"simulation": {"users_per_tick": args.users}}))
    os.environ.update(FLYWHEEL_HOME=str(work / "home"), FLYWHEEL_CONFIG=str(work / "profile.json"))
    os.environ.pop("DAGSTER_HOME", None)
    os.environ["FLYWHEEL_EXECUTOR"] = "in_process"  # an ephemeral instance: the runs stay in this process

    import dagster as dg

    from flywheel_assets.definitions import defs as load_defs
    from flywheel_assets.flywheel import START, _registry, ingest_landed, quiet_libraries, run_job
    from flywheel_assets.lib.clock import set_now
    from flywheel_assets.lib.config import load_config
    from flywheel_assets.lib.lake import Lake, utcnow
    from flywheel_assets.lib.simulation.daily import simulate_day
    from flywheel_assets.lib.training.pipeline import set_threads

    set_threads()
    quiet_libraries()
    config = load_config()
    lake, defs, instance = Lake(config), load_defs(), dg.DagsterInstance.ephemeral()
    started = time.monotonic()
    set_now(config, START)
    run_job(defs, instance, "bootstrap_job")
    ingest_landed(defs, instance)
    run_job(defs, instance, "base_model_job")
    days, ingested_until = [], {}
    for day in range(1, args.days + 1):
        counts = simulate_day(config, _registry(defs), START + timedelta(days=day))
        ingest_landed(defs, instance, ticks=1)
        ingested_until[day] = utcnow()
        raw = footprints(lake)
        row = {"day": day, "sessions": counts["sessions"], "raw": raw, "raw_total": total(raw)}
        if day % args.every == 0 or day == args.days:
            kept, seconds = maintained(config, work / "maintained")
            row.update(maintained=kept, maintained_total=total(kept), maintenance_s=round(seconds, 2))
            if day > args.cold_after:
                tiered, seconds = maintained(config, work / "tiered", cold_before=ingested_until[day - args.cold_after])
                row.update(tiered=tiered, tiered_total=total(tiered), tiered_s=round(seconds, 2))
        days.append(row)
        files, size = row["raw_total"]
        print(f"day {day:>2}: {counts['sessions']} sessions; lake {files} files {size / 1e6:.1f} MB"
              + (f"; maintained {row['maintained_total'][0]} files {row['maintained_total'][1] / 1e6:.1f} MB "
                 f"({row['maintenance_s']} s)" if "maintained" in row else "")
              + (f"; with the cold tier {row['tiered_total'][0]} files {row['tiered_total'][1] / 1e6:.1f} MB, of which "
                 f"cold {total({k: v for k, v in row['tiered'].items() if k.startswith('cold/')})[1] / 1e6:.1f} MB "
                 f"({row['tiered_s']} s)" if "tiered" in row else "")
              + f"  [{time.monotonic() - started:.0f} s]", flush=True)
    last = days[-1]
    tiered = last.get("tiered", {})

    def cell(sizes, name):
        files, size = sizes.get(name, (0, 0))
        return f"{files} files {size / 1e6:.2f} MB"

    names = sorted(set(last["raw"]) | set(tiered), key=lambda name: -max(last["raw"].get(name, (0, 0))[1],
                                                                          tiered.get(name, (0, 0))[1]))
    rows = [(name, cell(last["raw"], name), cell(last["maintained"], name), cell(tiered, name)) for name in names]
    rows.append(("all tables", cell({"": last["raw_total"]}, ""), cell({"": last["maintained_total"]}, ""),
                 cell({"": last.get("tiered_total", (0, 0))}, "")))
    print_rows(f"after {args.days} days ({args.users} users a day): no upkeep vs lake_maintenance vs with the cold tier "
               f"(rows older than {args.cold_after} days)", rows)
    result = {"machine": machine(), "days": args.days, "users_per_day": args.users, "every": args.every,
              "cold_after_days": args.cold_after,
              "seconds": round(time.monotonic() - started), "by_day": days}
    out = QUICK_RESULTS if args.quick else RESULTS
    out.write_text(json.dumps(result, indent=1))
    print(f"results: {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
