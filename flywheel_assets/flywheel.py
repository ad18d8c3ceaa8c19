"""`make flywheel`: the closed loop on the embedded default, day by simulated day.

Each day: simulated users are routed by the registry to model versions and use them
(trajectories and events land through the logging client), then the sensors the
Dagster daemon would tick are evaluated in order — landing_sensor (ingest),
training_trigger (a new cycle: dataset → adapter → evaluation and gate), ab_monitor
(canary → A/B → promote or roll back), regression_watch — and the runs they request
are executed for real. The flywheel clock (FLYWHEEL_HOME/clock.json) moves a day each
time, so two weeks take minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timedelta, timezone

import dagster as dg

from flywheel_assets.demo import run_job, run_landing_sensor
from flywheel_assets.lib.clock import set_now
from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.simulation.seed import seed_demo_usage
from flywheel_assets.lib.simulation.users import UserSimulationConfig, simulate_usage
from flywheel_assets.lib.tables import AB_RESULTS, OFFLINE_EVALUATIONS
from flywheel_assets.lib.training.pipeline import load_for_inference

START = datetime(2026, 11, 1, tzinfo=timezone.utc)


def _tick(defs, instance, name: str) -> list[dg.RunRequest]:
    sensor = defs.resolve_sensor_def(name)
    with dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs) as context:
        result = sensor(context)
    if isinstance(result, dg.SkipReason):
        print(f"    {name}: {result.skip_message}")
        return []
    if isinstance(result, dg.SensorResult):
        for request in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return list(result.run_requests or [])
    return list(result or [])


def main(argv: list[str] | None = None) -> int:
    from flywheel_assets.definitions import defs as load_defs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=21)
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--cycles", type=int, default=3, help="stop after this many concluded cycles")
    args = parser.parse_args(argv)

    config = load_config()
    lake = Lake(config)
    defs = load_defs()
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    set_now(config, START)
    run_job(defs, instance, "bootstrap_job")
    seed_demo_usage(config)
    for request in run_landing_sensor(defs, instance):
        run_job(defs, instance, "ingest_job", tags=request.tags)
    run_job(defs, instance, "base_model_job")
    users = UserSimulationConfig(users=args.users, sessions_per_user=(1, 2), seed=1)
    cache: dict[str, tuple] = {}

    def load_version(version: str):
        if version not in cache:
            row = _registry(defs).get(version)
            adapter = config.home / row["adapter_path"] if row["adapter_path"] else None
            cache[version] = load_for_inference(config.home / row["base_path"], adapter, merged=True)
        return cache[version]

    for day in range(1, args.days + 1):
        today = START + timedelta(days=day)
        set_now(config, today + timedelta(hours=23))
        registry = _registry(defs)
        counts = simulate_usage(users, home=config.home, router=registry.router(), load_version=load_version,
                                day=today)
        print(f"day {day:>2} {today:%Y-%m-%d}: {counts['sessions']} sessions, {counts['trajectories']} trajectories, "
              f"first-attempt success {counts['first_attempt_success']}", flush=True)
        for request in run_landing_sensor(defs, instance):
            run_job(defs, instance, "ingest_job", tags=request.tags)
        for request in _tick(defs, instance, "training_trigger"):
            # a candidate blocked by the promotion gate fails its run; ab_monitor then retires it
            run_job(defs, instance, "cycle_job", partition_key=request.partition_key, tags=request.tags,
                    allow_failure=True)
        for request in _tick(defs, instance, "ab_monitor"):
            run_job(defs, instance, "ab_report_job", partition_key=request.partition_key)
        _tick(defs, instance, "regression_watch")
        if _concluded(lake) >= args.cycles:
            break
    print(cycle_table(lake))
    return 0


def _registry(defs):
    return defs.resources["flywheel"].registry()


def _concluded(lake: Lake) -> int:
    rows = lake.read(AB_RESULTS).to_pylist()
    gated = lake.read(OFFLINE_EVALUATIONS, filter_sql="role = 'candidate' AND scope = 'overall'").to_pylist()
    done = {r["cycle"] for r in rows if r["outcome"] in ("SHIP", "ROLLBACK")}
    return len(done | {g["cycle"] for g in gated if not g["gate_passed"]})


def cycle_table(lake: Lake) -> str:
    evaluations = lake.read(OFFLINE_EVALUATIONS, filter_sql="scope = 'overall'").to_pylist()
    looks = lake.read(AB_RESULTS).to_pylist()
    lines = ["", "| cycle | champion held-out | candidate held-out | gate | A/B effect [interval] | decision |",
             "|---|---:|---:|---|---|---|"]
    for cycle in sorted({e["cycle"] for e in evaluations}):
        rows = {e["role"]: e for e in evaluations if e["cycle"] == cycle}
        last = sorted((r for r in looks if r["cycle"] == cycle), key=lambda r: r["looked_at"])
        final = last[-1] if last else None
        effect = (f"{final['effect']:+.3f} [{final['effect_low']:+.3f}, {final['effect_high']:+.3f}]"
                  if final and final["effect"] is not None else "")
        lines.append(f"| {cycle} | {rows['champion']['success']:.1%} | {rows['candidate']['success']:.1%} | "
                     f"{'pass' if rows['candidate']['gate_passed'] else 'BLOCK'} | {effect} | "
                     f"{final['outcome'] + ': ' + final['reason'] if final else 'no look yet'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
