"""Refreshes that fold in only what is new give the table a full recompute gives, whatever
order and batches the rows arrive in; they say when and why they recompute in full."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from flywheel_assets.lib.feedback.refresh_scores import (
    refresh_judge_scores, refresh_session_feedback, refresh_trajectory_scores,
)
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.tables import (
    ANNOTATIONS, JUDGE_SCORES, SESSION_EVENTS, SESSION_FEEDBACK, TRAJECTORIES, TRAJECTORY_SCORES,
)

T0 = datetime(2026, 11, 1, 9, tzinfo=timezone.utc)
KINDS = ["output_accepted", "retry_requested", "output_edited", "session_continued", "error_reported",
         "thumbs_up", "thumbs_down", "rating", "page_view"]


def _world(seed: int, sessions: int = 60) -> list[dict]:
    """Rows of every kind, each stamped with the batch (ingest) it arrives in: events often
    before their trajectory, late events that move a session's first day, ties in time."""
    rng = random.Random(seed)
    rows = []
    for s in range(sessions):
        day = rng.randrange(6)
        start = T0 + timedelta(days=day, minutes=rng.randrange(600))
        trajectories = [f"t{s}-{k}" for k in range(rng.randint(1, 3))]
        for k, trajectory in enumerate(trajectories):
            text = "word " * rng.choice([3, 4, 5, 40, 400])
            rows.append(("trajectories", min(5, day + rng.choice([0, 0, 1, 2])), {
                "trajectory_id": trajectory, "session_id": f"s{s}", "task_type": rng.choice(["calc", "qa"]),
                "origin": "usage", "is_synthetic": False, "created_at": start + timedelta(minutes=k),
                "turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}],
                "tool_calls": [], "tools_offered": [], "final_response": text}))
        for e in range(rng.randint(0, 7)):
            kind = rng.choice(KINDS)
            late = rng.random() < 0.1
            ts = start + timedelta(minutes=rng.choice([0, 1, 1, 2, 5]) - (2000 if late else 0))
            rows.append(("events", min(5, day + rng.choice([0, 0, 1, 3])), {
                "event_id": f"e{s}-{e}", "session_id": f"s{s}", "event_type": kind, "ts": ts,
                "trajectory_id": rng.choice(trajectories + [None]), "user_id": f"u{s % 7}", "tenant_id": "default",
                "edit_ratio": rng.choice([0.1, 0.5, 0.9]) if kind == "output_edited" else None,
                "data_json": json.dumps({"rating": rng.randint(0, 6)} if kind == "rating" else {})}))
        if rng.random() < 0.2:
            rows.append(("annotations", rng.randrange(6), {
                "annotation_id": f"a{s}", "trajectory_id": trajectories[0], "score": rng.choice([-1.0, 0.5, 1.0]),
                "annotator": "ann", "annotated_at": start + timedelta(hours=rng.randrange(3))}))
    return rows


TABLES = {"events": SESSION_EVENTS, "trajectories": TRAJECTORIES, "annotations": ANNOTATIONS}


def _ingest(lake, rows: list[dict], batch: int) -> None:
    at = datetime.now(timezone.utc)
    for kind, table in TABLES.items():
        batch_rows = [{**row, "ingested_at": at} for k, b, row in rows if k == kind and b == batch]
        if batch_rows:
            lake.append(table, conform(pa.Table.from_pylist(batch_rows), table))


def _refresh_all(lake, config, full: bool = False) -> list:
    return [refresh_session_feedback(lake, config, full=full), refresh_judge_scores(lake, config, full=full),
            refresh_trajectory_scores(lake, config, full=full)]


def _snapshot(lake) -> dict:
    snapshot = {}
    for table in (SESSION_FEEDBACK, JUDGE_SCORES, TRAJECTORY_SCORES):
        rows = lake.read(table).drop_columns(["updated_at"]).to_pylist()
        snapshot[table.name] = sorted(rows, key=lambda r: r[table.key[0]])
    return snapshot


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batch_by_batch_equals_the_full_recompute(lake, config, seed):
    world = _world(seed)
    modes = []
    for batch in range(6):
        _ingest(lake, world, batch)
        modes.append([outcome.full for outcome in _refresh_all(lake, config)])
    assert modes[0] == [True, True, True] and all(mode == [False, False, False] for mode in modes[1:])
    incremental = _snapshot(lake)
    assert len(incremental["trajectory_scores"]) == sum(1 for kind, _, _ in world if kind == "trajectories")
    outcomes = _refresh_all(lake, config, full=True)
    assert [o.reason for o in outcomes] == ["asked for a full recompute"] * 3
    assert _snapshot(lake) == incremental


def test_a_refresh_writes_only_what_new_rows_touch(lake, config):
    world = _world(4, sessions=80)
    for batch in range(5):
        _ingest(lake, world, batch)
    _refresh_all(lake, config)
    before = {r["session_id"]: r for r in lake.read(SESSION_FEEDBACK).to_pylist()}
    _ingest(lake, [("events", 9, {"event_id": "late", "session_id": "s3", "event_type": "retry_requested",
                                  "ts": T0, "trajectory_id": None, "user_id": "u3"})], 9)
    sessions, judges, scores = _refresh_all(lake, config)
    assert (sessions.full, sessions.rows.num_rows, sessions.new_rows) == (False, 1, {"session_events": 1,
                                                                                      "trajectories": 0})
    assert sessions.rows.column("retry_count").to_pylist()[0] == before.get("s3", {}).get("retry_count", 0) + 1
    assert judges.rows.num_rows == 0
    # the session's final trajectory (and the one it was before, if it changed) are redone, nothing else
    assert 1 <= scores.rows.num_rows <= 2


def test_rows_that_do_not_add_up_and_new_settings_recompute_in_full(lake, config):
    world = _world(5)
    _ingest(lake, world, 0)
    _refresh_all(lake, config)
    # appended without ingested_at (not through the ingest): the watermark cannot see it
    lake.append(SESSION_EVENTS, conform(pa.Table.from_pylist([{
        "event_id": "stray", "session_id": "s-stray", "event_type": "output_accepted", "ts": T0}]), SESSION_EVENTS))
    outcome = refresh_session_feedback(lake, config)
    assert outcome.full and "1 rows" not in outcome.reason and "session_events" in outcome.reason
    assert "s-stray" in lake.read(SESSION_FEEDBACK).column("session_id").to_pylist()
    assert not refresh_session_feedback(lake, config).full
    config.scoring.accepted = 0.25
    assert refresh_session_feedback(lake, config).reason == "settings changed"
    # trajectory_scores follows: session_feedback was recomputed in full under it
    assert refresh_trajectory_scores(lake, config).reason == "settings changed"
