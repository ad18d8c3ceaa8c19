"""`make demo`: the closed loop on the embedded default, day by simulated day.

Phase 0 first: golden and teacher trajectories and the demo agents' usage log (with
malformed lines among it) are ingested, and the base model is pretrained. Then each day
simulated users are routed by the registry to model versions and use them (trajectories
and events land through the logging client), and the sensors the Dagster daemon would
tick are evaluated in order — landing_sensor (ingest, scoring, curation, teacher
corrections), training_trigger (a new cycle: dataset → adapter → evaluation and gate),
ab_monitor (canary → A/B → promote or roll back), regression_watch — and the runs they
request are executed for real. The flywheel clock (FLYWHEEL_HOME/clock.json) moves a day
each time, so weeks take minutes. At the end the comparison arms (control, equal teacher
budget, the loop without its teacher) train as many cycles as the champion did, and every
arm is measured on the held-out set (lib/evaluation/comparison.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import duckdb

from flywheel_assets.defs.partitions import cycle_partitions
from flywheel_assets.defs.resources import executor_name
from flywheel_assets.lib.clock import set_now
from flywheel_assets.lib.config import FlywheelConfig, load_config
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.simulation.seed import seed_demo_usage
from flywheel_assets.lib.simulation.daily import simulate_day
from flywheel_assets.lib.storage.artifacts import artifact_store, publish
from flywheel_assets.lib.tables import (
    AB_RESULTS, ALL_TABLES, DATASET_MANIFESTS, MODEL_REGISTRY, OFFLINE_EVALUATIONS, QUARANTINE, TRAJECTORIES,
    TRAINING_DATASET, TRAJECTORY_SCORES,
)
from flywheel_assets.lib.training.pipeline import set_threads

START = datetime(2026, 11, 1, tzinfo=timezone.utc)


def run_landing_sensor(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[dg.RunRequest]:
    """Evaluate landing_sensor as the daemon would. Without a cursor it still requests
    nothing twice: it only sees files missing from the ingested_files ledger."""
    sensor = defs.resolve_sensor_def("landing_sensor")
    with dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs) as context:
        result = sensor.evaluate_tick(context)
    return list(result.run_requests or [])


# The run's own log in the terminal at INFO (progress, counts, decisions); the step events
# Dagster logs at DEBUG stay in the run's event log, seen in the UI.
QUIET_RUN = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def run_job(defs: dg.Definitions, instance: dg.DagsterInstance, name: str, *, allow_failure: bool = False,
            **kwargs) -> dg.ExecuteInProcessResult | dg.JobExecutionResult:
    kwargs.setdefault("run_config", QUIET_RUN)
    if executor_name() == "in_process":
        result = defs.resolve_job_def(name).execute_in_process(instance=instance, raise_on_error=False, **kwargs)
    else:  # the job's own executor (README: Scaling out): its steps are rebuilt in their processes
        tags = {**kwargs.get("tags", {}),
                **({"dagster/partition": kwargs["partition_key"]} if "partition_key" in kwargs else {})}
        result = dg.execute_job(dg.build_reconstructable_job("flywheel_assets.definitions", "job", (name,)),
                                instance, run_config=kwargs["run_config"], tags=tags, raise_on_error=False)
    label = f"{name}[{kwargs['partition_key']}]" if "partition_key" in kwargs else name
    print(f"    {label} run {result.run_id[:8]}: {'success' if result.success else 'FAILED'}", flush=True)
    if not result.success and not allow_failure:
        raise SystemExit(f"{label} failed; see the run in the UI (make dev) for the step that broke")
    return result


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


def ingest_landed(defs, instance, ticks: int = 3) -> None:
    """Tick landing_sensor up to `ticks` times, until nothing new is left: an ingest run
    lands the day's teacher corrections, which the next tick ingests, as the daemon's next
    tick would. A simulated day ticks once: its corrections are ingested with the next
    day's usage (a whole ingest_job run, re-scoring everything, for one file a day cost
    70 s of a 16-minute demo)."""
    for _ in range(ticks):
        requests = run_landing_sensor(defs, instance)
        for request in requests:
            run_job(defs, instance, "ingest_job", tags=request.tags)
        if not requests:
            break


def main(argv: list[str] | None = None) -> int:
    from flywheel_assets.definitions import defs as load_defs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30, help="simulated days at most")
    parser.add_argument("--users", type=int, help="simulated users a day (default: simulation.users_per_tick)")
    parser.add_argument("--cycles", type=int, default=3, help="stop after this many concluded cycles")
    parser.add_argument("--no-arms", "--no-control", dest="no_arms", action="store_true",
                        help="skip training the comparison arms at the end (base, champion and latest only)")
    parser.add_argument("--seed", type=int, default=0,
                        help="add this to every seed of the run (cold start, base model, users, corrections, "
                             "selection, LoRA); the held-out tasks stay the same (make demo-seeds)")
    parser.add_argument("--report-only", action="store_true",
                        help="no new days: print the cycle table and the comparison for the home as it is")
    parser.add_argument("--fresh", action="store_true",
                        help="start from an empty FLYWHEEL_HOME (deletes its landing zone, lake, models, datasets)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    set_threads()
    quiet_libraries()
    config = load_config()
    if args.seed:
        os.environ["FLYWHEEL_CONFIG"] = str(seeded_profile(config, args.seed))  # every run loads it from there
        config = load_config()
    if args.fresh:
        clear_home(config)
    lake = Lake(config)
    defs = load_defs()
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    if args.fresh:
        forget_cycles(instance)
    if args.report_only:
        return report(config, lake, defs, args.no_arms, started)
    set_now(config, START)
    print(f"phase 0 — {START:%Y-%m-%d}: cold start, the demo agents' usage log, the base model", flush=True)
    run_job(defs, instance, "bootstrap_job")
    if config.domain.name == "builtin":  # the shipped usage log is the built-in world's
        seed_demo_usage(config)
    ingest_landed(defs, instance)
    print(data_summary(config, lake), flush=True)
    run_job(defs, instance, "base_model_job")
    if args.users:
        config.simulation.users_per_tick = args.users
    for day in range(1, args.days + 1):
        today = START + timedelta(days=day)
        counts = simulate_day(config, _registry(defs), today)  # the clock then moves to the day's end
        success = ", ".join(f"{v} {s:.0%}" for v, s in counts["first_attempt_success"].items())
        print(f"day {day:>2} {today:%Y-%m-%d}: {counts['sessions']} sessions, {counts['trajectories']} "
              f"trajectories, first-attempt success {success}  [{time.monotonic() - started:.0f} s]", flush=True)
        ingest_landed(defs, instance, ticks=1)
        for request in _tick(defs, instance, "training_trigger"):
            # a candidate blocked by the promotion gate fails its run; ab_monitor then retires it
            run_job(defs, instance, "cycle_job", partition_key=request.partition_key, tags=request.tags,
                    allow_failure=True)
        for request in _tick(defs, instance, "ab_monitor"):
            run_job(defs, instance, "ab_report_job", partition_key=request.partition_key)
        for request in _tick(defs, instance, "regression_watch"):
            run_job(defs, instance, "regression_rollback_job", run_config={**QUIET_RUN, **request.run_config},
                    tags=request.tags)
        if len(concluded_cycles(lake)) >= args.cycles:
            break
    ingest_landed(defs, instance)  # the last day's corrections, so the tables are complete
    run_job(defs, instance, "daily_refresh_job")  # the daily schedule's run: scores, velocity, loop health, charts
    return report(config, lake, defs, args.no_arms, started)


def quiet_libraries() -> None:
    """No per-load progress bars or library deprecation notices between the demo's lines."""
    import warnings

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*", category=UserWarning)


def report(config: FlywheelConfig, lake: Lake, defs, no_arms: bool, started: float) -> int:
    print(cycle_table(config, lake))
    print(final_comparison(config, lake, defs, arms=not no_arms))
    print(f"\nwall time {time.monotonic() - started:.0f} s; runs and assets: make dev → http://127.0.0.1:3000")
    return 0


SEEDED_SECTIONS = ("cold_start", "corrections", "base_model", "lora", "curation", "simulation")


def seeded_profile(config: FlywheelConfig, offset: int) -> Path:
    """The profile in use with every seed moved by `offset`, as FLYWHEEL_HOME/profile-seed-N.json."""
    path = os.environ.get("FLYWHEEL_CONFIG")
    raw = json.loads(Path(path).read_text()) if path else {}
    for section in SEEDED_SECTIONS:
        raw.setdefault(section, {})["seed"] = getattr(config, section).seed + offset
    target = config.home / f"profile-seed-{offset}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(raw, indent=2))
    return target


def forget_cycles(instance) -> list[str]:
    """Delete the `cycle` partitions of an earlier run: they live in the Dagster instance, not in
    FLYWHEEL_HOME, and without their adapters the trigger would wait for them forever."""
    cycles = list(instance.get_dynamic_partitions(cycle_partitions.name))
    for cycle in cycles:
        instance.delete_dynamic_partition(cycle_partitions.name, cycle)
    return cycles


def clear_home(config: FlywheelConfig) -> None:
    """The demo replays its calendar from day 0, so it starts from an empty home."""
    for folder in (config.landing, config.lake, config.models, config.datasets, config.home / "reports"):
        shutil.rmtree(folder, ignore_errors=True)
    if (store := artifact_store(config.home)) is not None:  # an earlier run's adapters would be read back
        for folder in (config.models, config.datasets, config.reports):
            store.delete(folder)
    (config.home / "clock.json").unlink(missing_ok=True)


def data_summary(config: FlywheelConfig, lake: Lake) -> str:
    """The data half after phase 0: rows per table, quarantined lines by reason, the tier mix."""
    con = duckdb.connect()
    lines = ["", "rows per table:"]
    lines += [f"  {t.layer}/{t.name:<24} {lake.row_count(t):>8}" for t in ALL_TABLES]
    lake.register(con, QUARANTINE)
    lines += ["", "quarantined lines by reason (nothing is dropped):"]
    for kind, reason, count in con.execute(
            "SELECT kind, reason_code, count(*) FROM quarantine GROUP BY ALL ORDER BY 1, 3 DESC").fetchall():
        lines.append(f"  {kind:<13} {reason:<16} {count:>6}")
    lake.register(con, TRAJECTORY_SCORES)
    lines += ["", "tier mix (all scored trajectories):"]
    for tier, count, mean in con.execute(
            "SELECT tier, count(*), avg(combined_score) FROM trajectory_scores GROUP BY tier ORDER BY 3 DESC").fetchall():
        lines.append(f"  {tier:<9} {count:>6}  mean score {mean:+.3f}")
    return "\n".join(lines) + "\n"


def _registry(defs):
    return defs.resources["flywheel"].registry()


def concluded_cycles(lake: Lake) -> list[str]:
    """Cycles whose candidate was decided: shipped or rolled back by the A/B test, or blocked by the gate."""
    done = {r["cycle"] for r in lake.read(AB_RESULTS, columns=["cycle", "outcome"]).to_pylist()
            if r["outcome"] in ("SHIP", "ROLLBACK")}
    gated = lake.read(OFFLINE_EVALUATIONS, filter_sql="role = 'candidate' AND scope = 'overall'").to_pylist()
    return sorted(done | {g["cycle"] for g in gated if not g["gate_passed"]})


def cycle_table(config: FlywheelConfig, lake: Lake) -> str:
    """One line per cycle: what it was trained on, how it did offline and online, what became of it."""
    con = duckdb.connect()
    con.register("manifests", lake.read(DATASET_MANIFESTS, columns=["cycle", "created_at", "n_rows", "tier_counts_json"]))
    con.register("trajectories", lake.read(TRAJECTORIES, columns=["trajectory_id", "origin", "created_at"]))
    con.register("scores", lake.read(TRAJECTORY_SCORES, columns=["trajectory_id", "combined_score"]))
    per_cycle = con.execute("""
        WITH bounds AS (
            SELECT cycle, n_rows, tier_counts_json, created_at AS until,
                   coalesce(lag(created_at) OVER (ORDER BY created_at), TIMESTAMPTZ '1970-01-01') AS since
            FROM manifests)
        SELECT b.cycle, b.n_rows, b.tier_counts_json, count(t.trajectory_id) AS usage,
               avg(CASE WHEN s.combined_score >= $high THEN 1.0 ELSE 0.0 END) AS high_quality,
               count(*) FILTER (WHERE t.origin = 'correction') AS corrections
        FROM bounds b LEFT JOIN trajectories t
          ON t.created_at > b.since AND t.created_at <= b.until AND t.origin IN ('usage', 'correction')
        LEFT JOIN scores s USING (trajectory_id)
        GROUP BY ALL ORDER BY b.cycle
    """, {"high": config.curation.high_quality_threshold}).fetchall()
    evaluations = lake.read(OFFLINE_EVALUATIONS, filter_sql="scope = 'overall'").to_pylist()
    looks = lake.read(AB_RESULTS).to_pylist()
    history = lake.read(MODEL_REGISTRY, columns=["version", "status", "cycle"]).to_pylist()
    con.register("dataset", lake.read(TRAINING_DATASET, columns=["cycle", "trajectory_id"]))
    in_dataset = dict(con.execute("""
        SELECT d.cycle, count(*) FROM dataset d JOIN trajectories t USING (trajectory_id)
        WHERE t.origin = 'correction' GROUP BY ALL
    """).fetchall())
    lines = ["", "| cycle | usage trajectories (high-quality) | teacher corrections made (in the dataset, "
                 "all so far) | dataset tier mix | champion held-out | candidate held-out | gate | "
                 "A/B effect [anytime-valid interval] | decision | champion after |",
             "|---|---:|---:|---|---:|---:|---|---|---|---|"]
    for cycle, n_rows, tiers, usage, high, corrections in per_cycle:
        rows = {e["role"]: e for e in evaluations if e["cycle"] == cycle}
        if "candidate" not in rows:
            continue
        latest = max((r for r in looks if r["cycle"] == cycle), key=lambda r: r["looked_at"], default=None)
        final = max((r for r in looks if r["cycle"] == cycle and r["stage"] == "treatment"),
                    key=lambda r: r["looked_at"], default=None)
        effect = (f"{final['effect']:+.3f} [{final['effect_low']:+.3f}, {final['effect_high']:+.3f}]"
                  if final and final["effect"] is not None else "—")
        if not rows["candidate"]["gate_passed"]:
            decision = "blocked by the gate"
        elif latest is None or (latest["stage"], latest["outcome"]) == ("gate", "PROCEED"):
            decision = "waiting for its canary"
        else:
            decision = f"{latest['stage']} {latest['outcome']}: {latest['reason']}"
        promoted = f"{cycle}-lora" if any(h["version"] == f"{cycle}-lora" and h["status"] == "champion"
                                          for h in history) else rows["champion"]["version"]
        mix = ", ".join(f"{k} {v}" for k, v in json.loads(tiers).items())
        lines.append(f"| {cycle} | {usage} ({(high or 0):.0%}) | {corrections} ({in_dataset.get(cycle, 0)}) | {mix} | "
                     f"{rows['champion']['success']:.1%} | {rows['candidate']['success']:.1%} | "
                     f"{'pass' if rows['candidate']['gate_passed'] else 'BLOCK'} | {effect} | {decision} | {promoted} |")
    return "\n".join(lines)


def final_comparison(config: FlywheelConfig, lake: Lake, defs, arms: bool = True) -> str:
    """Base, the comparison arms (unless arms is False), champion and latest on the held-out tasks
    (lib/evaluation/comparison.py); also written to reports/flywheel_demo.md."""
    from flywheel_assets.lib.evaluation.comparison import compare

    print("\nthe comparison arms, then every arm on the held-out tasks", flush=True)
    report, numbers = compare(config, lake, _registry(defs), train_arms=arms)
    reports = config.home / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "flywheel_demo.md").write_text(cycle_table(config, lake) + "\n\n" + report + "\n")
    (reports / "flywheel_demo.json").write_text(json.dumps(numbers, indent=2))
    publish(config.home, reports / "flywheel_demo.md", reports / "flywheel_demo.json")
    return "\n" + report

if __name__ == "__main__":
    sys.exit(main())
