"""curated_trajectories refreshed batch by batch equals curating everything again: the rows,
their scrubbed (and user-edited) messages and every duplicate status, while new copies
displace kept ones, scores and labels change which copy is kept, and edits change texts."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from flywheel_assets.lib.curation import refresh_curated
from flywheel_assets.lib.curation.refresh_curated import refresh_curated_trajectories
from flywheel_assets.lib.feedback.refresh_scores import (
    refresh_judge_scores, refresh_session_feedback, refresh_trajectory_scores,
)
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.tables import (
    ANNOTATIONS, CURATED_TRAJECTORIES, SESSION_EVENTS, TRAJECTORIES, TRAJECTORY_SCORES,
)

T0 = datetime(2026, 11, 1, 9, tzinfo=timezone.utc)
TABLES = {"events": SESSION_EVENTS, "trajectories": TRAJECTORIES, "annotations": ANNOTATIONS}
BATCHES = 5


def _answers(rng: random.Random) -> list[str]:
    """Texts that are copies, near copies (one word of a hundred changed) or unlike each other."""
    vocabulary = [f"w{i}" for i in range(400)]
    templates = [[rng.choice(vocabulary) for _ in range(100)] for _ in range(5)]
    answers = []
    for template in templates:
        for variant in range(4):
            words = list(template)
            for _ in range(variant % 3):  # 0, 1 or 2 words changed: copies, near and less near copies
                words[rng.randrange(100)] = rng.choice(vocabulary)
            answers.append(" ".join(words))
    return answers + ["the answer is 42", "The answer is 42.", "call me at 555-123-4567 or a@b.io"]


def _world(seed: int, sessions: int = 70, tenants: tuple[str, ...] = ("default",)) -> list[tuple[str, int, dict]]:
    rng = random.Random(seed)
    answers = _answers(rng)
    rows = []
    for s in range(sessions):
        tenant = rng.choice(tenants)
        batch = rng.randrange(BATCHES)
        start = T0 + timedelta(days=rng.randrange(4), minutes=rng.randrange(600))
        trajectories = [f"t{s}-{k}" for k in range(rng.randint(1, 2))]
        for k, trajectory in enumerate(trajectories):
            answer = rng.choice(answers)
            rows.append(("trajectories", batch, {
                "trajectory_id": trajectory, "session_id": f"s{s}", "tenant_id": tenant, "user_id": f"u{s % 9}",
                "task_type": rng.choice(["calc", "qa"]), "origin": "usage", "is_synthetic": False,
                "created_at": start + timedelta(minutes=k), "user_prompt": "what is it?",
                "turns": [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": answer}],
                "tool_calls": [], "tools_offered": [], "tools_json": "[]", "final_response": answer}))
        for e in range(rng.randint(0, 5)):
            kind = rng.choice(["output_accepted", "retry_requested", "thumbs_up", "thumbs_down", "output_edited"])
            data = {"edited_answer": rng.choice(answers)} if kind == "output_edited" and rng.random() < 0.7 else {}
            rows.append(("events", min(BATCHES - 1, batch + rng.choice([0, 0, 1, 2])), {
                "event_id": f"e{s}-{e}", "session_id": f"s{s}", "event_type": kind, "user_id": f"u{s % 9}",
                "tenant_id": tenant, "trajectory_id": rng.choice(trajectories),
                "ts": start + timedelta(minutes=rng.randrange(30)),
                "edit_ratio": 0.4 if kind == "output_edited" else None, "data_json": json.dumps(data)}))
        if rng.random() < 0.15:  # a label, often batches later: it outranks every unlabelled copy
            rows.append(("annotations", min(BATCHES - 1, batch + rng.randrange(3)), {
                "annotation_id": f"a{s}", "trajectory_id": trajectories[0], "score": rng.choice([-0.5, 1.0]),
                "annotator": "ann", "annotated_at": start + timedelta(hours=1)}))
    return rows


def _ingest(lake, rows, batch: int) -> None:
    at = datetime.now(timezone.utc)
    for kind, table in TABLES.items():
        batch_rows = [{**row, "ingested_at": at} for k, b, row in rows if k == kind and b == batch]
        if batch_rows:
            lake.append(table, conform(pa.Table.from_pylist(batch_rows), table))


def _refresh(lake, config, full: bool = False):
    refresh_session_feedback(lake, config)
    refresh_judge_scores(lake, config)
    refresh_trajectory_scores(lake, config)
    return refresh_curated_trajectories(lake, config, full=full)


def _snapshot(lake) -> dict:
    return {row["trajectory_id"]: row for row in lake.read(CURATED_TRAJECTORIES).drop_columns(["updated_at"]).to_pylist()}


@pytest.mark.parametrize("seed, tenants", [(1, ("default",)), (2, ("default",)),
                                           (3, ("default", "acme", "nope"))])
def test_batch_by_batch_equals_curating_everything_again(lake, config, seed, tenants):
    # seed 3: a pooled, an isolated and an opted-out tenant (three lanes' groups, opt_out ranked last)
    config.tenancy.policies = {"acme": "isolated", "nope": "opt_out"}
    world = _world(seed, sessions=90 if len(tenants) > 1 else 70, tenants=tenants)
    outcomes, kept_after = [], []
    for batch in range(BATCHES):
        _ingest(lake, world, batch)
        outcomes.append(_refresh(lake, config))
        kept_after.append({i for i, row in _snapshot(lake).items() if row["dedup_status"] == "kept"})
    assert [o.full for o in outcomes] == [True] + [False] * (BATCHES - 1)
    incremental = _snapshot(lake)
    assert len(incremental) == sum(1 for kind, _, _ in world if kind == "trajectories")
    again = refresh_curated_trajectories(lake, config, full=True)
    assert again.full and again.reason == "asked for a full recompute"
    assert _snapshot(lake) == incremental
    statuses = [row["dedup_status"] for row in incremental.values()]
    assert {"kept", "exact_duplicate", "near_duplicate"} <= set(statuses)
    if len(tenants) > 1:
        assert {row["split"] for row in incremental.values()} >= {"train", "opt_out"}
        lane = config.tenancy.lane
        assert lane("acme") != lane("default")
        assert all(lane(incremental[row["duplicate_of"]]["tenant_id"]) == lane(row["tenant_id"])
                   for row in incremental.values() if row["duplicate_of"])
    # the test has teeth: later batches displaced rows kept earlier, and edits changed answers
    assert any(kept_after[b] - kept_after[-1] for b in range(BATCHES - 1))
    assert any(row["user_edited"] for row in incremental.values())
    assert any("555-123-4567" not in row["messages_json"] and row["pii_replacements"] for row in incremental.values())


def test_a_refresh_writes_the_new_row_and_the_copies_it_displaces(lake, config):
    world = _world(4)
    for batch in range(BATCHES):
        _ingest(lake, world, batch)
    _refresh(lake, config)
    before = _snapshot(lake)
    kept = next(row for row in before.values() if row["dedup_status"] == "kept"
                and any(other["duplicate_of"] == row["trajectory_id"] for other in before.values()))
    copies = {i for i, row in before.items() if row["duplicate_of"] == kept["trajectory_id"]}
    answer = json.loads(kept["messages_json"])[-1]["content"]
    # a new copy of a kept answer, labelled at once: it ranks first, so it is kept and the group points to it
    _ingest(lake, [("trajectories", 9, {
        "trajectory_id": "t-new", "session_id": "s-new", "tenant_id": "default", "task_type": "qa", "origin": "usage",
        "created_at": T0, "user_prompt": "what is it?", "tools_json": "[]", "final_response": answer,
        "turns": [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": answer}]}),
        ("annotations", 9, {"annotation_id": "a-new", "trajectory_id": "t-new", "score": 1.0, "annotator": "ann",
                            "annotated_at": T0})], 9)
    outcome = _refresh(lake, config)
    after = _snapshot(lake)
    assert not outcome.full
    assert after["t-new"]["dedup_status"] == "kept" and after[kept["trajectory_id"]]["duplicate_of"] == "t-new"
    assert all(after[i]["duplicate_of"] == "t-new" for i in copies)
    written = set(outcome.rows.column("trajectory_id").to_pylist())
    assert written == {"t-new", kept["trajectory_id"]} | copies
    assert {i: r for i, r in after.items() if i not in written} == {i: r for i, r in before.items() if i not in written}


def _curated_then_deleted(lake, config, seed: int, table) -> str:
    """A world's first batch curated, then one curated trajectory's row deleted from `table`."""
    _ingest(lake, _world(seed), 0)
    _refresh(lake, config)
    victim = next(iter(_snapshot(lake)))
    lake.delete_where(table, f"trajectory_id = '{victim}'")
    return victim


def test_a_deleted_input_or_new_settings_recompute_in_full(lake, config):
    victim = _curated_then_deleted(lake, config, 5, TRAJECTORIES)
    outcome = _refresh(lake, config)
    assert outcome.full and "recomputed in full" in outcome.reason  # trajectory_scores was, as it lost a row
    assert victim not in _snapshot(lake)
    config.curation.holdout_fraction = 0.5
    assert refresh_curated_trajectories(lake, config).reason == "settings changed"


def _copies(count: int, batch: int, first: int = 0) -> list[tuple[str, int, dict]]:
    answer = " ".join(f"w{i}" for i in range(60))
    return [("trajectories", batch, {
        "trajectory_id": f"c{n}", "session_id": f"sc{n}", "tenant_id": "default", "task_type": "qa",
        "origin": "usage", "created_at": T0, "user_prompt": "what is it?", "tools_json": "[]",
        "final_response": answer,
        "turns": [{"role": "user", "content": "what is it?"}, {"role": "assistant", "content": answer}]})
        for n in range(first, first + count)]


def test_stored_copies_of_one_text_are_checked_once(lake, config, monkeypatch):
    # 40 stored copies of one answer, then one more: linking the new copy to its group asks one
    # similarity question per distinct text, not one per stored copy (that grew with the group)
    _ingest(lake, _copies(40, 0), 0)
    _refresh(lake, config)
    checks = []
    original = refresh_curated.similar
    monkeypatch.setattr(refresh_curated, "similar", lambda *args: checks.append(1) or original(*args))
    _ingest(lake, _copies(1, 1, first=40), 1)
    outcome = _refresh(lake, config)
    assert not outcome.full
    after = _snapshot(lake)
    assert len(after) == 41 and sum(row["dedup_status"] == "kept" for row in after.values()) == 1
    assert len(checks) == 1
    assert refresh_curated_trajectories(lake, config, full=True).full and _snapshot(lake) == after


def test_a_curated_row_whose_score_row_vanished_recomputes_in_full(lake, config):
    # only a direct delete on trajectory_scores gets here (forget and retention delete the inputs too)
    victim = _curated_then_deleted(lake, config, 6, TRAJECTORY_SCORES)
    _ingest(lake, [("events", 1, {
        "event_id": "e-late", "session_id": None, "event_type": "output_edited", "user_id": "u0",
        "tenant_id": "default", "trajectory_id": victim, "ts": T0, "edit_ratio": 0.4,
        "data_json": json.dumps({"edited_answer": "edited later"})})], 1)
    outcome = refresh_curated_trajectories(lake, config)
    assert outcome.full and outcome.reason == "1 curated rows lost their score row"
    assert victim not in _snapshot(lake)


def test_rows_sharing_no_band_key_are_kept_unhashed_and_the_rest_decided_as_over_all_rows(config):
    from flywheel_assets.lib.curation.curate import Signatures, mark_duplicates
    from flywheel_assets.lib.curation.dedup import find_duplicates, lsh_keys

    rng = random.Random(5)
    unlike = [" ".join(f"w{rng.randrange(400)}" for _ in range(80)) for _ in range(60)]
    near = [text.replace(text.split()[40], "changed", 1) for text in unlike[10:20]]
    texts = unlike + unlike[:10] + near + ["short", "short"]
    rows = [{"trajectory_id": f"t{index:03d}", "tenant_id": "default", "combined_score": rng.random(),
             "human_verified": False, "split": "train",
             "messages_json": json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": text}])}
            for index, text in enumerate(texts)]
    signatures = Signatures(config)
    threshold = config.curation.near_duplicate_jaccard
    every = signatures.of([row["messages_json"] for row in rows])
    for row, keys in zip(rows, lsh_keys(every, threshold).tolist()):
        row["lsh_keys"] = keys
    hashed = Signatures(config)
    marked = mark_duplicates(pa.Table.from_pylist(rows), config, hashed).to_pylist()
    expected = find_duplicates([row["trajectory_id"] for row in rows],
                               [hashed.normalized(row["messages_json"]) for row in rows],
                               [row["combined_score"] for row in rows], near_threshold=threshold, signatures=every)
    assert [(row["dedup_status"], row["duplicate_of"]) for row in marked] == expected
    assert {status for status, _ in expected} == {"kept", "exact_duplicate", "near_duplicate"}
    # the 40 unlike texts without a copy or near copy were set aside: no signature was made for them
    assert len(hashed._slot) == len(hashed._signatures) == 10 + 2 * 10 + 1
