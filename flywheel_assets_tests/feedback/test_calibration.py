"""Calibration against human labels: AUC and the logistic fit against hand-computed and planted cases."""

import duckdb
import numpy as np
import polars as pl
import pytest

from flywheel_assets.lib.config import CalibrationConfig
from flywheel_assets.lib.feedback.calibration import (
    FITTED, FittedFusion, auc, calibrate, calibration_row, fit_logistic, fitted_fusion, stratified_folds,
)
from flywheel_assets.lib.feedback.judges import JUDGES


def labelled(labels, implicit, heuristic, explicit=None, llm=None) -> pl.DataFrame:
    """A frame shaped like scoring.labelled_sources, hand_score by the default hand weights (0.7 / 0.3)."""
    n = len(labels)
    implicit = np.asarray(implicit, dtype=float)
    heuristic = np.asarray(heuristic, dtype=float)
    hand = np.where(np.isnan(implicit), heuristic, 0.7 * np.nan_to_num(implicit) + 0.3 * heuristic)
    frame = pl.DataFrame({
        "trajectory_id": [f"t{i:04d}" for i in range(n)], "label": np.asarray(labels, dtype=float),
        "implicit_score": implicit, "heuristic_score": heuristic,
        "llm_score": [None] * n if llm is None else llm, "explicit_score": [None] * n if explicit is None else explicit,
        "judge_score": heuristic, "hand_score": hand, **{judge: np.ones(n) for judge in JUDGES},
    }, schema_overrides={"llm_score": pl.Float64, "explicit_score": pl.Float64})
    return frame.with_columns(pl.col("implicit_score").fill_nan(None))


def planted(n: int = 300, seed: int = 0) -> pl.DataFrame:
    """implicit carries the verdict (with noise), heuristic is pure noise."""
    rng = np.random.default_rng(seed)
    good = rng.random(n) < 0.5
    implicit = np.clip(np.where(good, 0.4, -0.4) + rng.normal(0, 0.45, n), -1, 1)
    heuristic = rng.uniform(-1, 1, n)
    labels = np.where(good, rng.uniform(0.3, 1.0, n), -rng.uniform(0.3, 1.0, n))
    return labelled(labels, implicit, heuristic)


@pytest.mark.parametrize("scores, good, expected", [
    ([0.1, 0.4, 0.35, 0.8], [False, False, True, True], 0.75),  # 3 of 4 good-bad pairs in order
    ([0.9, 0.8, 0.1, 0.2], [False, False, True, True], 0.0),
    ([0.5, 0.5, 0.5], [True, False, False], 0.5),  # ties count half
    ([0.2, 0.6, 0.6], [False, True, False], 0.75),  # one win, one tie
    ([0.2, 0.3], [True, True], None),  # one verdict only
])
def test_auc_matches_hand_counted_pairs(scores, good, expected):
    result = auc(np.array(scores), np.array(good))
    assert result == (pytest.approx(expected) if expected is not None else None)


def test_the_fit_recovers_planted_logistic_weights():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (20_000, 2))
    good = rng.random(20_000) < 1 / (1 + np.exp(-(-0.5 + 2.0 * x[:, 0] - 1.0 * x[:, 1])))
    intercept, weights = fit_logistic(x, good, l2=1e-3)
    assert intercept == pytest.approx(-0.5, abs=0.08)
    assert weights == pytest.approx([2.0, -1.0], abs=0.1)
    # the penalty pulls the weights towards 0, never the intercept
    _, shrunk = fit_logistic(x[:60], good[:60], l2=50.0)
    assert np.abs(shrunk).max() < 0.5 * np.abs(fit_logistic(x[:60], good[:60], l2=1e-3)[1]).max()


def test_the_informative_source_wins_and_the_noisy_one_gets_little_weight():
    result = calibrate(planted(), CalibrationConfig())
    by_source = {row["source"]: row for row in result["agreement"]}
    assert result["fitted"] and result["reason"] == ""
    assert by_source["heuristic"]["auc"] == pytest.approx(0.5, abs=0.08)  # noise agrees with nobody
    assert by_source["implicit"]["auc"] > 0.85
    after = by_source[FITTED]["auc"]
    assert after > by_source["heuristic"]["auc"] + 0.3
    # the hand weights give the noise 0.3: the fit, judged out of fold, agrees better than them
    assert after > result["before"]["auc"] + 0.01
    model = result["model"]
    assert model.weights["implicit"] > 3.0
    assert abs(model.weights["heuristic"]) < 0.1 * model.weights["implicit"]
    assert set(model.missing) == set()  # every label has both sources: no indicator
    assert result["graded"] and by_source[FITTED]["spearman"] > 0.5


def test_after_is_judged_on_labels_the_fit_did_not_see():
    """On noise a fit agrees with its own training labels by chance; out of fold it does not."""
    rng = np.random.default_rng(1)
    good = np.arange(40) % 2 == 0
    frame = labelled(np.where(good, 1.0, -1.0), rng.uniform(-1, 1, 40), rng.uniform(-1, 1, 40))
    after = calibrate(frame, CalibrationConfig(l2=0.01))["after"]
    assert after["in_sample_auc"] > 0.55
    assert after["auc"] < after["in_sample_auc"] - 0.15


def test_a_missing_source_gets_an_indicator_that_learns_what_absence_means():
    """Bad answers are the ones no user event names (no implicit score) more often than good ones."""
    rng = np.random.default_rng(2)
    n = 400
    good = rng.random(n) < 0.5
    implicit = np.where(good, 0.5, -0.3) + rng.normal(0, 0.5, n)
    implicit[(rng.random(n) < np.where(good, 0.1, 0.6))] = np.nan
    frame = labelled(np.where(good, 1.0, -1.0), implicit, rng.uniform(-1, 1, n))
    result = calibrate(frame, CalibrationConfig())
    model = result["model"]
    assert model.missing["implicit"] < -0.5 and model.weights["implicit"] > 1.0
    assert "llm" not in model.weights and "explicit" not in model.weights  # no label has them
    by_source = {row["source"]: row for row in result["agreement"]}
    assert by_source["implicit"]["labels"] == int((~np.isnan(implicit)).sum())
    assert by_source["llm"] == {"source": "llm", "labels": 0, "auc": None, "spearman": None}
    assert not result["graded"] and by_source[FITTED]["spearman"] is None  # ±1 labels: AUC only


def test_below_the_minimum_it_reports_agreement_but_fits_nothing():
    frame = planted(n=300).head(25)
    result = calibrate(frame, CalibrationConfig())
    assert not result["fitted"] and result["model"] is None and result["after"] is None
    assert "fewer than calibration.min_labels (30)" in result["reason"]
    implicit = frame["implicit_score"].to_numpy()
    expected = auc(implicit, frame["label"].to_numpy() > 0)
    assert {row["source"]: row["auc"] for row in result["agreement"]}["implicit"] == pytest.approx(expected)
    assert FITTED not in {row["source"] for row in result["agreement"]}
    row = calibration_row(result, at=None)
    assert (row["fitted"], row["intercept"], row["implicit_weight"], row["auc_after"]) == (False, None, None, None)
    assert fitted_fusion(row) is None

    lopsided = labelled([1.0] * 36 + [-1.0] * 4, np.linspace(-1, 1, 40), np.zeros(40))
    result = calibrate(lopsided, CalibrationConfig())
    assert not result["fitted"] and "4 bad labels" in result["reason"] and "min_per_class (10)" in result["reason"]


def test_labels_of_zero_are_no_verdict():
    frame = planted(n=60)
    with_zeros = pl.concat([frame, labelled([0.0] * 5, [0.9] * 5, [0.9] * 5).with_columns(
        pl.format("z{}", pl.col("trajectory_id")).alias("trajectory_id"))])
    result = calibrate(with_zeros, CalibrationConfig())
    assert (result["labels"], result["no_verdict"]) == (60, 5)
    assert result["model"] == calibrate(frame, CalibrationConfig())["model"]


def test_folds_are_stratified_and_the_same_every_time():
    good = np.array([True] * 23 + [False] * 17)
    folds = stratified_folds(good, 5, seed=0)
    assert all(good[folds == k].any() and (~good[folds == k]).any() for k in range(5))
    assert sorted(np.bincount(folds)) == [8, 8, 8, 8, 8]
    assert (folds == stratified_folds(good, 5, seed=0)).all()
    assert not (folds == stratified_folds(good, 5, seed=1)).all()


def test_the_sql_of_the_fit_is_the_model_on_the_hand_fusions_scale():
    model = FittedFusion(-0.4, weights={"implicit": 2.0, "heuristic": 0.5}, missing={"implicit": -1.2})
    frame = pl.DataFrame({"implicit_score": [0.9, None, -0.5], "heuristic_score": [0.2, 0.6, -1.0]})
    con = duckdb.connect()
    con.register("frame", frame.to_arrow())
    sql = model.sql(implicit="implicit_score", heuristic="heuristic_score", llm="llm", explicit="explicit")
    got = [row[0] for row in con.sql(f"SELECT {sql} FROM frame").fetchall()]
    z = np.array([-0.4 + 1.8 + 0.1, -0.4 - 1.2 + 0.3, -0.4 - 1.0 - 0.5])
    assert got == pytest.approx(list(np.tanh(z / 2)))
    assert list(model.logit(frame)) == pytest.approx(list(z))
    assert got == pytest.approx(list(2 / (1 + np.exp(-z)) - 1))  # 2·P(good) − 1


def test_a_stored_row_gives_back_the_model():
    result = calibrate(planted(), CalibrationConfig())
    row = calibration_row(result, at=None)
    assert fitted_fusion(row) == result["model"]
    assert row["auc_after"] == {r["source"]: r["auc"] for r in result["agreement"]}[FITTED]
    assert row["llm_weight"] is None and row["implicit_missing"] is None


def test_min_per_class_must_cover_the_folds():
    with pytest.raises(ValueError, match="at least calibration.folds"):
        CalibrationConfig(folds=10, min_per_class=5)
