"""`make demo`: the flywheel on the embedded default, headless, through real Dagster runs.

Runs are recorded in DAGSTER_HOME (FLYWHEEL_HOME/dagster by default), so `make dev`
afterwards shows them in the UI.
"""

from __future__ import annotations

import json
import os
import sys

import dagster as dg
import duckdb

from flywheel_assets.lib.config import FlywheelConfig, load_config
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.simulation.seed import seed_demo_usage
from flywheel_assets.lib.tables import ALL_TABLES, DATASET_MANIFESTS, OFFLINE_EVALUATIONS, QUARANTINE, TRAJECTORY_SCORES


def run_landing_sensor(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[dg.RunRequest]:
    """Evaluate landing_sensor as the daemon would. Without a cursor it still requests
    nothing twice: it only sees files missing from the ingested_files ledger."""
    sensor = defs.resolve_sensor_def("landing_sensor")
    with dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs) as context:
        result = sensor.evaluate_tick(context)
    return list(result.run_requests or [])


def run_job(defs: dg.Definitions, instance: dg.DagsterInstance, name: str, *, allow_failure: bool = False,
            **kwargs) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def(name).execute_in_process(instance=instance, raise_on_error=False, **kwargs)
    label = f"{name}[{kwargs['partition_key']}]" if "partition_key" in kwargs else name
    print(f"{label} run {result.run_id}: {'success' if result.success else 'FAILED'}", flush=True)
    if not result.success and not allow_failure:
        raise SystemExit(f"{label} failed; see the run in the UI (make dev) for the step that broke")
    return result


def summary(config: FlywheelConfig) -> str:
    lake = Lake(config)
    lines = ["", "Flywheel demo — data half", "", "rows per table:"]
    lines += [f"  {t.layer}/{t.name:<24} {lake.row_count(t):>8}" for t in ALL_TABLES]
    con = duckdb.connect()
    lake.register(con, QUARANTINE)
    lines += ["", "quarantined lines by reason:"]
    for kind, reason, count in con.execute(
            "SELECT kind, reason_code, count(*) FROM quarantine GROUP BY ALL ORDER BY 1, 3 DESC").fetchall():
        lines.append(f"  {kind:<13} {reason:<16} {count:>6}")
    lake.register(con, TRAJECTORY_SCORES)
    lines += ["", "tier mix (all scored trajectories):"]
    for tier, count, mean in con.execute(
            "SELECT tier, count(*), avg(combined_score) FROM trajectory_scores GROUP BY tier ORDER BY 3 DESC").fetchall():
        lines.append(f"  {tier:<9} {count:>6}  mean score {mean:+.3f}")
    lines += ["", "training datasets:"]
    for row in lake.read(DATASET_MANIFESTS).to_pylist():
        lines.append(f"  {row['cycle']}: {row['n_rows']} rows {json.loads(row['tier_counts_json'])} -> {row['export_path']}")
    lines += ["", "held-out success (600 tasks, 95% interval):"]
    evaluations = lake.read(OFFLINE_EVALUATIONS, filter_sql="scope = 'overall'").to_pylist()
    for row in sorted(evaluations, key=lambda r: (r["cycle"], r["role"] != "champion")):
        gate = f"  gate: {'PASS' if row['gate_passed'] else 'BLOCK'} ({row['gate_reason']})" if row["role"] == "candidate" else ""
        lines.append(f"  {row['cycle']} {row['role']:<9} {row['version']:<22} {row['success']:6.1%} "
                     f"[{row['success_low']:.1%}, {row['success_high']:.1%}]{gate}")
    return "\n".join(lines)


def main() -> int:
    from flywheel_assets.definitions import defs as load_defs

    config = load_config()
    defs = load_defs()
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    run_job(defs, instance, "bootstrap_job")
    copied = seed_demo_usage(config)
    print(f"demo agents dropped {len(copied)} usage files into {config.landing}")
    requests = run_landing_sensor(defs, instance)
    print(f"landing_sensor requested {len(requests)} run(s)")
    for request in requests:
        run_job(defs, instance, "ingest_job", tags=request.tags)
    run_job(defs, instance, "base_model_job")
    cycle = "cycle-0001"
    instance.add_dynamic_partitions("cycle", [cycle])
    run_job(defs, instance, "cycle_job", partition_key=cycle)
    print(summary(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
