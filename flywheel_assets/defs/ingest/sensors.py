"""landing_sensor: new landing files start an ingest run, each file once."""

import hashlib
import json
import time
from datetime import datetime, timedelta, timezone

import dagster as dg

from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.defs.ingest.jobs import ingest_job
from flywheel_assets.defs.simulation.jobs import simulated_usage_job
from flywheel_assets.lib.ingest.landing import list_landing
from flywheel_assets.lib.ingest.pipeline import pending_files
from flywheel_assets.lib.ingest.remote_landing import remote_landing

@dg.sensor(job=ingest_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Starts ingest_job when ready files appear in the landing zone (in demo mode, once the "
                       "simulated day writing them has ended). The cursor is the newest file requested; the "
                       "ingested_files ledger guarantees no file is read twice.")
def landing_sensor(context: dg.SensorEvaluationContext, flywheel: FlywheelResource):
    cursor = json.loads(context.cursor) if context.cursor else {"mtime_ns": -1, "path": ""}
    high_water = (cursor["mtime_ns"], cursor["path"])
    config = flywheel.config()
    retry = _failed_ingest(context, cursor.get("retried"))
    if retry is not None and retry.end_time is not None and time.time() - retry.end_time < RETRY_AFTER_S:
        return dg.SkipReason(f"ingest run {retry.dagster_run.run_id} failed to ingest; its files are retried "
                             f"{RETRY_AFTER_S} s after it ended")
    # past the cursor first: the ledger is then read only for the files that may be new (after a
    # failed ingest, every file once: the ones it did not record are behind the cursor and still pending)
    fresh = [f for f in list_landing(config.landing) if retry is not None or (f.seen_at, f.relative) > high_water]
    local = {f.key for f in fresh}
    if (remote := remote_landing()) is not None:  # the landing bucket: every object the ledger lacks
        fresh += [found.file for found in remote.ready(config.landing) if found.file.key not in local]
    fresh = pending_files(config, flywheel.lake(), fresh)
    if not fresh:
        reason = f"no new ready file in {config.landing} (cursor {cursor})"
        if retry is None:
            return dg.SkipReason(reason)
        return dg.SensorResult(skip_reason=reason, cursor=json.dumps({**cursor, "retried": retry.dagster_run.run_id}))
    # demo mode: a simulated day (seconds long) is one ingest, not two halves; a run left STARTED for
    # an hour (its process killed) no longer holds ingestion up
    writing = context.instance.get_run_records(dg.RunsFilter(
        job_name=simulated_usage_job.name, statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
        created_after=datetime.now(timezone.utc) - timedelta(hours=1)), limit=1)
    if writing:
        return dg.SkipReason(f"{len(fresh)} new file(s), but simulated day run {writing[0].dagster_run.run_id} is "
                             "still writing to the landing zone: ingesting once it ends")
    # the cursor follows the local files only (an object's LastModified is the store's clock)
    newest = max((f for f in fresh if f.key in local), key=lambda f: (f.seen_at, f.relative), default=None)
    digest = hashlib.md5("\n".join(f"{f.relative}:{f.size_bytes}:{f.mtime_ns}" for f in fresh).encode()).hexdigest()
    tags = {"flywheel/files": str(len(fresh)), "flywheel/newest": (newest or fresh[-1]).relative}
    run_key = f"landing-{digest}"
    # "mtime_ns" holds the later of mtime and ctime (the name is kept for cursors already stored)
    seen, path = max((newest.seen_at, newest.relative), high_water) if newest else high_water
    next_cursor = {**cursor, "mtime_ns": seen, "path": path}
    if retry is not None:
        tags["flywheel/retry_of"] = next_cursor["retried"] = retry.dagster_run.run_id
        run_key += f"-retry-{retry.dagster_run.run_id}"
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=run_key, tags=tags)], cursor=json.dumps(next_cursor))


# After a failed ingest (a full disk, a write error), its files are requested again this long after it ended.
RETRY_AFTER_S = 300


def _failed_ingest(context: dg.SensorEvaluationContext, retried: str | None):
    """The latest ingest_job run, when its bronze_ingest step failed and no request has retried it yet
    (its unrecorded files are pending again). A failure of a later step (scoring) is not one."""
    latest = context.instance.get_run_records(dg.RunsFilter(job_name=ingest_job.name), limit=1)
    if not latest or latest[0].dagster_run.status != dg.DagsterRunStatus.FAILURE:
        return None
    run_id = latest[0].dagster_run.run_id
    if run_id == retried:
        return None
    steps = context.instance.get_run_step_stats(run_id, step_keys=["bronze_ingest"])
    if steps and steps[0].status.value == "SUCCESS":  # the ingest itself succeeded
        return None
    return latest[0]
