"""Scores calibrated against people: how well each score source agrees with the human labels,
and the fusion of the sources fitted to them.

What a label is: `flywheel annotate` writes a score in [-1, 1], ±1 for `--label good|bad`, and
the demo's labels are graded but two-sided (-0.98…-0.31 "bad: …", 0.66…0.98 "correct"). Its
sign is the verdict, so the fit is a logistic regression of good (label > 0) on the sources,
and agreement is the AUC: the chance that a good trajectory scores above a bad one (0.5 is a
coin; ties count half). When the labels are graded (more than two values) Spearman's rank
correlation with the label is reported beside it. A label of 0 is no verdict and is left out.

Missing sources are 0-filled with a missing indicator each, not mean-filled: a source's absence
is not random here (no implicit score means no user event named the trajectory, an LLM grade
waits for the judge's budget), so the fit learns what absence says, and 0 is the neutral middle
of every source's [-1, 1]. A source no label has is left out of the fit; one every label has
gets no indicator.

"after" is judged out of fold (k-fold, stratified), never on the labels the weights were fitted
to. scipy only: scikit-learn is not a dependency.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import polars as pl
from scipy.optimize import minimize
from scipy.special import expit
from scipy.stats import rankdata, spearmanr

from flywheel_assets.lib.config import CalibrationConfig
from flywheel_assets.lib.feedback.judges import JUDGES
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import SCORE_CALIBRATIONS

SOURCES = ("implicit", "heuristic", "llm", "explicit")  # each a `<source>_score` column
# what agreement is reported for: the fitted sources, each heuristic judge, the hand fusion
REPORTED = (*SOURCES, *JUDGES, "hand_fusion")
HAND = "hand_fusion"
FITTED = "fitted_fusion"


def column(source: str) -> str:
    if source in JUDGES:
        return source
    return "hand_score" if source == HAND else f"{source}_score"


@dataclass(frozen=True)
class FittedFusion:
    """P(good) = σ(intercept + Σ weight·score + Σ missing·[score is null]), a null score counting 0."""

    intercept: float
    weights: dict[str, float] = field(default_factory=dict)
    missing: dict[str, float] = field(default_factory=dict)

    def logit(self, frame: pl.DataFrame) -> np.ndarray:
        z = np.full(frame.height, self.intercept)
        for source, weight in self.weights.items():
            z += weight * frame[column(source)].fill_null(0.0).to_numpy()
        for source, weight in self.missing.items():
            z += weight * frame[column(source)].is_null().to_numpy()
        return z

    def sql(self, **columns: str) -> str:
        """The fitted score as SQL over the named source columns: tanh(z/2) = 2·P(good) − 1, on the
        hand fusion's [-1, 1], so the tier edges keep their meaning (gold ≥ 0.6 is P(good) ≥ 0.8)."""
        terms = [repr(float(self.intercept))]
        terms += [f"{float(w)!r} * coalesce({columns[s]}, 0.0)" for s, w in self.weights.items()]
        terms += [f"{float(w)!r} * ({columns[s]} IS NULL)::INT" for s, w in self.missing.items()]
        return f"tanh(({' + '.join(terms)}) / 2.0)"


def auc(scores: np.ndarray, good: np.ndarray) -> float | None:
    """Mann-Whitney AUC with average ranks for ties; None without both verdicts."""
    positives = int(good.sum())
    negatives = len(good) - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[good].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def spearman(scores: np.ndarray, labels: np.ndarray) -> float | None:
    if len(scores) < 3 or np.ptp(scores) == 0 or np.ptp(labels) == 0:
        return None
    return float(spearmanr(scores, labels).statistic)


def fit_logistic(x: np.ndarray, good: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """(intercept, weights) minimising the summed log-loss + l2/2·|weights|² (intercept unpenalised)."""
    sign = np.where(good, 1.0, -1.0)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weights = theta[1:]
        margin = sign * (theta[0] + x @ weights)
        slope = -sign * expit(-margin)  # d log(1 + e^(-margin)) / dz
        value = np.logaddexp(0.0, -margin).sum() + 0.5 * l2 * weights @ weights
        return float(value), np.concatenate([[slope.sum()], x.T @ slope + l2 * weights])

    share = np.clip(good.mean(), 1e-3, 1 - 1e-3)
    start = np.concatenate([[np.log(share / (1 - share))], np.zeros(x.shape[1])])
    result = minimize(loss, start, jac=True, method="L-BFGS-B", options={"maxiter": 1000})
    return float(result.x[0]), result.x[1:]


def stratified_folds(good: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold per row, each verdict dealt round-robin in a seeded shuffle: the same labels (the rows
    come sorted by trajectory_id) always fall in the same folds."""
    rng = np.random.default_rng(seed)
    assigned = np.empty(len(good), dtype=int)
    dealt = 0
    for verdict in (True, False):
        rows = np.flatnonzero(good == verdict)
        rng.shuffle(rows)
        assigned[rows] = (np.arange(len(rows)) + dealt) % folds
        dealt += len(rows)
    return assigned


def design(frame: pl.DataFrame, sources: list[str]) -> list[tuple[str, str]]:
    """The model's columns, (source, "score" | "missing"), from which sources the labels have."""
    columns = []
    for source in sources:
        present = frame[column(source)].is_not_null().sum()
        if present:
            columns.append((source, "score"))
            if present < frame.height:
                columns.append((source, "missing"))
    return columns


def _matrix(frame: pl.DataFrame, columns: list[tuple[str, str]]) -> np.ndarray:
    values = [frame[column(source)].fill_null(0.0).to_numpy() if kind == "score"
              else frame[column(source)].is_null().to_numpy().astype(float) for source, kind in columns]
    return np.column_stack(values) if values else np.empty((frame.height, 0))


def _agreement(source: str, scores: pl.Series, good: np.ndarray, labels: np.ndarray, graded: bool) -> dict:
    present = scores.is_not_null().to_numpy()
    values = scores.fill_null(0.0).to_numpy()[present]
    return {"source": source, "labels": int(present.sum()), "auc": auc(values, good[present]),
            "spearman": spearman(values, labels[present]) if graded else None}


def too_few(good: np.ndarray, settings: CalibrationConfig) -> str:
    """Why these labels are too few to fit ("" when they suffice)."""
    bad = len(good) - int(good.sum())
    if len(good) < settings.min_labels:
        return f"{len(good)} labels with a verdict, fewer than calibration.min_labels ({settings.min_labels})"
    if min(int(good.sum()), bad) < settings.min_per_class:
        return (f"{int(good.sum())} good and {bad} bad labels: each verdict needs calibration.min_per_class "
                f"({settings.min_per_class})")
    return ""


def calibrate(labelled: pl.DataFrame, settings: CalibrationConfig, use_explicit: bool = True) -> dict:
    """Agreement of every source with the labels, and the fitted fusion when there are enough labels.

    `labelled` is scoring.labelled_sources: label, the <source>_score columns, each judge, hand_score
    (the hand-weighted fusion the label replaced). `use_explicit` False (fusion.explicit_weight 0)
    leaves thumbs and ratings out of the fit as they are out of the hand fusion."""
    frame = labelled.filter(pl.col("label") != 0).sort("trajectory_id")
    labels = frame["label"].to_numpy()
    good = labels > 0
    graded = frame["label"].n_unique() > 2
    agreement = [_agreement(source, frame[column(source)], good, labels, graded) for source in REPORTED]
    result = {
        "labels": len(labels), "good": int(good.sum()), "bad": int((~good).sum()),
        "no_verdict": labelled.height - frame.height, "graded": graded, "agreement": agreement,
        "before": next(row for row in agreement if row["source"] == HAND), "after": None,
        "fitted": False, "reason": too_few(good, settings), "model": None,
        "inputs_sha256": inputs_sha256(labelled, settings, use_explicit),
    }
    if result["reason"]:
        return result
    columns = design(frame, [s for s in SOURCES if use_explicit or s != "explicit"])
    x = _matrix(frame, columns)
    folds = stratified_folds(good, settings.folds, settings.seed)
    out_of_fold = np.empty(len(labels))
    for fold in range(settings.folds):
        held_out = folds == fold
        intercept, weights = fit_logistic(x[~held_out], good[~held_out], settings.l2)
        out_of_fold[held_out] = intercept + x[held_out] @ weights
    intercept, weights = fit_logistic(x, good, settings.l2)
    model = FittedFusion(
        intercept, weights={s: float(w) for (s, kind), w in zip(columns, weights) if kind == "score"},
        missing={s: float(w) for (s, kind), w in zip(columns, weights) if kind == "missing"})
    after = {"source": FITTED, "labels": len(labels), "auc": auc(out_of_fold, good),
             "spearman": spearman(out_of_fold, labels) if graded else None,
             "in_sample_auc": auc(model.logit(frame), good), "folds": settings.folds}
    return result | {"after": after, "agreement": agreement + [after], "fitted": True, "model": model}


def inputs_sha256(frame: pl.DataFrame, settings: CalibrationConfig, use_explicit: bool) -> str:
    """Changes exactly when a refit could: another label, another source value, other settings."""
    payload = json.dumps([frame.sort("trajectory_id").select("trajectory_id", "label",
                                                             *(column(s) for s in REPORTED)).rows(),
                          settings.model_dump(), use_explicit], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def calibration_row(result: dict, at: datetime) -> dict:
    """One row of gold/score_calibrations."""
    model: FittedFusion | None = result["model"]
    after = result["after"] or {}
    row = {"calibrated_at": at, "inputs_sha256": result["inputs_sha256"], "labels": result["labels"],
           "good": result["good"], "fitted": result["fitted"], "reason": result["reason"],
           "intercept": model.intercept if model else None,
           "auc_before": result["before"]["auc"], "auc_after": after.get("auc"),
           "spearman_before": result["before"]["spearman"], "spearman_after": after.get("spearman"),
           "agreement_json": json.dumps(result["agreement"])}
    for source in SOURCES:
        row[f"{source}_weight"] = model.weights.get(source) if model else None
        row[f"{source}_missing"] = model.missing.get(source) if model else None
    return row


def fitted_fusion(row: dict | None) -> FittedFusion | None:
    """The model a score_calibrations row holds; None when it holds no fit."""
    if not row or not row["fitted"]:
        return None
    return FittedFusion(
        row["intercept"],
        weights={s: row[f"{s}_weight"] for s in SOURCES if row[f"{s}_weight"] is not None},
        missing={s: row[f"{s}_missing"] for s in SOURCES if row[f"{s}_missing"] is not None})


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def agreement_markdown(result: dict) -> str:
    lines = ["| source | labels | AUC | Spearman |", "|---|---:|---:|---:|"]
    lines += [f"| {row['source']} | {row['labels']} | {_number(row['auc'])} | {_number(row['spearman'])} |"
              for row in result["agreement"]]
    return "\n".join(lines)


def weights_markdown(model: FittedFusion | None) -> str:
    if model is None:
        return "no fit"
    lines = ["| term | weight |", "|---|---:|", f"| intercept | {model.intercept:+.3f} |"]
    lines += [f"| {source} score | {weight:+.3f} |" for source, weight in model.weights.items()]
    lines += [f"| {source} missing | {weight:+.3f} |" for source, weight in model.missing.items()]
    return "\n".join(lines)


def latest_calibration(lake: Lake) -> dict | None:
    """The newest row of gold/score_calibrations (a row per change of the labels: a small table)."""
    rows = lake.read(SCORE_CALIBRATIONS).to_pylist()
    return max(reversed(rows), key=lambda row: row["calibrated_at"]) if rows else None
