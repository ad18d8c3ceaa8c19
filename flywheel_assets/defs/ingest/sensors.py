"""landing_sensor: new landing files start an ingest run, each file once."""

import hashlib
import json
from datetime import datetime, timedelta, timezone

import dagster as dg

from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.defs.simulation.sensors import simulated_usage_job
from flywheel_assets.lib.ingest.landing import list_landing
from flywheel_assets.lib.ingest.pipeline import pending_files

# Ingest, then refresh everything scored from the bronze tables (not the per-cycle dataset).
ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.groups("ingest", "feedback") | dg.AssetSelection.assets("curated_trajectories"),
    description="Landing files → bronze → feedback scores → curated trajectories.",
)


@dg.sensor(job=ingest_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Starts ingest_job when ready files appear in the landing zone (in demo mode, once the "
                       "simulated day writing them has ended). The cursor is the newest file requested; the "
                       "ingested_files ledger guarantees no file is read twice.")
def landing_sensor(context: dg.SensorEvaluationContext, flywheel: FlywheelResource):
    cursor = json.loads(context.cursor) if context.cursor else {"mtime_ns": -1, "path": ""}
    high_water = (cursor["mtime_ns"], cursor["path"])
    config = flywheel.config()
    # past the cursor first: the ledger is then read only for the files that may be new
    fresh = [f for f in list_landing(config.landing) if (f.mtime_ns, f.relative) > high_water]
    fresh = pending_files(config, flywheel.lake(), fresh)
    if not fresh:
        return dg.SkipReason(f"no new ready file in {config.landing} (cursor {cursor})")
    # demo mode: a simulated day (seconds long) is one ingest, not two halves; a run left STARTED for
    # an hour (its process killed) no longer holds ingestion up
    writing = context.instance.get_run_records(dg.RunsFilter(
        job_name=simulated_usage_job.name, statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
        created_after=datetime.now(timezone.utc) - timedelta(hours=1)), limit=1)
    if writing:
        return dg.SkipReason(f"{len(fresh)} new file(s), but simulated day run {writing[0].dagster_run.run_id} is "
                             "still writing to the landing zone: ingesting once it ends")
    newest = max(fresh)
    digest = hashlib.md5("\n".join(f"{f.relative}:{f.size_bytes}:{f.mtime_ns}" for f in fresh).encode()).hexdigest()
    return dg.SensorResult(
        run_requests=[dg.RunRequest(
            run_key=f"landing-{digest}",
            tags={"flywheel/files": str(len(fresh)), "flywheel/newest": newest.relative},
        )],
        cursor=json.dumps({"mtime_ns": newest.mtime_ns, "path": newest.relative}),
    )
