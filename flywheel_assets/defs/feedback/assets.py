"""Silver and gold scores: implicit feedback, judges, and their fusion into tiers."""

import dagster as dg
import duckdb
import polars as pl
import pyarrow as pa

from flywheel_assets.defs.resources import FlywheelResource, markdown_counts, table_metadata
from flywheel_assets.lib.feedback.calibration import fitted_fusion, latest_calibration
from flywheel_assets.lib.feedback.judges import heuristic_judges
from flywheel_assets.lib.feedback.llm_judge import LLMJudge, judge_new
from flywheel_assets.lib.feedback.scoring import session_feedback as score_sessions
from flywheel_assets.lib.feedback.scoring import trajectory_scores as fuse_scores
from flywheel_assets.lib.lake import conform, sql_literal, utcnow
from flywheel_assets.lib.tables import (
    ANNOTATIONS, JUDGE_SCORES, LLM_JUDGMENTS, SESSION_EVENTS, SESSION_FEEDBACK, TRAJECTORIES, TRAJECTORY_SCORES,
)


@dg.asset(group_name="feedback", kinds={"duckdb", "delta"}, deps=["session_events", "trajectories"],
          metadata=table_metadata(SESSION_FEEDBACK))
def session_feedback(flywheel: FlywheelResource) -> dg.MaterializeResult:
    """The seed's five implicit signals and quality_score per session, in one grouped pass."""
    config, lake = flywheel.config(), flywheel.lake()
    con = duckdb.connect()
    lake.register(con, SESSION_EVENTS)
    lake.register(con, TRAJECTORIES)
    scores = score_sessions(con, config.scoring)
    version = lake.overwrite(SESSION_FEEDBACK, scores)
    quality = pl.from_arrow(scores).get_column("quality_score") if scores.num_rows else pl.Series([0.0])
    return dg.MaterializeResult(metadata=table_metadata(
        SESSION_FEEDBACK, scores, delta_version=version,
        mean_quality=float(quality.mean()), accepted_rate=float(pl.from_arrow(scores)["task_accepted"].mean() or 0)
        if scores.num_rows else 0.0,
    ))


@dg.asset(group_name="feedback", kinds={"delta"}, deps=["trajectories"], metadata=table_metadata(LLM_JUDGMENTS))
def llm_judgments(context: dg.AssetExecutionContext, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """The LLM judge's grade of each trajectory, once (newest first, llm_judge.max_trajectories_per_run a run,
    on scrubbed text); nothing when FLYWHEEL_LLM_JUDGE_URL is unset."""
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
def judge_scores(flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Heuristic judges of every trajectory, fused with the LLM judge's grade where llm_judgments holds one."""
    config, lake = flywheel.config(), flywheel.lake()
    trajectories = pl.from_arrow(lake.read(TRAJECTORIES, columns=[
        "trajectory_id", "task_type", "turns", "tool_calls", "tools_offered", "final_response"]))
    judged = heuristic_judges(trajectories, config.fusion)
    graded = 0
    if config.llm_judge.enabled:
        grades = pl.from_arrow(lake.read(LLM_JUDGMENTS, columns=["trajectory_id", "llm_score"],
                                         filter_sql=f"model = {sql_literal(config.llm_judge.model)}"))
        judged = judged.join(grades, on="trajectory_id", how="left")
        graded = judged.filter(pl.col("llm_score").is_not_null()).height
        weight = config.fusion.llm_judge_weight
        judged = judged.with_columns(
            pl.when(pl.col("llm_score").is_not_null())
            .then((1 - weight) * pl.col("heuristic_score") + weight * pl.col("llm_score"))
            .otherwise(pl.col("heuristic_score")).alias("judge_score"))
    else:
        judged = judged.with_columns(pl.lit(None, dtype=pl.Float64).alias("llm_score"),
                                     pl.col("heuristic_score").alias("judge_score"))
    table = conform(judged.to_arrow(), JUDGE_SCORES)
    version = lake.overwrite(JUDGE_SCORES, table)
    failing = judged.filter(pl.col("failed_judges") != "")["failed_judges"].str.split(",").explode().value_counts()
    counts = {row["failed_judges"]: row["count"] for row in failing.to_dicts()}
    return dg.MaterializeResult(metadata=table_metadata(
        JUDGE_SCORES, table, delta_version=version, llm_judge_enabled=config.llm_judge.enabled,
        llm_graded=graded, failures_by_judge=markdown_counts(counts, "judge", "trajectories"),
    ))


@dg.asset(group_name="feedback", kinds={"duckdb", "delta"},
          deps=["session_feedback", "judge_scores", "annotations", "trajectories", "score_calibration"],
          metadata=table_metadata(TRAJECTORY_SCORES))
def trajectory_scores(flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Implicit feedback fused with the judges (hand weights, or fitted: fusion.calibrated); labels win."""
    config, lake = flywheel.config(), flywheel.lake()
    con = duckdb.connect()
    for table in (TRAJECTORIES, SESSION_EVENTS, SESSION_FEEDBACK, JUDGE_SCORES, ANNOTATIONS):
        lake.register(con, table)
    latest = latest_calibration(lake) if config.fusion.calibrated else None
    calibration = fitted_fusion(latest)
    scores = fuse_scores(con, config, calibration)
    version = lake.overwrite(TRAJECTORY_SCORES, scores)
    frame = pl.from_arrow(scores)
    tiers = {name: frame.filter(pl.col("tier") == name).height for name in config.tiers.names}
    high = frame.filter(pl.col("combined_score") >= config.curation.high_quality_threshold).height
    return dg.MaterializeResult(metadata=table_metadata(
        TRAJECTORY_SCORES, scores, delta_version=version, tier_mix=markdown_counts(tiers, "tier", "trajectories"),
        high_quality_rate=high / max(frame.height, 1),
        by_source=markdown_counts(dict(frame["score_source"].value_counts().iter_rows()), "source", "trajectories"),
        fusion=_fusion_used(config, latest),
    ))


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
