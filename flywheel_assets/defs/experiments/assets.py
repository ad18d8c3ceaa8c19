"""The A/B report of each cycle's candidate: every look, the decision, and the effect over time."""

import json

import dagster as dg

from flywheel_assets.defs.partitions import cycle_partitions
from flywheel_assets.defs.resources import FlywheelResource, chart_metadata
from flywheel_assets.defs.records import record_in_run
from flywheel_assets.lib.experiments.rollout import advance
from flywheel_assets.lib.tables import AB_RESULTS
from flywheel_assets.lib.experiments.report import ab_markdown, ab_chart
from flywheel_assets.lib.storage.artifacts import publish


@dg.asset(group_name="experiments", kinds={"delta", "python"}, partitions_def=cycle_partitions,
          deps=["offline_eval"])
def rollout_step(context: dg.AssetExecutionContext, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """One look at the cycle's candidate, requested by ab_monitor: gate → canary → A/B → champion, or rolled back."""
    with flywheel.writing("rollout_step", context):
        cycle = context.partition_key
        rows = advance(flywheel.config(), flywheel.lake(), flywheel.registry(context), flywheel.now(), cycle=cycle)
        decided = context.run.tags.get("flywheel/decision", "none (launched by hand)")
        for row in rows:
            (context.log.warning if row["rule"] == "srm" else context.log.info)(
                f"{row['treatment']} [{row['stage']}] {row['outcome']}: {row['reason']}")
        if rows:
            record_in_run(context, AB_RESULTS, cycle=cycle, looks=len(rows), outcome=rows[-1]["outcome"])
        latest = rows[-1] if rows else None
        return dg.MaterializeResult(metadata={
            "stage": latest["stage"] if latest else "nothing to do",
            "outcome": latest["outcome"] if latest else "none",
            "reason": latest["reason"] if latest else "no live candidate of this cycle moved",
            "sensor_decision": decided,
        })


@dg.asset(group_name="experiments", kinds={"delta", "python"}, partitions_def=cycle_partitions,
          deps=["offline_eval", "rollout_step"])
def ab_report(context: dg.AssetExecutionContext, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Staged rollout and A/B test of the cycle's candidate: decision, reason, effect with its interval."""
    config = flywheel.config()
    cycle = context.partition_key
    rows = flywheel.lake().read(AB_RESULTS, filter_sql=f"cycle = '{cycle}'").to_pylist()
    rows.sort(key=lambda r: r["looked_at"])
    chart = ab_chart(rows, config.reports / f"ab-{cycle}.png")
    publish(config.home, chart)
    latest = rows[-1] if rows else None
    metadata = {
        "looks": len(rows),
        "decision": latest["outcome"] if latest else "no look yet",
        "reason": latest["reason"] if latest else "the candidate has not reached the A/B stage",
        "report": dg.MetadataValue.md(ab_markdown(rows)),
    }
    decision = json.loads(latest.get("decision_json") or "{}") if latest else {}
    if decision.get("plan"):
        plan = decision["plan"]
        metadata.update(planned_users=plan["planned_users"], observed_users=plan["observed_users"],
                        power_now=dg.MetadataValue.float(plan.get("power_now") or 0.0),
                        cuped_variance_reduction=dg.MetadataValue.float(decision["details"].get("variance_reduction") or 0.0),
                        flags=", ".join(decision.get("flags") or []) or "none")
    if chart is not None:
        metadata["chart"] = chart_metadata(chart, f"A/B effect of {latest['treatment']} over time")
        metadata["chart_file"] = dg.MetadataValue.path(str(chart))
    return dg.MaterializeResult(metadata=metadata)
