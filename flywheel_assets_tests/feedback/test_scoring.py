"""Implicit feedback against hand-computed cases, tier edges and attribution."""

import math
from datetime import datetime, timedelta, timezone

import duckdb
import pyarrow as pa
import pytest

from flywheel_assets.lib.config import FlywheelConfig, TierConfig
from flywheel_assets.lib.feedback.calibration import FittedFusion
from flywheel_assets.lib.feedback.scoring import classify_tiers, labelled_sources, session_feedback, trajectory_scores
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.tables import ANNOTATIONS, JUDGE_SCORES, SESSION_EVENTS, TRAJECTORIES

T0 = datetime(2026, 11, 26, 10, tzinfo=timezone.utc)


def _events(rows: list[tuple]) -> pa.Table:
    """rows: (session_id, event_type, trajectory_id, edit_ratio, minute)."""
    return conform(pa.Table.from_pylist([
        {"event_id": f"e{i}", "session_id": s, "event_type": kind, "trajectory_id": traj,
         "edit_ratio": ratio, "ts": T0 + timedelta(minutes=minute), "user_id": "u", "tenant_id": "default"}
        for i, (s, kind, traj, ratio, minute) in enumerate(rows)
    ]), SESSION_EVENTS)


def _con(events: pa.Table, trajectories: pa.Table | None = None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.register("session_events", events)
    con.register("trajectories", trajectories if trajectories is not None else TRAJECTORIES.schema.empty_table())
    return con


# (events of one session, hand-computed quality_score)
CASES = [
    ([("output_accepted", "t", None, 0)], 0.5 + 0.3 + 0.1),
    ([("output_accepted", "t", None, 0), ("session_continued", None, None, 1)], 1.0),
    ([("retry_requested", "t", None, 0)], 0.5 - 0.3),
    ([("retry_requested", "t", None, 0)] * 2 + [("output_accepted", "t", None, 3)], 0.5 + 0.3),
    ([("retry_requested", "t", None, m) for m in range(3)] + [("output_accepted", "t", None, 5)], 0.5 + 0.3 - 0.2),
    ([("retry_requested", "t", None, m) for m in range(4)], 0.5 - 0.3 - 0.2),
    ([("output_accepted", "t", None, 0), ("output_edited", "t", 0.4, 1)], 0.5 + 0.3 + 0.1 - 0.12),
    # the latest edit counts, whatever the file order
    ([("output_edited", "t", 0.2, 5), ("output_edited", "t", 1.0, 1), ("output_accepted", "t", None, 0)], 0.9 - 0.06),
    ([("output_accepted", "t", None, 0), ("error_reported", None, None, 1)], 0.5 + 0.3 + 0.1 - 0.4),
    ([("error_reported", None, None, 0)] + [("retry_requested", "t", None, m) for m in range(3)], -0.4),
    ([("retry_requested", "t", None, m) for m in range(3)] + [("error_reported", None, None, 4),
                                                              ("output_edited", "t", 1.0, 5)], -0.7),
    ([("output_accepted", "t", None, 0), ("thumbs_viewed", None, None, 1)], 0.9),
]


@pytest.mark.parametrize("events,expected", CASES)
def test_quality_score_matches_hand_computed(events, expected):
    table = _events([("s1", kind, traj, ratio, minute) for kind, traj, ratio, minute in events])
    result = session_feedback(_con(table), FlywheelConfig().scoring).to_pylist()
    assert len(result) == 1
    assert result[0]["quality_score"] == pytest.approx(expected)


def test_score_is_clamped_to_minus_one():
    weights = FlywheelConfig().scoring.model_copy(update={"error_reported": -3.0})
    table = _events([("s1", "error_reported", None, None, 0)])
    assert session_feedback(_con(table), weights).to_pylist()[0]["quality_score"] == -1.0


def test_every_session_is_scored_in_one_pass():
    rows = [(f"s{i}", "output_accepted", f"t{i}", None, 0) for i in range(1000)]
    rows += [(f"s{i}", "retry_requested", f"t{i}-old", None, -1) for i in range(0, 1000, 2)]
    result = session_feedback(_con(_events(rows)), FlywheelConfig().scoring)
    scores = dict(zip(result.column("session_id").to_pylist(), result.column("quality_score").to_pylist()))
    assert len(scores) == 1000
    assert scores["s0"] == pytest.approx(0.8) and scores["s1"] == pytest.approx(0.9)


def test_signals_and_attribution_columns():
    table = _events([
        ("s1", "retry_requested", "t-first", None, 0),
        ("s1", "output_accepted", "t-second", None, 2),
        ("s1", "output_edited", "t-second", 0.5, 3),
        ("s2", "session_continued", None, None, 0),
    ])
    trajectories = conform(pa.Table.from_pylist([
        {"trajectory_id": "t-s2", "session_id": "s2", "created_at": T0},
    ]), TRAJECTORIES)
    rows = {r["session_id"]: r for r in session_feedback(_con(table, trajectories), FlywheelConfig().scoring).to_pylist()}
    assert rows["s1"]["final_trajectory_id"] == "t-second"
    assert (rows["s1"]["task_accepted"], rows["s1"]["retry_count"], rows["s1"]["edit_ratio"]) == (True, 1, 0.5)
    assert rows["s2"]["final_trajectory_id"] == "t-s2"  # no event names one: the session's logged trajectory


@pytest.mark.parametrize("score,tier", [
    (1.0, "platinum"), (0.85, "platinum"), (0.8499, "gold"), (0.6, "gold"), (0.5999, "silver"),
    (0.3, "silver"), (0.2999, "bronze"), (-0.5, "bronze"), (-0.7, "bronze"), (-1.0, "bronze"),
])
def test_tier_edges_are_closed_below(score, tier):
    assert classify_tiers([score], [True], TierConfig()) == [tier]


def test_platinum_needs_a_human():
    assert classify_tiers([1.0, 0.9], [False, False], TierConfig()) == ["gold", "gold"]
    relaxed = TierConfig(platinum_requires_human=False)
    assert classify_tiers([0.9], [False], relaxed) == ["platinum"]


def test_fusion_attribution_and_annotation_override():
    config = FlywheelConfig()
    events = _events([
        ("s1", "retry_requested", "t-bad", None, 0),
        ("s1", "output_accepted", "t-good", None, 1),
        ("s1", "session_continued", None, None, 2),
    ])
    trajectories = conform(pa.Table.from_pylist([
        {"trajectory_id": "t-bad", "session_id": "s1", "origin": "usage", "is_synthetic": False, "created_at": T0},
        {"trajectory_id": "t-good", "session_id": "s1", "origin": "usage", "is_synthetic": False, "created_at": T0},
        {"trajectory_id": "t-syn", "origin": "synthetic", "is_synthetic": True, "reward": 0.8, "created_at": T0},
        {"trajectory_id": "t-gold", "origin": "golden", "is_synthetic": False, "created_at": T0},
        {"trajectory_id": "t-human", "origin": "usage", "is_synthetic": False, "created_at": T0},
    ]), TRAJECTORIES)
    con = _con(events, trajectories)
    con.register("session_feedback", session_feedback(con, config.scoring))
    con.register("judge_scores", conform(pa.Table.from_pylist([
        {"trajectory_id": "t-good", "judge_score": 0.0}, {"trajectory_id": "t-bad", "judge_score": -1.0},
        {"trajectory_id": "t-human", "judge_score": 1.0},
    ]), JUDGE_SCORES))
    con.register("annotations", conform(pa.Table.from_pylist([
        {"trajectory_id": "t-human", "score": 0.9, "annotated_at": T0},
        {"trajectory_id": "t-human", "score": -0.2, "annotated_at": T0 - timedelta(days=1)},
    ]), ANNOTATIONS))
    rows = {r["trajectory_id"]: r for r in trajectory_scores(con, config).to_pylist()}
    # session score 0.5+0.3+0.1 (one retry: no bonus, no penalty)... 0.5+0.3+0+0.1 = 0.9, fused 0.7*0.9 + 0.3*0
    assert rows["t-good"]["implicit_score"] == pytest.approx(0.9)
    assert rows["t-good"]["combined_score"] == pytest.approx(0.63)
    assert (rows["t-good"]["tier"], rows["t-good"]["weight"]) == ("gold", 2.0)
    # superseded: not accepted, one retry: 0.5 - 0.3 = 0.2; fused 0.7*0.2 + 0.3*(-1)
    assert rows["t-bad"]["attribution"] == "superseded"
    assert rows["t-bad"]["combined_score"] == pytest.approx(-0.16)
    assert rows["t-bad"]["tier"] == "bronze"
    assert (rows["t-syn"]["combined_score"], rows["t-syn"]["tier"]) == (pytest.approx(0.8), "gold")
    assert (rows["t-gold"]["tier"], rows["t-gold"]["score_source"]) == ("platinum", "golden")
    assert rows["t-human"]["annotation_score"] == 0.9  # the latest label wins
    assert (rows["t-human"]["tier"], rows["t-human"]["human_verified"]) == ("platinum", True)


def test_an_answer_the_user_turned_down_is_a_negative_example_whatever_the_judges_say():
    """Well-formed but wrong answers get high judge scores (judges check form): the seed's
    fusion would put a retried one in silver, 0.7·0.2 + 0.3·0.95 = 0.425."""
    events = _events([
        ("s1", "retry_requested", "t-retried", None, 0),
        ("s1", "output_accepted", "t-accepted", None, 1),
        ("s2", "retry_requested", "t-left", None, 0),  # retried, then the user left
        ("s3", "retry_requested", "t-labelled", None, 0),
        ("s3", "output_accepted", "t-s3", None, 1),
    ])
    trajectories = conform(pa.Table.from_pylist([
        {"trajectory_id": t, "session_id": s, "origin": "usage", "is_synthetic": False, "created_at": T0}
        for t, s in [("t-retried", "s1"), ("t-accepted", "s1"), ("t-left", "s2"), ("t-labelled", "s3"),
                     ("t-s3", "s3"), ("t-quiet", None)]
    ]), TRAJECTORIES)

    def scores(tiers: TierConfig) -> dict[str, dict]:
        config = FlywheelConfig(tiers=tiers)
        con = _con(events, trajectories)
        con.register("session_feedback", session_feedback(con, config.scoring))
        con.register("judge_scores", conform(pa.Table.from_pylist(
            [{"trajectory_id": t, "judge_score": 0.95} for t in trajectories.column("trajectory_id").to_pylist()]),
            JUDGE_SCORES))
        con.register("annotations", conform(pa.Table.from_pylist(
            [{"trajectory_id": "t-labelled", "score": 0.9, "annotated_at": T0}]), ANNOTATIONS))
        return {r["trajectory_id"]: r for r in trajectory_scores(con, config).to_pylist()}

    rows = scores(TierConfig())
    rejected = {t for t, r in rows.items() if r["user_rejected"]}
    assert rejected == {"t-retried", "t-left"}  # a human label outranks the user's retry
    assert rows["t-retried"]["combined_score"] == pytest.approx(0.425)
    assert (rows["t-retried"]["tier"], float(rows["t-retried"]["weight"])) == ("bronze", 0.3)
    assert rows["t-left"]["tier"] == "bronze"
    assert rows["t-accepted"]["tier"] == "gold" and rows["t-labelled"]["tier"] == "platinum"
    assert rows["t-quiet"]["tier"] == "gold"  # no feedback at all: the judges decide
    # the seed's rule, kept behind the switch, lets the retried answer into silver
    assert scores(TierConfig(rejected_is_negative=False))["t-retried"]["tier"] == "silver"


def test_thumbs_and_ratings_enter_the_fused_score_with_the_largest_weight():
    """explicit = the latest thumbs (±1) or rating ((r − 3) / 2) on that answer; it weighs 1.4
    beside implicit 0.7 and judges 0.3, and decides whether the user rejected the answer."""
    def event(i, session, kind, trajectory, minute, rating=None):
        return {"event_id": f"x{i}", "session_id": session, "event_type": kind, "trajectory_id": trajectory,
                "ts": T0 + timedelta(minutes=minute), "user_id": "u", "tenant_id": "default",
                "data_json": f'{{"rating": {rating}}}' if rating is not None else "{}"}

    events = conform(pa.Table.from_pylist([
        event(0, "s1", "output_accepted", "t-up", 0), event(1, "s1", "thumbs_up", "t-up", 1),
        event(2, "s2", "output_accepted", "t-down", 0), event(3, "s2", "thumbs_down", "t-down", 1),
        event(4, "s3", "retry_requested", "t-rated", 0), event(5, "s3", "rating", "t-rated", 1, 2),
        event(6, "s3", "rating", "t-rated", 2, 5),  # the latest rating counts: (5 − 3) / 2 = 1
        event(7, "s4", "rating", "t-only", 0, 1),  # no implicit signal, no judge: explicit alone, −1
        event(8, "s5", "rating", "t-junk", 0, 9),  # out of range: ignored
    ]), SESSION_EVENTS)
    trajectories = conform(pa.Table.from_pylist([
        {"trajectory_id": t, "session_id": s, "origin": "usage", "is_synthetic": False, "created_at": T0}
        for t, s in [("t-up", "s1"), ("t-down", "s2"), ("t-rated", "s3"), ("t-only", "s4"), ("t-junk", "s5")]
    ]), TRAJECTORIES)

    def scores(config: FlywheelConfig) -> dict[str, dict]:
        con = _con(events, trajectories)
        con.register("session_feedback", session_feedback(con, config.scoring))
        con.register("judge_scores", conform(pa.Table.from_pylist(
            [{"trajectory_id": "t-up", "judge_score": 0.5}]), JUDGE_SCORES))
        con.register("annotations", ANNOTATIONS.schema.empty_table())
        return {r["trajectory_id"]: r for r in trajectory_scores(con, config).to_pylist()}

    rows = scores(FlywheelConfig())
    # accepted on the first try: implicit 0.9; judge 0.5; thumbs up 1
    assert rows["t-up"]["combined_score"] == pytest.approx((0.7 * 0.9 + 0.3 * 0.5 + 1.4) / 2.4)
    assert rows["t-down"]["explicit_score"] == -1.0 and rows["t-down"]["user_rejected"]
    assert rows["t-down"]["combined_score"] == pytest.approx((0.7 * 0.9 - 1.4) / 2.1)
    assert rows["t-down"]["tier"] == "bronze"
    # the session's final trajectory, not accepted, one retry: 0.5 − 0.3 = 0.2
    assert rows["t-rated"]["explicit_score"] == 1.0 and not rows["t-rated"]["user_rejected"]
    assert rows["t-rated"]["combined_score"] == pytest.approx((0.7 * 0.2 + 1.4 * 1.0) / 2.1)
    # a rating is not one of the seed's five signals: the session has no implicit score
    assert (rows["t-only"]["implicit_score"], rows["t-only"]["combined_score"]) == (None, -1.0)
    assert rows["t-junk"]["explicit_score"] is None
    # explicit_weight 0: the seed's fusion exactly, thumbs and ratings ignored
    seed = scores(FlywheelConfig(fusion={"explicit_weight": 0.0}))
    assert seed["t-up"]["combined_score"] == pytest.approx(0.7 * 0.9 + 0.3 * 0.5)
    assert seed["t-down"]["combined_score"] == pytest.approx(0.9) and not seed["t-down"]["user_rejected"]


def _calibration_lake():
    """t-good accepted after one retry (implicit 0.8), t-bad the retried one (superseded, 0.2), t-quiet no event,
    t-human labelled twice; heuristic and judge scores by hand."""
    events = _events([
        ("s1", "retry_requested", "t-bad", None, 0),
        ("s1", "output_accepted", "t-good", None, 1),
    ])
    trajectories = conform(pa.Table.from_pylist([
        {"trajectory_id": t, "session_id": s, "origin": origin, "is_synthetic": False, "created_at": T0}
        for t, s, origin in [("t-bad", "s1", "usage"), ("t-good", "s1", "usage"), ("t-quiet", None, "usage"),
                             ("t-human", "s1", "usage"), ("t-golden", None, "golden")]
    ]), TRAJECTORIES)
    config = FlywheelConfig()
    con = _con(events, trajectories)
    con.register("session_feedback", session_feedback(con, config.scoring))
    con.register("judge_scores", conform(pa.Table.from_pylist([
        {"trajectory_id": t, "heuristic_score": h, "judge_score": h}
        for t, h in [("t-good", 0.2), ("t-bad", 1.0), ("t-quiet", 0.6), ("t-human", -0.2)]]), JUDGE_SCORES))
    con.register("annotations", conform(pa.Table.from_pylist([
        {"trajectory_id": "t-human", "score": -0.7, "annotated_at": T0},
        {"trajectory_id": "t-human", "score": 0.9, "annotated_at": T0 - timedelta(days=1)},
    ]), ANNOTATIONS))
    return con, config


def test_the_fitted_fusion_replaces_the_hand_weights_and_nothing_else():
    con, config = _calibration_lake()
    model = FittedFusion(0.3, weights={"implicit": 3.0, "heuristic": 0.5}, missing={"implicit": -2.0})
    hand = {r["trajectory_id"]: r for r in trajectory_scores(con, config).to_pylist()}
    fitted = {r["trajectory_id"]: r for r in trajectory_scores(con, config, model).to_pylist()}
    for trajectory_id, z in [("t-good", 0.3 + 3.0 * 0.8 + 0.5 * 0.2), ("t-bad", 0.3 + 3.0 * 0.2 + 0.5 * 1.0),
                             ("t-quiet", 0.3 - 2.0 + 0.5 * 0.6)]:
        assert fitted[trajectory_id]["combined_score"] == pytest.approx(math.tanh(z / 2)), trajectory_id
        # the seed's quality_score and its attribution are the same under either fusion
        assert fitted[trajectory_id]["implicit_score"] == hand[trajectory_id]["implicit_score"]
        assert fitted[trajectory_id]["user_rejected"] == hand[trajectory_id]["user_rejected"]
    assert hand["t-good"]["implicit_score"] == pytest.approx(0.8)
    assert hand["t-bad"]["implicit_score"] == pytest.approx(0.2)
    assert hand["t-good"]["combined_score"] == pytest.approx(0.7 * 0.8 + 0.3 * 0.2)
    assert fitted["t-good"]["tier"] == "gold" and hand["t-good"]["tier"] == "gold"
    # by the judges alone t-quiet sits on gold's edge; the fit learnt that no user event is a bad sign
    assert fitted["t-quiet"]["tier"] == "bronze" and hand["t-quiet"]["tier"] == "gold"
    # a human label and a golden row still decide their own score
    assert fitted["t-human"]["combined_score"] == -0.7 and fitted["t-golden"]["combined_score"] == 1.0


def test_labelled_sources_keep_the_hand_fusion_the_label_replaced():
    con, config = _calibration_lake()
    [row] = labelled_sources(con, config).to_pylist()
    assert (row["trajectory_id"], row["label"]) == ("t-human", -0.7)  # the latest label
    # no event names t-human and s1's final trajectory is t-good: no implicit score, the judges alone
    assert (row["implicit_score"], row["heuristic_score"], row["llm_score"]) == (None, -0.2, None)
    assert row["hand_score"] == pytest.approx(-0.2)
