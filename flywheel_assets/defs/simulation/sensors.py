"""simulated_users: in demo mode, a simulated day of usage every few minutes, so `make dev` turns by itself."""

import time

import dagster as dg

from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.defs.simulation.assets import SimulatedDay
from flywheel_assets.lib.simulation.daily import simulated_day

simulated_usage_job = dg.define_asset_job(
    "simulated_usage_job", selection=dg.AssetSelection.assets("simulated_usage"),
    description="One simulated day of usage into the landing zone (demo mode); the flywheel clock moves past it.",
)

# A run in any of these holds the next day back: queued ones included, so ticks never pile up.
IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


@dg.sensor(job=simulated_usage_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Demo mode only (the embedded default, simulation.enabled): every simulation.interval_minutes "
                       "of wall time after the previous simulated day ended, simulates the flywheel clock's day: "
                       "simulation.users_per_tick users routed by the registry, trajectories and events into the "
                       "landing zone; the clock then moves to the next midnight.")
def simulated_users(context: dg.SensorEvaluationContext, flywheel: FlywheelResource):
    config = flywheel.config()
    off = config.simulation_off()
    if off:
        return dg.SkipReason(f"simulated users are off: {off}")
    if flywheel.registry().champion() is None:
        return dg.SkipReason("no champion yet: materialize base_model first")
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
        run_config=dg.RunConfig(ops={"simulated_usage": SimulatedDay(day=day)}),
        tags={"flywheel/simulated_day": day, "flywheel/users": str(config.simulation.users_per_tick)},
    )
