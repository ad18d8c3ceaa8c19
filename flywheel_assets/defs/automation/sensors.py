"""training_trigger: the seed's rules decide when a new cycle starts; the daily refresh schedule."""

import dagster as dg

from flywheel_assets.defs.automation.jobs import daily_refresh_job, regression_rollback_job
from flywheel_assets.defs.experiments.jobs import ab_report_job
from flywheel_assets.defs.training.jobs import cycle_job
from flywheel_assets.defs.partitions import cycle_partitions
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.automation.regression import check_regression
from flywheel_assets.lib.automation.state import trigger_state
from flywheel_assets.lib.automation.trigger import blocked_by, retrain_requested, should_train
from flywheel_assets.lib.experiments.rollout import advance
from flywheel_assets.lib.tenancy import SHARED, next_cycle


@dg.sensor(job=cycle_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Starts a training cycle (dataset → adapter → evaluation) when the seed's trigger rules say "
                       "so, in every lane (the shared one, and each isolated or hybrid tenant's); every evaluation "
                       "logs its decision and reason.")
def training_trigger(context: dg.SensorEvaluationContext, flywheel: FlywheelResource):
    config = flywheel.config()
    registry = flywheel.registry()
    current = registry.current()  # one read of the registry for every question below
    lake, now = flywheel.lake(), flywheel.now()
    existing = context.instance.get_dynamic_partitions(cycle_partitions.name)
    requests, waits = [], []
    for lane in config.tenancy.lanes():
        name = f"lane {lane}: " if lane != SHARED else ""
        if blocked := blocked_by(current, existing, config.simulation_off(), lane):
            waits.append(name + blocked)
            continue
        champion = registry.lane_champion(lane, current)
        state = trigger_state(config, lake, now, champion["version"], champion["changed_at"], lane)
        train, reason, phase = should_train(state, config.trigger)
        if not train and (retrain := retrain_requested(champion, state.last_training)):
            train, reason = True, retrain
        context.log.info(f"{name}phase {phase}: {'TRAIN' if train else 'wait'}: {reason}")
        if not train:
            waits.append(f"{name}phase {phase}: {reason}")
            continue
        cycle = next_cycle(existing, lane)
        requests.append(dg.RunRequest(partition_key=cycle, run_key=cycle,
                                      tags={"flywheel/trigger": reason, "flywheel/phase": str(phase),
                                            "flywheel/lane": lane or "shared"}))
    if not requests:
        return dg.SkipReason("; ".join(waits))
    return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=[
        cycle_partitions.build_add_request([r.partition_key for r in requests])])


# The observability assets' AutomationCondition (defs/observability/assets.py) is evaluated here,
# running from the start like the other sensors (Dagster's default one starts stopped).
observability_automation = dg.AutomationConditionSensorDefinition(
    "observability_automation", target=dg.AssetSelection.groups("observability"), minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Refreshes velocity, loop health and the DuckDB catalog after their upstream tables change.")


daily_refresh = dg.ScheduleDefinition(
    name="daily_refresh", job=daily_refresh_job, cron_schedule="0 2 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="The seed's daily pipeline: ingest what landed, re-score feedback and judges, re-curate, and "
                "refresh velocity and loop health.",
)


@dg.sensor(job=regression_rollback_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Requests a rollback to the previous champion when the new one's online quality drops past "
                       "the degradation threshold after a promotion, in every lane on its own users.")
def regression_watch(context: dg.SensorEvaluationContext, flywheel: FlywheelResource):
    config = flywheel.config()
    registry = flywheel.registry()
    history, lake, now = registry.history(), flywheel.lake(), flywheel.now()
    requests, reasons = [], []
    for lane in config.tenancy.lanes():
        champion = registry.champion(lane)
        if champion is None:
            continue
        name = f"lane {lane}: " if lane != SHARED else ""
        verdict = check_regression(lake, history, now,
                                   threshold=config.trigger.phase2.performance_degradation_threshold,
                                   lane=lane, served=config.tenancy.served_sql(lane, "t.tenant_id"))
        context.log.info(f"regression_watch: {name}{verdict.reason}")
        reasons.append(name + verdict.reason)
        if verdict.rollback:
            # the tick decides; the run acts (and shows in the UI with its reason)
            requests.append(dg.RunRequest(
                run_key=f"rollback-{champion['version']}-{champion['event_id']}",
                run_config={"ops": {"roll_back_champion": {"config": {"version": champion["version"],
                                                                      "reason": verdict.reason}}}},
                tags={"flywheel/decision": "ROLLBACK", "flywheel/reason": verdict.reason[:200],
                      "flywheel/version": champion["version"]}))
    if not reasons:
        return dg.SkipReason("no champion")
    return requests or dg.SkipReason("; ".join(reasons))


@dg.sensor(job=ab_report_job, minimum_interval_seconds=120, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Decides each gated candidate's next move through canary (1%) and the A/B test (9%) to "
                       "champion, or back, and requests the run that makes it (rollout_step) with the reason.")
def ab_monitor(context: dg.SensorEvaluationContext, flywheel: FlywheelResource):
    waiting: list[str] = []
    # the tick decides and writes nothing; the run it requests (rollout_step) looks again and acts
    rows = advance(flywheel.config(), flywheel.lake(), flywheel.registry(), flywheel.now(), waiting, apply=False)
    for row in rows:
        # a mismatch means the assignment is broken: a person must look, not just the run log
        log = context.log.warning if row["rule"] == "srm" else context.log.info
        log(f"{row['treatment']} [{row['stage']}] {row['outcome']}: {row['reason']}")
    if not rows:
        return dg.SkipReason("; ".join(waiting) or "no candidate to move: none gated, in canary or in an A/B test")
    return [dg.RunRequest(partition_key=row["cycle"], run_key=f"rollout-{row['cycle']}-{row['looked_at'].isoformat()}",
                          tags={"flywheel/decision": f"{row['stage']} {row['outcome']}",
                                "flywheel/reason": row["reason"][:200], "flywheel/version": row["treatment"]})
            for row in {r["cycle"]: r for r in rows if r["cycle"]}.values()]
