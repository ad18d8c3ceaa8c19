"""Sensor evaluation with 10k landing files and 100 cycles of history, against the 1 s target.

Builds (once, then reuses: --fresh after changing how tables are written) a
FLYWHEEL_HOME whose lake went through 100 training cycles (benchmarks/sensor_history.py
says what is in it and how it was written; about half an hour on 2 busy cores), then
evaluates each sensor the way the tests and `make flywheel` do, through
`dg.build_sensor_context` and a direct call, on the history's clock:

* landing_sensor with the cursor the daemon would hold (the last ingested file; the
  newest files are not ingested yet), without a cursor (as `make demo` calls it), and
  with a cursor past every file (nothing new);
* training_trigger, ab_monitor and regression_watch.

The first tick of each is timed on its own (the first Delta log and DuckDB work of the
process); the median of the next --ticks is the figure compared with the target. Every
tick's decision is recorded, so a faster sensor can be checked to decide the same.
ab_monitor looks at every tick and writes nothing (the run it requests, rollout_step,
acts): the figure is the decision's cost; its last results predate that change.
Prints a results table and writes benchmarks/results/bench_sensors-latest.json.

    .venv/bin/python benchmarks/bench_sensors.py [--home DIR] [--fresh] [--ticks 5]
        [--files 10000] [--cycles 100] [--profile SENSOR]

The target is reported as ✓/✗ and never fails the run: wall-clock time is not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import machine, mark, print_rows  # noqa: E402  (benchmarks/ is on sys.path)
from sensor_history import HistorySpec, load_or_generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_sensors-latest.json"
DEFAULT_HOME = Path(tempfile.gettempdir()) / "flywheel-bench-sensors"
TARGET_S = 1.0

# (label, sensor, cursor): "daemon" is the cursor after the last ingested file, "past" one past every file
SCENARIOS = (
    ("landing_sensor", "landing_sensor", "daemon"),
    ("landing_sensor (no cursor)", "landing_sensor", None),
    ("landing_sensor (nothing new)", "landing_sensor", "past"),
    ("training_trigger", "training_trigger", None),
    ("ab_monitor", "ab_monitor", None),
    ("regression_watch", "regression_watch", None),
)


def sensors() -> dict:
    from flywheel_assets.defs.automation.sensors import ab_monitor, regression_watch, training_trigger
    from flywheel_assets.defs.ingest.sensors import landing_sensor

    return {"landing_sensor": landing_sensor, "training_trigger": training_trigger, "ab_monitor": ab_monitor,
            "regression_watch": regression_watch}


def describe(result) -> str:
    """The sensor's decision as one line: what it skipped or what it asked for."""
    import dagster as dg

    if result is None:
        return "nothing"
    if isinstance(result, dg.SkipReason):
        return f"skip: {result.skip_message}"
    requests = result.run_requests if isinstance(result, dg.SensorResult) else list(result)
    parts = [f"run {r.partition_key or ''} {r.run_key} {json.dumps(dict(sorted(r.tags.items())))}" for r in requests]
    if isinstance(result, dg.SensorResult):
        if result.skip_reason:
            parts.append(f"skip: {result.skip_reason.skip_message}")
        parts += [f"add partitions {list(p.partition_keys)}" for p in result.dynamic_partitions_requests or []]
        if result.cursor:
            parts.append(f"cursor {result.cursor}")
    return "; ".join(parts)


def tick(sensor, instance, resources: dict, cursor: str | None) -> tuple[float, str]:
    import dagster as dg

    started = time.perf_counter()
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        result = sensor(context)
    return time.perf_counter() - started, describe(result)


def layout(home: Path) -> dict[str, dict]:
    """Each table's Delta version (commits − 1) and live data files: what a read has to open."""
    from flywheel_assets.lib.config import load_config
    from flywheel_assets.lib.lake import Lake
    from flywheel_assets.lib.tables import ALL_TABLES

    lake = Lake(load_config(home))
    out = {}
    for table in ALL_TABLES:
        dt = lake.delta(table)
        if dt is not None:
            out[f"{table.layer}/{table.name}"] = {"version": dt.version(), "files": len(dt.file_uris())}
    return out


def measure(home: Path, history: dict, ticks: int, profile: str | None) -> dict:
    import dagster as dg

    from flywheel_assets.defs.resources import FlywheelResource

    resources = {"flywheel": FlywheelResource(home=str(home))}
    instance = dg.DagsterInstance.local_temp(tempdir=str(home / "dagster"))
    cursors = {"daemon": history["cursor"], None: None,
               "past": json.dumps({"mtime_ns": 2**62, "path": ""})}
    found = sensors()
    runs = {}
    for label, name, cursor in SCENARIOS:
        first_s, first = tick(found[name], instance, resources, cursors[cursor])
        later = [tick(found[name], instance, resources, cursors[cursor]) for _ in range(ticks)]
        seconds = [s for s, _ in later]
        decisions = sorted({first, *(d for _, d in later)})
        runs[label] = {"first_s": first_s, "median_s": statistics.median(seconds), "min_s": min(seconds),
                       "max_s": max(seconds), "ticks_s": seconds, "decisions": decisions}
        print(f"  {label}: first {first_s:.3f} s, median {runs[label]['median_s']:.3f} s — {decisions[0][:150]}",
              flush=True)
    if profile:
        label, name, cursor = next(s for s in SCENARIOS if s[0] == profile)
        profiler = cProfile.Profile()
        profiler.runcall(tick, found[name], instance, resources, cursors[cursor])
        print(f"\nprofile of one {label} tick (cumulative):")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    return runs


def print_table(r: dict) -> None:
    rows = [("sensor", "first tick", f"median of {r['ticks']}", "min–max", f"target ≤ {TARGET_S:g} s", "decision")]
    for label, run in r["sensors"].items():
        same = "" if len(run["decisions"]) == 1 else f" ({len(run['decisions'])} different!)"
        rows.append((label, f"{run['first_s']:.3f} s", f"{run['median_s']:.3f} s",
                     f"{run['min_s']:.3f}–{run['max_s']:.3f}", mark(run["median_s"] <= TARGET_S),
                     run["decisions"][0][:90] + same))
    spec = r["history"]["spec"]
    print_rows(f"bench_sensors: {spec['files']:,} landing files ({spec['pending']} not ingested), {spec['cycles']} "
               f"cycles, {r['history']['trajectories']:,} trajectories on {r['machine']['cpu_count']} cores "
               f"(load {r['load_avg_1m'][0]:.1f} → {r['load_avg_1m'][1]:.1f})", rows)
    print_rows("Delta layout the sensors read", [("table", "version", "data files")] + [
        (name, f"{t['version']:,}", f"{t['files']:,}") for name, t in r["layout"].items()])


def versions() -> dict:
    import dagster
    import deltalake
    import duckdb

    return machine(dagster=dagster.__version__, deltalake=deltalake.__version__, duckdb=duckdb.__version__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME,
                        help=f"where the history lives (default {DEFAULT_HOME})")
    parser.add_argument("--fresh", action="store_true", help="delete --home first and generate the history again")
    parser.add_argument("--ticks", type=int, default=5, help="ticks per sensor after the first")
    parser.add_argument("--files", type=int, default=HistorySpec.files)
    parser.add_argument("--cycles", type=int, default=HistorySpec.cycles)
    parser.add_argument("--sessions-per-day", type=int, default=HistorySpec.sessions_per_day)
    parser.add_argument("--pending", type=int, default=HistorySpec.pending, help="landing files not ingested yet")
    parser.add_argument("--profile", choices=[s[0] for s in SCENARIOS], help="print a profile of one more tick")
    args = parser.parse_args(argv)
    if args.cycles < 2 or args.files < 2 * args.cycles * 4 or not 2 <= args.pending < args.files:
        parser.error("need --cycles ≥ 2, --files ≥ 8 per cycle, 2 ≤ --pending < --files")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    home = args.home.resolve()
    for name in ("FLYWHEEL_CONFIG", "FLYWHEEL_LAKE_URI", "FLYWHEEL_STORAGE_OPTIONS"):
        os.environ.pop(name, None)
    os.environ["FLYWHEEL_HOME"] = str(home)
    if args.fresh:
        shutil.rmtree(home, ignore_errors=True)
    spec = HistorySpec(files=args.files, cycles=args.cycles, sessions_per_day=args.sessions_per_day,
                       pending=args.pending)
    print(f"history in {home} (generated once, then reused; --fresh to redo)", flush=True)
    history = load_or_generate(home, spec)
    took = "" if history.get("generate_s") is None else f", generated in {history['generate_s']:.0f} s"
    print(f"history: {history['trajectories']:,} trajectories{took}", flush=True)
    load_before = os.getloadavg()[0]
    runs = measure(home, history, args.ticks, args.profile)
    results = {"ticks": args.ticks, "target_s": TARGET_S, "sensors": runs, "history": history,
               "layout": layout(home), "home": str(home), "load_avg_1m": [load_before, os.getloadavg()[0]],
               "machine": versions(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print_table(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nresults written to {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
