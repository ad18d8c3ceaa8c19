"""Silver and gold scores: implicit feedback, judges, and their fusion into tiers."""

import dagster as dg
import polars as pl
import pyarrow as pa

from flywheel_assets.defs.resources import (
    FlywheelResource, RefreshConfig, markdown_counts, refresh_metadata, table_metadata,
)
from flywheel_assets.lib.feedback.calibration import fitted_fusion, latest_calibration
from flywheel_assets.lib.feedback.llm_judge import LLMJudge, judge_new
from flywheel_assets.lib.feedback.refresh_scores import (
    refresh_judge_scores, refresh_session_feedback, refresh_trajectory_scores,
)
from flywheel_assets.lib.lake import sql_literal, utcnow
from flywheel_assets.lib.tables import (
    JUDGE_SCORES, LLM_JUDGMENTS, SESSION_FEEDBACK, TRAJECTORIES, TRAJECTORY_SCORES,
)


@dg.asset(group_name="feedback", kinds={"duckdb", "delta"}, deps=["session_events", "trajectories"],
          metadata=table_metadata(SESSION_FEEDBACK))
def session_feedback(config: RefreshConfig, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """The seed's five implicit signals and quality_score per session, folding in only the new events."""
    lake = flywheel.lake()
    outcome = refresh_session_feedback(lake, flywheel.config(), full=config.full)
    return dg.MaterializeResult(metadata=refresh_metadata(
        SESSION_FEEDBACK, outcome, "SELECT coalesce(avg(quality_score), 0) AS mean_quality, "
        "coalesce(avg(task_accepted::INT), 0) AS accepted_rate FROM t", flywheel))


@dg.asset(group_name="feedback", kinds={"delta"}, deps=["trajectories"], metadata=table_metadata(LLM_JUDGMENTS))
def llm_judgments(context: dg.AssetExecutionContext, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """The LLM judge's grade of each trajectory, once (newest first, llm_judge.max_trajectories_per_run a run,
    on scrubbed text); nothing when FLYWHEEL_LLM_JUDGE_URL is unset."""
    with flywheel.writing("llm_judgments", context):
        config, lake = flywheel.config(), flywheel.lake()
        if not config.llm_judge.enabled:
            return dg.MaterializeResult(metadata={"llm_judge_enabled": False, "judged_this_run": 0,
                                                  "dagster/row_count": lake.row_count(LLM_JUDGMENTS)})
        model = config.llm_judge.model
        judged = set(lake.read(LLM_JUDGMENTS, columns=["trajectory_id"],
                               filter_sql=f"model = {sql_literal(model)}").column("trajectory_id").to_pylist())
        trajectories = lake.read(TRAJECTORIES, columns=["trajectory_id", "created_at", "turns", "tool_calls"])
        ids = trajectories.column("trajectory_id").to_pylist()
        waiting = sum(1 for trajectory_id in ids if trajectory_id not in judged)
        rows, failures = judge_new(LLMJudge(config.llm_judge), trajectories.to_pylist(), judged,
                                   config.llm_judge.max_trajectories_per_run, utcnow())
        context.log.info(f"LLM judge ({model}) graded {len(rows)} of {waiting} trajectories waiting; "
                         f"{len(failures)} failed and wait for the next run")
        version = lake.append(LLM_JUDGMENTS, pa.Table.from_pylist(rows, schema=LLM_JUDGMENTS.schema))
        return dg.MaterializeResult(metadata=table_metadata(
            LLM_JUDGMENTS, delta_version=version, llm_judge_enabled=True, judged_this_run=len(rows),
            failed_this_run=len(failures), still_waiting=waiting - len(rows),
            pii_redacted=sum(r["pii_redacted"] for r in rows),
            first_failures=dg.MetadataValue.md("\n".join(f"- {f['trajectory_id']}: {f['error']}" for f in failures[:5])
                                               or "none"),
        ) | {"dagster/row_count": lake.row_count(LLM_JUDGMENTS)})


@dg.asset(group_name="feedback", kinds={"polars", "delta"}, deps=["trajectories", "llm_judgments"],
          metadata=table_metadata(JUDGE_SCORES))
def judge_scores(config: RefreshConfig, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Heuristic judges of the new trajectories, fused with the LLM judge's grade where llm_judgments holds one."""
    settings, lake = flywheel.config(), flywheel.lake()
    outcome = refresh_judge_scores(lake, settings, full=config.full)
    failing = pl.from_arrow(outcome.rows).filter(pl.col("failed_judges") != "")["failed_judges"] \
        .str.split(",").explode().value_counts()
    counts = {row["failed_judges"]: row["count"] for row in failing.to_dicts()}
    return dg.MaterializeResult(metadata=refresh_metadata(
        JUDGE_SCORES, outcome, "SELECT count(llm_score) AS llm_graded FROM t", flywheel) | {
        "llm_judge_enabled": settings.llm_judge.enabled,
        "failures_by_judge": markdown_counts(counts, "judge", "trajectories written"),
    })


@dg.asset(group_name="feedback", kinds={"duckdb", "delta"},
          deps=["session_feedback", "judge_scores", "annotations", "trajectories", "score_calibration"],
          metadata=table_metadata(TRAJECTORY_SCORES))
def trajectory_scores(config: RefreshConfig, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Implicit feedback fused with the judges (hand weights, or fitted: fusion.calibrated) for what changed; labels win."""
    settings, lake = flywheel.config(), flywheel.lake()
    latest = latest_calibration(lake) if settings.fusion.calibrated else None
    calibration = fitted_fusion(latest)
    outcome = refresh_trajectory_scores(lake, settings, calibration, str(latest and latest.get("calibrated_at")),
                                        full=config.full)

    def mixes(con) -> dict:
        tiers = dict(con.execute("SELECT tier, count(*) FROM t GROUP BY tier").fetchall())
        sources = dict(con.execute("SELECT score_source, count(*) FROM t GROUP BY ALL ORDER BY 1").fetchall())
        return {"tier_mix": markdown_counts({name: tiers.get(name, 0) for name in settings.tiers.names}, "tier",
                                            "trajectories"),
                "by_source": markdown_counts(sources, "source", "trajectories")}

    threshold = settings.curation.high_quality_threshold
    return dg.MaterializeResult(metadata=refresh_metadata(
        TRAJECTORY_SCORES, outcome,
        f"SELECT coalesce(avg((combined_score >= {threshold})::INT), 0) AS high_quality_rate FROM t", flywheel,
        more=mixes) | {"fusion": _fusion_used(settings, latest)})


def _fusion_used(config, latest: dict | None) -> str:
    fusion = config.fusion
    hand = f"hand weights (implicit {fusion.implicit_weight}, judge {fusion.judge_weight}, " \
           f"explicit {fusion.explicit_weight})"
    if not fusion.calibrated:
        return hand
    if latest is None or not latest["fitted"]:
        return f"{hand}: fusion.calibrated, but no fit yet ({latest['reason'] if latest else 'no score_calibration'})"
    return (f"fitted to {latest['labels']} labels at {latest['calibrated_at']:%Y-%m-%d %H:%M} "
            f"(AUC {latest['auc_before']:.3f} by hand weights, {latest['auc_after']:.3f} fitted, out of fold)")
