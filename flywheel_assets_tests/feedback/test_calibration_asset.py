"""score_calibration through Dagster on a temporary FLYWHEEL_HOME, and trajectory_scores applying its fit."""

import json
import math
from datetime import datetime, timedelta, timezone

import dagster as dg
import pyarrow as pa
import pytest

from flywheel_assets.defs.feedback.assets import judge_scores, session_feedback, trajectory_scores
from flywheel_assets.defs.feedback.calibration import score_calibration
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.feedback.calibration import fitted_fusion, latest_calibration
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.tables import (
    ANNOTATIONS, JUDGE_SCORES, SCORE_CALIBRATIONS, SESSION_EVENTS, TRAJECTORIES, TRAJECTORY_SCORES,
)

T0 = datetime(2026, 11, 26, 10, tzinfo=timezone.utc)
ASSETS = [session_feedback, judge_scores, score_calibration, trajectory_scores]


@pytest.fixture
def labelled_lake(lake):
    """50 one-trajectory sessions: even ones accepted (implicit 0.9), odd ones an error and no accept (−0.1).
    The first 40 carry a label that follows the user, but for four; the last 10 have none."""
    trajectories, events, labels = [], [], []
    for i in range(50):
        accepted = i % 2 == 0
        trajectories.append({"trajectory_id": f"t{i:02d}", "session_id": f"s{i:02d}", "origin": "usage",
                             "is_synthetic": False, "task_type": "capital_lookup", "created_at": T0,
                             "final_response": "Lima." if i % 3 else ""})
        events.append({"event_id": f"e{i}", "session_id": f"s{i:02d}", "trajectory_id": f"t{i:02d}",
                       "event_type": "output_accepted" if accepted else "error_reported", "ts": T0,
                       "user_id": "u", "tenant_id": "default"})
        if i < 40:
            good = accepted != (i in (4, 9, 22, 31))
            labels.append({"annotation_id": f"a{i}", "trajectory_id": f"t{i:02d}", "score": 0.8 if good else -0.8,
                           "annotated_at": T0 + timedelta(minutes=i)})
    lake.append(TRAJECTORIES, conform(pa.Table.from_pylist(trajectories), TRAJECTORIES))
    lake.append(SESSION_EVENTS, conform(pa.Table.from_pylist(events), SESSION_EVENTS))
    lake.append(ANNOTATIONS, conform(pa.Table.from_pylist(labels), ANNOTATIONS))
    return lake


def materialize(home, settings: dict) -> dg.ExecuteInProcessResult:
    path = home / "flywheel.json"
    path.write_text(json.dumps(settings))
    resources = {"flywheel": FlywheelResource(home=str(home), config_path=str(path))}
    result = dg.materialize(ASSETS, resources=resources, instance=dg.DagsterInstance.ephemeral())
    assert result.success
    return result


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {key: value.value for key, value in event.materialization.metadata.items()}


CALIBRATED = {"fusion": {"calibrated": True}, "calibration": {"min_labels": 20, "min_per_class": 5}}


def test_the_fit_is_stored_shown_and_applied(home, config, labelled_lake):
    lake = labelled_lake
    result = materialize(home, CALIBRATED)
    [row] = lake.read(SCORE_CALIBRATIONS).to_pylist()
    assert (row["labels"], row["good"], row["fitted"], row["reason"]) == (40, 20, True, "")
    assert row["implicit_weight"] > 1.0 and row["implicit_missing"] is None  # every label has an implicit score
    # 20 good × 20 bad labels. The hand fusion (0.7·implicit + 0.3·heuristic, the heuristic 1 with a final
    # answer, 1/3 without) puts every accepted session above every other: 18·18 pairs in order, plus half
    # of the 11·2 ties among accepted ones and 3 + 12 of the 2 good errors' 36 pairs with the other errors
    assert row["auc_before"] == pytest.approx((18 * 18 + 11 + 15) / 400)
    shown = metadata(result, "score_calibration")
    assert (shown["labels"], shown["fitted"], shown["applied"]) == (40, True, True)
    assert shown["auc_before"] == pytest.approx(row["auc_before"])
    assert shown["auc_after"] == pytest.approx(row["auc_after"])
    assert "| implicit | 40 |" in shown["agreement"] and "implicit score" in shown["weights"]
    assert shown["chart"].startswith("![Agreement with people](data:image/png;base64,")
    assert (config.reports / "score_calibration.png").stat().st_size > 1000

    model = fitted_fusion(latest_calibration(lake))
    heuristic = {r["trajectory_id"]: r["heuristic_score"] for r in lake.read(JUDGE_SCORES).to_pylist()}
    scores = {r["trajectory_id"]: r for r in lake.read(TRAJECTORY_SCORES).to_pylist()}
    for trajectory_id in ("t40", "t41", "t42"):  # unlabelled: the fitted fusion
        z = model.intercept + model.weights["implicit"] * scores[trajectory_id]["implicit_score"] \
            + model.weights["heuristic"] * heuristic[trajectory_id]
        assert scores[trajectory_id]["combined_score"] == pytest.approx(math.tanh(z / 2))
    assert scores["t04"]["combined_score"] == -0.8  # a label still decides its own score
    assert metadata(result, "trajectory_scores")["fusion"].startswith("fitted to 40 labels")

    # nothing changed: no new row
    materialize(home, CALIBRATED)
    assert lake.row_count(SCORE_CALIBRATIONS) == 1


def test_off_by_default_and_below_the_minimum_nothing_is_fitted(home, labelled_lake):
    lake = labelled_lake
    result = materialize(home, {})
    scores = {r["trajectory_id"]: r for r in lake.read(TRAJECTORY_SCORES).to_pylist()}
    heuristic = {r["trajectory_id"]: r["heuristic_score"] for r in lake.read(JUDGE_SCORES).to_pylist()}
    assert scores["t40"]["combined_score"] == pytest.approx(0.7 * 0.9 + 0.3 * heuristic["t40"])
    assert metadata(result, "trajectory_scores")["fusion"].startswith("hand weights")
    assert metadata(result, "score_calibration")["applied"] is False
    assert lake.read(SCORE_CALIBRATIONS).to_pylist()[0]["fitted"] is True  # fitted, reported, not applied

    result = materialize(home, {"fusion": {"calibrated": True}, "calibration": {"min_labels": 50}})
    shown = metadata(result, "score_calibration")
    assert (shown["fitted"], shown["auc_after"]) == (False, "n/a")
    assert "fewer than calibration.min_labels (50)" in shown["reason"]
    # implicit alone: 0.9 or −0.1, so 18·18 pairs in order and the 2·18 + 2·18 tied ones half
    assert shown["auc_implicit"] == pytest.approx((18 * 18 + 18 + 18) / 400)
    assert "no fit yet" in metadata(result, "trajectory_scores")["fusion"]
    assert lake.row_count(SCORE_CALIBRATIONS) == 2  # other settings, another row
