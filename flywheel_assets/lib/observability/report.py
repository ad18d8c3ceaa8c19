"""Charts and JSON files of the flywheel's health, under FLYWHEEL_HOME/reports/.

Each chart function writes one PNG (matplotlib, Agg: no display needed) and returns its
path, or None when there is nothing to draw yet.
"""

from __future__ import annotations

import json
from pathlib import Path

from flywheel_assets.lib.observability.velocity import SEED_STAGES, STEPS

TIER_COLOURS = {"platinum": "#7f7f7f", "gold": "#d4a017", "silver": "#a8b3bd", "bronze": "#a0522d"}
STAGE_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


def write_json(result: dict, path: Path) -> Path:
    """The measurement as JSON (datetimes as ISO text), written atomically for readers such as the CLI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(result, default=lambda value: value.isoformat() if hasattr(value, "isoformat")
                                    else str(value), indent=2))
    temporary.replace(path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    _pyplot().close(figure)
    return path


def _label(cycle: str | None) -> str:
    return cycle or "open"


def velocity_chart(result: dict, path: Path) -> Path | None:
    """Days per seed stage for every cycle (stacked), and trajectories per day at each step."""
    turns = [t for t in result["turns"] if t["cycle_days"] > 0 or t["cycle"]]
    if not turns and not result["steps"][0]["trajectories"]:
        return None
    plt = _pyplot()
    figure, (by_stage, by_step) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    labels = [_label(t["cycle"]) for t in turns]
    left = [0.0] * len(turns)
    for stage, colour in zip(SEED_STAGES, STAGE_COLOURS):
        days = [t["stages"][stage.key] for t in turns]
        by_stage.barh(labels, days, left=left, color=colour, label=stage.name)
        left = [a + b for a, b in zip(left, days)]
    by_stage.invert_yaxis()
    by_stage.set_xlabel("days")
    by_stage.legend(loc="lower right", fontsize=7)
    bottleneck = result["bottleneck"]
    by_stage.set_title(f"Velocity {result['velocity_score']:.2f} promotions/week · bottleneck: {bottleneck['name']}",
                       fontsize=10)
    names = [name for name, _ in STEPS]
    by_step.bar(names, [row["per_day"] for row in result["steps"]], color="#4c72b0")
    by_step.set_ylabel("trajectories per day (recent)")
    yield_text = "n/a" if result["data_yield"] is None else f"{result['data_yield']:.0%}"
    by_step.set_title(f"Throughput by step · data yield {yield_text}", fontsize=10)
    return _save(figure, path)


def quality_trend_chart(health: dict, path: Path) -> Path | None:
    """Per cycle window: held-out success (verifier) against online acceptance and session quality (users)."""
    rows = [r for r in health["cycles"] if r["usage_trajectories"] or r["cycle"]]
    if not rows:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 3.8))
    labels = [_label(r["cycle"]) for r in rows]
    series = (("candidate_success", "held-out success, candidate", "o-"),
              ("best_champion_success", "held-out success, best champion", "s--"),
              ("heldout_success", "held-out success of the versions serving", "^:"),
              ("online_acceptance", "first attempts accepted as is (users)", "o-"),
              ("online_quality", "mean session quality (users)", "d-"))
    for key, name, style in series:
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            axis.plot(labels, [float("nan") if v is None else v for v in values], style, label=name)
    axis.set_ylim(-0.05, 1.05)
    axis.set_ylabel("share / score")
    axis.legend(loc="lower left", fontsize=7)
    axis.set_title(f"Quality trend · loop health: {health['status']}", fontsize=10)
    return _save(figure, path)


def tier_mix_chart(health: dict, path: Path) -> Path | None:
    """Each cycle's training set: rows per tier, and where the rows came from."""
    rows = [r for r in health["cycles"] if r.get("tier_counts")]
    if not rows:
        return None
    plt = _pyplot()
    figure, (tiers, sources) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [r["cycle"] for r in rows]
    bottom = [0] * len(rows)
    for tier, colour in TIER_COLOURS.items():
        counts = [r["tier_counts"].get(tier, 0) for r in rows]
        tiers.bar(labels, counts, bottom=bottom, color=colour, label=tier)
        bottom = [a + b for a, b in zip(bottom, counts)]
    tiers.set_ylabel("training rows")
    tiers.legend(fontsize=7)
    tiers.set_title("Tier mix per cycle", fontsize=10)
    shares = {"human-verified": [r["human_share"] for r in rows],
              "teacher (synthetic, corrections)": [r["synthetic_share"] for r in rows],
              "served by own adapters": [r["self_generated_share"] for r in rows]}
    shares["usage served by the base"] = [max(0.0, 1 - sum(values)) for values in zip(*shares.values())]
    bottom = [0.0] * len(rows)
    for (name, values), colour in zip(shares.items(), ("#55a868", "#8172b3", "#c44e52", "#4c72b0")):
        sources.bar(labels, values, bottom=bottom, color=colour, label=name)
        bottom = [a + b for a, b in zip(bottom, values)]
    sources.set_ylim(0, 1)
    sources.set_ylabel("share of rows")
    sources.legend(fontsize=7)
    sources.set_title("Where the training rows came from", fontsize=10)
    return _save(figure, path)


def calibration_chart(result: dict, path: Path) -> Path | None:
    """Each score source's AUC against the human labels beside the hand-weighted and the fitted
    fusion (out of fold), and the fitted weights; None before the first label with a verdict."""
    rows = [row for row in result["agreement"] if row["auc"] is not None]
    if not rows:
        return None
    plt = _pyplot()
    figure, (agreement, weights) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    colours = {"hand_fusion": "#dd8452", "fitted_fusion": "#55a868"}
    agreement.barh([f"{row['source']} ({row['labels']})" for row in rows], [row["auc"] for row in rows],
                   color=[colours.get(row["source"], "#4c72b0") for row in rows])
    agreement.axvline(0.5, color="#7f7f7f", linestyle="--", linewidth=1)
    agreement.set_xlim(0, 1)
    agreement.invert_yaxis()
    agreement.set_xlabel("AUC against the human verdicts (labels covered)")
    agreement.set_title(f"Agreement with people · {result['good']} good, {result['bad']} bad labels", fontsize=10)
    model = result["model"]
    if model is None:
        weights.axis("off")
        weights.text(0.0, 0.5, f"no fit: {result['reason']}", wrap=True, fontsize=9)
    else:
        terms = {**{f"{s} score": w for s, w in model.weights.items()},
                 **{f"{s} missing": w for s, w in model.missing.items()}}
        weights.barh(list(terms), list(terms.values()), color="#55a868")
        weights.axvline(0.0, color="#7f7f7f", linewidth=1)
        weights.invert_yaxis()
        weights.set_xlabel("logistic weight (log-odds per unit)")
        weights.set_title(f"Fitted fusion · intercept {model.intercept:+.2f}", fontsize=10)
    return _save(figure, path)
