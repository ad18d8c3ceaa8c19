"""How fast the flywheel turns and whether it feeds on itself: velocity, loop health, their charts."""

import dagster as dg

from flywheel_assets.defs.resources import FlywheelResource, chart_metadata
from flywheel_assets.lib.observability.loop_health import CHECKS, loop_health_markdown, measure_loop_health
from flywheel_assets.lib.observability.report import quality_trend_chart, tier_mix_chart, velocity_chart, write_json
from flywheel_assets.lib.observability.velocity import measure_velocity, velocity_markdown
from flywheel_assets.lib.storage.artifacts import publish

# Everything a cycle leaves behind: usage, scores, datasets, adapters, evaluations, A/B decisions.
UPSTREAM = ["trajectories", "session_events", "session_feedback", "judge_scores", "trajectory_scores",
            "training_dataset", "lora_adapter", "offline_eval", "ab_report"]


# Declarative automation, simpler here than a sensor of our own: refresh once after any upstream
# table changes (each ingest, each cycle's step), not while one is being written. eager() without its
# "no dependency missing" clause: a rolled-back cycle leaves partitions that are never materialized.
AFTER_UPSTREAM = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing()) \
    .with_label("after any upstream change")


def _number(value) -> dg.MetadataValue:
    return dg.MetadataValue.float(float(value)) if value is not None else dg.MetadataValue.text("n/a")


def _charts(charts: dict) -> dict:
    metadata = {}
    for name, (path, title) in charts.items():
        if path is not None:
            metadata[name] = chart_metadata(path, title)
            metadata[f"{name}_file"] = dg.MetadataValue.path(str(path))
    return metadata


@dg.asset(group_name="observability", kinds={"duckdb", "polars", "python"}, deps=UPSTREAM,
          automation_condition=AFTER_UPSTREAM)
def flywheel_velocity(flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Throughput and latency per step, cycle time, data yield, the velocity score and the seed's bottleneck."""
    config = flywheel.config()
    result = measure_velocity(config, flywheel.lake(), flywheel.now())
    reports = config.reports
    write_json(result, reports / "velocity.json")
    chart = velocity_chart(result, reports / "velocity_by_stage.png")
    publish(config.home, reports / "velocity.json", chart)
    bottleneck = result["bottleneck"]
    return dg.MaterializeResult(metadata={
        "velocity_score": _number(result["velocity_score"]),
        "cycle_time_days": _number(result["cycle_time_days"]),
        "turns_per_week": _number(result["turns_per_week"]),
        "ship_rate": _number(result["ship_rate"]),
        "data_yield": _number(result["data_yield"]),
        "served_yield": _number(result["served_yield"]),
        "projected_score_after_remedy": _number(result["projected_score"]),
        "bottleneck": dg.MetadataValue.text(bottleneck["name"]),
        "bottleneck_reason": dg.MetadataValue.md(bottleneck["reason"]),
        "stages": dg.MetadataValue.md(velocity_markdown(result)),
        "report": dg.MetadataValue.path(str(reports / "velocity.json")),
        **_charts({"chart": (chart, "Velocity by stage")}),
    })


@dg.asset(group_name="observability", kinds={"duckdb", "polars", "python"}, deps=UPSTREAM,
          automation_condition=AFTER_UPSTREAM, check_specs=[
    dg.AssetCheckSpec("no_negative_feedback_loop", asset="loop_health",
                      description="No loop-health check is in alert (warnings pass; reasons in the description).")])
def loop_health(flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Negative-feedback-loop checks per cycle: loop-made data, held-out drift, users vs judges, diversity."""
    config = flywheel.config()
    result = measure_loop_health(config, flywheel.lake(), flywheel.now())
    reports = config.reports
    write_json(result, reports / "loop_health.json")
    charts = {"quality_trend": (quality_trend_chart(result, reports / "quality_trend.png"), "Quality trend"),
              "tier_mix": (tier_mix_chart(result, reports / "tier_mix.png"), "Tier mix per cycle")}
    publish(config.home, reports / "loop_health.json", *(path for path, _ in charts.values()))
    statuses = [check["status"] for check in result["checks"]]
    values = {check["check"]: _number(check["value"]) for check in result["checks"]}
    flagged = [c for c in result["checks"] if c["status"] in ("warn", "alert")]
    check = dg.AssetCheckResult(
        check_name="no_negative_feedback_loop", passed=result["status"] != "alert", severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(f"{c['check']} {c['status']}: {c['reason']}" for c in flagged) or "every check ok or n/a",
        metadata={c["check"]: dg.MetadataValue.text(c["status"]) for c in result["checks"]})
    return dg.MaterializeResult(check_results=[check], metadata={
        "status": dg.MetadataValue.text(result["status"]),
        "alerts": dg.MetadataValue.int(statuses.count("alert")),
        "warnings": dg.MetadataValue.int(statuses.count("warn")),
        "checks": dg.MetadataValue.md(loop_health_markdown(result)),
        **{name: values[name] for name in CHECKS},
        "report": dg.MetadataValue.path(str(reports / "loop_health.json")),
        **_charts(charts),
    })

