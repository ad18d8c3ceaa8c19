"""Which trajectories a person should label next (`flywheel annotate --next N`).

Two kinds of trajectory teach the calibration most per label: those whose score sources disagree
(implicit feedback says one thing, the judges or the user's thumbs another: the fusion is a guess
there), and those whose combined score sits nearest a tier edge (a label there decides which
tier, and so which training weight, the trajectory gets). The queue deals from both lists in
turn, the widest disagreement first, then the nearest edge, each list in a fixed order (ties by
trajectory id), skipping a trajectory already dealt.

Only the users' own trajectories (origin usage or imported) are offered: a teacher's row carries
its line's reward rather than a user's behaviour, and golden rows are labelled already. A
trajectory labelled in bronze/annotations, or in an annotation file still waiting in the landing
zone, is never offered again. A trajectory its user rejected is bronze whatever its score (tiers
.rejected_is_negative), so it is offered for its disagreement only, never for an edge.
"""

from __future__ import annotations

import json

import polars as pl

from flywheel_assets.lib.config import FlywheelConfig, TierConfig
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import ANNOTATIONS, TRAJECTORY_SCORES

COMPARED = ("implicit_score", "judge_score", "explicit_score")
OFFERED_ORIGINS = ("usage", "imported")
DISAGREEMENT = "disagreement"
TIER_EDGE = "tier edge"
# equal spreads and distances must tie exactly (then the id decides), not by float noise
_DIGITS = 9
COLUMNS = ("trajectory_id", "task_type", "origin", "human_verified", "user_rejected", "combined_score", "tier",
           *COMPARED)


def tier_edges(tiers: TierConfig) -> list[float]:
    """The edges an automatic score can cross: every tier's lower edge but the last tier's (−1), and
    platinum's only when an automatic score may reach platinum."""
    edges = [tier.lower for tier in tiers.tiers[:-1]]
    return edges[1:] if tiers.platinum_requires_human else edges


def next_to_label(scores: pl.DataFrame, labelled: set[str], tiers: TierConfig, n: int) -> list[dict]:
    """Up to n rows of `scores` (gold/trajectory_scores columns) most worth a label, in order, each with
    its reason, the sources' spread (max − min of those present) and its nearest tier edge."""
    edges = tier_edges(tiers)
    combined = pl.col("combined_score")
    distances = [(combined - edge).abs().round(_DIGITS) for edge in edges]
    nearest_distance = pl.min_horizontal(distances) if edges else pl.lit(None, dtype=pl.Float64)
    candidates = scores.filter(
        pl.col("origin").is_in(OFFERED_ORIGINS) & ~pl.col("human_verified").fill_null(False)
        & ~pl.col("trajectory_id").is_in(sorted(labelled))
    ).with_columns(
        spread=(pl.max_horizontal(*COMPARED) - pl.min_horizontal(*COMPARED)).round(_DIGITS),
        edge_distance=pl.when(pl.col("user_rejected").fill_null(False)).then(None).otherwise(nearest_distance),
    ).with_columns(nearest_edge=_nearest(distances, edges))
    by_disagreement = candidates.filter(pl.col("spread") > 0).sort(
        ["spread", "trajectory_id"], descending=[True, False]).to_dicts()
    by_edge = candidates.filter(pl.col("edge_distance").is_not_null()).sort(
        ["edge_distance", "trajectory_id"]).to_dicts()
    return _deal([(DISAGREEMENT, by_disagreement), (TIER_EDGE, by_edge)], n)


def _pattern(row: dict) -> tuple:
    return (row["task_type"], row["user_rejected"], *(row[name] for name in COMPARED))


def _deal(ranked: list[tuple[str, list[dict]]], n: int) -> list[dict]:
    """One row from each list in turn, skipping rows dealt already. While they last, a row whose task
    type and source values match one dealt already waits for a second pass: every fusion scores the
    two alike (thousands of judges-only rows sit exactly on 0.6), so the first label of a pattern
    teaches more than the second."""
    queue: list[dict] = []
    dealt: set[str] = set()
    patterns: set[tuple] = set()
    for distinct in (True, False):
        positions = [0] * len(ranked)
        active = set(range(len(ranked)))
        while active and len(queue) < n:
            for index, (reason, rows) in enumerate(ranked):
                if index not in active or len(queue) == n:
                    continue
                position = positions[index]
                while position < len(rows) and (rows[position]["trajectory_id"] in dealt
                                                 or (distinct and _pattern(rows[position]) in patterns)):
                    position += 1
                positions[index] = position + 1
                if position == len(rows):
                    active.discard(index)
                    continue
                row = rows[position]
                dealt.add(row["trajectory_id"])
                patterns.add(_pattern(row))
                queue.append({"rank": len(queue) + 1, "reason": reason, **row})
    return queue


def _nearest(distances: list[pl.Expr], edges: list[float]) -> pl.Expr:
    nearest = pl.lit(None, dtype=pl.Float64)
    for distance, edge in reversed(list(zip(distances, edges))):  # the first edge wins a tie
        nearest = pl.when(distance == pl.col("edge_distance")).then(pl.lit(edge)).otherwise(nearest)
    return nearest


def labelled_ids(config: FlywheelConfig, lake: Lake) -> set[str]:
    """Trajectories with a label in bronze/annotations or in a landing annotation file not ingested yet
    (`flywheel annotate` writes there; landing_sensor may not have run since)."""
    from flywheel_assets.lib.ingest.landing import READ_ERRORS, list_landing, open_landing_file
    from flywheel_assets.lib.ingest.pipeline import pending_files

    labelled = set(lake.read(ANNOTATIONS, columns=["trajectory_id"]).column("trajectory_id").to_pylist())
    waiting = [f for f in list_landing(config.landing) if f.kind == "annotations" and f.problem is None]
    for landing_file in pending_files(config, lake, waiting):
        try:
            with open_landing_file(landing_file.path) as handle:
                lines = handle.read().splitlines()
        except READ_ERRORS:
            continue  # the ingest will quarantine it; nothing in it is a label yet
        for line in lines:
            try:
                trajectory_id = json.loads(line).get("trajectory_id")
            except (ValueError, AttributeError):
                continue
            if isinstance(trajectory_id, str):
                labelled.add(trajectory_id)
    return labelled


def label_queue(config: FlywheelConfig, lake: Lake, n: int) -> list[dict]:
    """next_to_label over the lake's latest scores."""
    scores = pl.from_arrow(lake.read(TRAJECTORY_SCORES, columns=list(COLUMNS)))
    return next_to_label(scores, labelled_ids(config, lake), config.tiers, n)


def render_queue(queue: list[dict]) -> str:
    """The queue as a table for a terminal."""
    if not queue:
        return "nothing to label: every scored usage trajectory has a label"
    width = max(len("trajectory"), *(len(row["trajectory_id"]) for row in queue))

    def number(value: float | None, size: int) -> str:
        return f"{'–':>{size}}" if value is None else f"{value:>+{size}.2f}"

    lines = [f"{'rank':>4}  {'trajectory':<{width}}  {'reason':<12} {'spread':>6} {'edge':>5} {'combined':>8} "
             f"{'tier':<8} {'implicit':>8} {'judge':>6} {'explicit':>8}"]
    for row in queue:
        edge = f"{'–':>5}" if row["nearest_edge"] is None else f"{row['nearest_edge']:>5.2f}"
        lines.append(f"{row['rank']:>4}  {row['trajectory_id']:<{width}}  {row['reason']:<12} "
                     f"{row['spread'] or 0:>6.2f} {edge} {number(row['combined_score'], 8)} {row['tier']:<8} "
                     f"{number(row['implicit_score'], 8)} {number(row['judge_score'], 6)} "
                     f"{number(row['explicit_score'], 8)}")
    lines.append("label one with: flywheel annotate TRAJECTORY_ID --label good|bad (or --score S)")
    return "\n".join(lines)
