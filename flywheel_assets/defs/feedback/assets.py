"""Silver and gold scores: implicit feedback, judges, and their fusion into tiers."""

import dagster as dg
import duckdb
import polars as pl

from flywheel_assets.defs.resources import FlywheelResource, markdown_counts, table_metadata
from flywheel_assets.lib.feedback.judges import heuristic_judges
from flywheel_assets.lib.feedback.llm_judge import LLMJudge
from flywheel_assets.lib.feedback.scoring import session_feedback as score_sessions
from flywheel_assets.lib.feedback.scoring import trajectory_scores as fuse_scores
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.tables import (
    ANNOTATIONS, JUDGE_SCORES, SESSION_EVENTS, SESSION_FEEDBACK, TRAJECTORIES, TRAJECTORY_SCORES,
)
from flywheel_assets.lib.curation.curate import to_messages


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


@dg.asset(group_name="feedback", kinds={"polars", "delta"}, deps=["trajectories"],
          metadata=table_metadata(JUDGE_SCORES))
def judge_scores(context: dg.AssetExecutionContext, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Heuristic judges of every trajectory; the LLM judge too when FLYWHEEL_LLM_JUDGE_URL is set."""
    config, lake = flywheel.config(), flywheel.lake()
    trajectories = pl.from_arrow(lake.read(TRAJECTORIES, columns=[
        "trajectory_id", "task_type", "turns", "tool_calls", "tools_offered", "final_response"]))
    judged = heuristic_judges(trajectories, config.fusion).with_columns(
        pl.lit(None, dtype=pl.Float64).alias("llm_score"), pl.col("heuristic_score").alias("judge_score"))
    llm_failures = 0
    if config.llm_judge.enabled:
        judged, llm_failures = _with_llm_judge(context, judged, trajectories, config)
    table = conform(judged.to_arrow(), JUDGE_SCORES)
    version = lake.overwrite(JUDGE_SCORES, table)
    failing = judged.filter(pl.col("failed_judges") != "")["failed_judges"].str.split(",").explode().value_counts()
    counts = {row["failed_judges"]: row["count"] for row in failing.to_dicts()}
    return dg.MaterializeResult(metadata=table_metadata(
        JUDGE_SCORES, table, delta_version=version, llm_judge_enabled=config.llm_judge.enabled,
        llm_judge_failures=llm_failures, failures_by_judge=markdown_counts(counts, "judge", "trajectories"),
    ))


def _with_llm_judge(context, judged: pl.DataFrame, trajectories: pl.DataFrame, config):
    sample = trajectories.head(config.llm_judge.max_trajectories_per_run).to_dicts()
    items = [(t["trajectory_id"], to_messages(t["turns"], t["tool_calls"])) for t in sample]
    results = pl.DataFrame(LLMJudge(config.llm_judge).score_many(items),
                           schema={"trajectory_id": pl.String, "llm_score": pl.Float64, "llm_reason": pl.String,
                                   "error": pl.String})
    failures = results.filter(pl.col("error").is_not_null()).height
    context.log.info(f"LLM judge scored {results.height - failures} trajectories, {failures} failed")
    weight = config.fusion.llm_judge_weight
    judged = judged.drop("llm_score").join(results.select("trajectory_id", "llm_score"), on="trajectory_id", how="left")
    judged = judged.with_columns(
        pl.when(pl.col("llm_score").is_not_null())
        .then((1 - weight) * pl.col("heuristic_score") + weight * pl.col("llm_score"))
        .otherwise(pl.col("heuristic_score")).alias("judge_score"))
    return judged, failures


@dg.asset(group_name="feedback", kinds={"duckdb", "delta"},
          deps=["session_feedback", "judge_scores", "annotations", "trajectories"],
          metadata=table_metadata(TRAJECTORY_SCORES))
def trajectory_scores(flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Implicit feedback fused with the judges; human labels override; a tier per trajectory."""
    config, lake = flywheel.config(), flywheel.lake()
    con = duckdb.connect()
    for table in (TRAJECTORIES, SESSION_EVENTS, SESSION_FEEDBACK, JUDGE_SCORES, ANNOTATIONS):
        lake.register(con, table)
    scores = fuse_scores(con, config)
    version = lake.overwrite(TRAJECTORY_SCORES, scores)
    frame = pl.from_arrow(scores)
    tiers = {name: frame.filter(pl.col("tier") == name).height for name in config.tiers.names}
    high = frame.filter(pl.col("combined_score") >= config.curation.high_quality_threshold).height
    return dg.MaterializeResult(metadata=table_metadata(
        TRAJECTORY_SCORES, scores, delta_version=version, tier_mix=markdown_counts(tiers, "tier", "trajectories"),
        high_quality_rate=high / max(frame.height, 1),
        by_source=markdown_counts(dict(frame["score_source"].value_counts().iter_rows()), "source", "trajectories"),
    ))
