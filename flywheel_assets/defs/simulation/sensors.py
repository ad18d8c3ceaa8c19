"""simulated_users: in demo mode, the base model once the cold start is in, then a simulated
day of usage every few minutes, so `make dev` turns by itself."""

import time

import dagster as dg

from flywheel_assets.defs.simulation.jobs import simulated_usage_job
from flywheel_assets.defs.training.jobs import base_model_job
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.defs.simulation.assets import SimulatedDay
from flywheel_assets.lib.simulation.daily import simulated_day
from flywheel_assets.lib.tables import TRAJECTORIES

# A run in any of these holds the next day back: queued ones included, so ticks never pile up.
IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


@dg.sensor(jobs=[simulated_usage_job, base_model_job], minimum_interval_seconds=60,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Demo mode only (the embedded default, simulation.enabled): without a champion, trains "
                       "base_model once the cold start is ingested; then every simulation.interval_minutes "
                       "of wall time after the previous simulated day ended, simulates the flywheel clock's day: "
                       "simulation.users_per_tick users routed by the registry, trajectories and events into the "
                       "landing zone; the clock then moves to the next midnight.")
def simulated_users(context: dg.SensorEvaluationContext, flywheel: FlywheelResource):
    config = flywheel.config()
    off = config.simulation_off()
    if off:
        return dg.SkipReason(f"simulated users are off: {off}")
    if flywheel.registry().champion() is None:
        return _base_model(context, flywheel)
    job = simulated_usage_job.name
    running = context.instance.get_runs(filters=dg.RunsFilter(job_name=job, statuses=IN_FLIGHT), limit=1)
    if running:
        return dg.SkipReason(f"the previous simulated day is still running (run {running[0].run_id}); one day at a time")
    last = context.instance.get_run_records(filters=dg.RunsFilter(job_name=job), limit=1)
    if last:
        ended = last[0].end_time or last[0].create_timestamp.timestamp()
        wait = config.simulation.interval_minutes * 60 - (time.time() - ended)
        if wait > 0:
            return dg.SkipReason(f"next simulated day in {wait:.0f} s (simulation.interval_minutes = "
                                 f"{config.simulation.interval_minutes:g})")
    day = simulated_day(flywheel.now()).date().isoformat()
    context.log.info(f"simulating {day} with {config.simulation.users_per_tick} users")
    return dg.RunRequest(
        job_name=job,
        run_config=dg.RunConfig(ops={"simulated_usage": SimulatedDay(day=day)}),
        tags={"flywheel/simulated_day": day, "flywheel/users": str(config.simulation.users_per_tick)},
    )


def _base_model(context: dg.SensorEvaluationContext, flywheel: FlywheelResource):
    """No champion: demo mode trains the embedded base itself, once, when the cold start is in."""
    if flywheel.lake().row_count(TRAJECTORIES) == 0:
        return dg.SkipReason("no champion yet: base_model starts once landing_sensor has ingested the cold start")
    last = context.instance.get_run_records(filters=dg.RunsFilter(job_name=base_model_job.name), limit=1)
    if last:
        run = last[0].dagster_run
        if run.status in IN_FLIGHT:
            return dg.SkipReason(f"no champion yet: base_model is training (run {run.run_id})")
        # a failed run is not retried in a loop; a successful one without a champion needs a look too
        return dg.SkipReason(f"no champion yet and base_model run {run.run_id} ended {run.status.value}: see its "
                             f"log, then materialize base_model")
    context.log.info("demo mode: no champion yet, training the embedded base model")
    return dg.RunRequest(job_name=base_model_job.name, tags={"flywheel/reason": "demo mode: no champion yet"})
