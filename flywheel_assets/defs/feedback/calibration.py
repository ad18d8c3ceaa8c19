"""Scores calibrated against people (lib/feedback/calibration.py): each source's agreement with the
human labels, and their fusion fitted to them."""

import dagster as dg
import polars as pl
import pyarrow as pa

from flywheel_assets.defs.resources import FlywheelResource, chart_metadata, table_metadata
from flywheel_assets.lib.feedback.calibration import (
    FITTED, HAND, SOURCES, agreement_markdown, calibrate, calibration_row, latest_calibration, weights_markdown,
)
from flywheel_assets.lib.feedback.scoring import labelled_sources
from flywheel_assets.lib.observability.report import calibration_chart
from flywheel_assets.lib.storage.artifacts import publish
from flywheel_assets.lib.tables import (
    ANNOTATIONS, JUDGE_SCORES, SCORE_CALIBRATIONS, SESSION_EVENTS, SESSION_FEEDBACK, TRAJECTORIES,
)


def _number(value) -> dg.MetadataValue:
    return dg.MetadataValue.float(float(value)) if value is not None else dg.MetadataValue.text("n/a")


@dg.asset(group_name="feedback", kinds={"scipy", "duckdb", "delta"},
          deps=["session_feedback", "judge_scores", "annotations", "trajectories", "session_events"],
          metadata=table_metadata(SCORE_CALIBRATIONS))
def score_calibration(context: dg.AssetExecutionContext, flywheel: FlywheelResource) -> dg.MaterializeResult:
    """Each score source's agreement (AUC) with the human labels, and their fusion fitted to them (logistic,
    L2, judged out of fold); trajectory_scores uses the fit when fusion.calibrated."""
    config, lake = flywheel.config(), flywheel.lake()
    with flywheel.sql() as con:
        for table in (TRAJECTORIES, SESSION_EVENTS, SESSION_FEEDBACK, JUDGE_SCORES, ANNOTATIONS):
            lake.register(con, table)
        labelled = pl.from_arrow(labelled_sources(con, config))
    result = calibrate(labelled, config.calibration, use_explicit=config.fusion.explicit_weight > 0)
    chart_path = config.reports / "score_calibration.png"
    latest = latest_calibration(lake)
    # a row (and a chart) per change of the labels or their scores, not per ingest run
    changed = latest is None or latest["inputs_sha256"] != result["inputs_sha256"]
    if changed:
        lake.append(SCORE_CALIBRATIONS, pa.Table.from_pylist([calibration_row(result, flywheel.now())],
                                                             schema=SCORE_CALIBRATIONS.schema))
    chart = calibration_chart(result, chart_path) if changed or not chart_path.exists() else chart_path
    if changed:
        publish(config.home, chart)
    context.log.info(f"{result['labels']} labels ({result['good']} good): " + (
        f"AUC {result['before']['auc']:.3f} by hand weights, {result['after']['auc']:.3f} fitted (out of fold)"
        if result["fitted"] else f"no fit: {result['reason']}"))
    by_source = {row["source"]: row["auc"] for row in result["agreement"]}
    metadata = {
        "labels": dg.MetadataValue.int(result["labels"]), "good": dg.MetadataValue.int(result["good"]),
        "bad": dg.MetadataValue.int(result["bad"]), "fitted": dg.MetadataValue.bool(result["fitted"]),
        "reason": dg.MetadataValue.text(result["reason"] or "enough labels"),
        "applied": dg.MetadataValue.bool(config.fusion.calibrated and result["fitted"]),
        "auc_before": _number(result["before"]["auc"]), "auc_after": _number(by_source.get(FITTED)),
        **{f"auc_{source}": _number(by_source.get(source)) for source in (*SOURCES, HAND)},
        "agreement": dg.MetadataValue.md(agreement_markdown(result)),
        "weights": dg.MetadataValue.md(weights_markdown(result["model"])),
        "dagster/row_count": dg.MetadataValue.int(lake.row_count(SCORE_CALIBRATIONS)),
    }
    if result["graded"]:
        metadata["spearman_before"] = _number(result["before"]["spearman"])
        metadata["spearman_after"] = _number((result["after"] or {}).get("spearman"))
    if chart is not None:
        metadata["chart"] = chart_metadata(chart, "Agreement with people")
        metadata["chart_file"] = dg.MetadataValue.path(str(chart))
    return dg.MaterializeResult(metadata=table_metadata(SCORE_CALIBRATIONS, **metadata))
