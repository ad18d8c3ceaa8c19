"""Teacher corrections: which requests count as failed, and what the teacher sends back."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa

from flywheel_assets.lib.curation.curate import to_messages
from flywheel_assets.lib.feedback.corrections import correction_lines, failed_requests
from flywheel_assets.lib.ingest.trajectories import parse_trajectory
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.simulation.tasks import generate_tasks, task_from_prompt, verify
from flywheel_assets.lib.simulation.teachers import ScriptedTeacher
from flywheel_assets.lib.tables import SESSION_EVENTS, TRAJECTORIES, TRAJECTORY_SCORES

T0 = datetime(2026, 11, 2, tzinfo=timezone.utc)


def _lake_with(lake, rows):
    """rows: (trajectory_id, session_id, prompt, origin, tier, minutes after T0)."""
    lake.append(TRAJECTORIES, conform(pa.Table.from_pylist([
        {"trajectory_id": t, "session_id": s, "user_prompt": p, "origin": o, "task_type": "calculator",
         "created_at": T0 + timedelta(minutes=m)} for t, s, p, o, _, m in rows]), TRAJECTORIES))
    lake.append(TRAJECTORY_SCORES, conform(pa.Table.from_pylist([
        {"trajectory_id": t, "session_id": s, "tier": tier} for t, s, _, _, tier, _ in rows]), TRAJECTORY_SCORES))


def test_a_request_fails_only_when_no_attempt_reached_a_training_tier(lake, config):
    _lake_with(lake, [
        ("a1", "s1", "What is 12 + 30?", "usage", "bronze", 1),
        ("a2", "s1", "What is 12 + 30?", "usage", "bronze", 2),   # retried, then abandoned: failed
        ("b1", "s2", "What is 40 + 41?", "usage", "bronze", 3),
        ("b2", "s2", "What is 40 + 41?", "usage", "gold", 4),     # solved on the retry: not failed
        ("c1", "s3", "What is 7 * 8?", "usage", "bronze", 5),     # failed, but already corrected
        ("c0", None, "What is 7 * 8?", "correction", "gold", 0),
        ("d1", "s4", "What is 90 - 45?", "synthetic", "bronze", 6),  # not usage
    ])
    failed = failed_requests(lake, config, limit=10)
    assert [(f["trajectory_id"], f["user_prompt"]) for f in failed] == [("a2", "What is 12 + 30?")]
    assert failed_requests(lake, config, limit=0) == []

    # an accepted near miss the user had to edit failed too, after the abandoned ones
    lake.append(SESSION_EVENTS, conform(pa.Table.from_pylist([
        {"event_id": "e1", "trajectory_id": "b2", "event_type": "output_edited", "ts": T0}]), SESSION_EVENTS))
    failed = failed_requests(lake, config, limit=10)
    assert [(f["trajectory_id"], f["abandoned"]) for f in failed] == [("a2", True), ("b2", False)]


def test_failed_requests_are_newest_first_and_capped(lake, config):
    _lake_with(lake, [(f"t{i}", f"s{i}", f"What is {i} + 100?", "usage", "bronze", i) for i in range(2, 9)])
    failed = failed_requests(lake, config, limit=3)
    assert [f["trajectory_id"] for f in failed] == ["t8", "t7", "t6"]


def test_the_teacher_corrects_known_requests_and_says_why_it_skipped_others():
    tasks = generate_tasks(10, seed=3)
    failures = [{"trajectory_id": f"f{i}", "user_prompt": t.prompt} for i, t in enumerate(tasks)]
    failures.append({"trajectory_id": "odd", "user_prompt": "Write me a poem about the sea."})
    lines, skipped = correction_lines(failures, ScriptedTeacher(0), T0)
    assert dict(skipped) == {"no_matching_task": 1}
    assert len(lines) == 10
    for line, task in zip(lines, tasks):
        assert line["origin"] == "correction" and line["corrects"] == line["trajectory_id"].removeprefix("correction-")
        row = parse_trajectory(json.loads(json.dumps(line)), T0)
        messages = to_messages(row["turns"], row["tool_calls"])
        assert messages[-1]["role"] == "assistant" and verify(task, messages[-1]["content"])
        assert row["origin"] == "correction" and row["is_synthetic"]


def test_task_from_prompt_reads_back_every_phrasing():
    for task in generate_tasks(400, seed=9):
        parsed = task_from_prompt(task.prompt, task.task_id)
        assert parsed is not None, task.prompt
        assert (parsed.task_type, parsed.phrasing, parsed.calls, parsed.expected, parsed.answer_units) == \
               (task.task_type, task.phrasing, task.calls, task.expected, task.answer_units)
    assert task_from_prompt("What is the capital of Atlantis?") is None
    assert task_from_prompt("What is 3 / 4?") is None


def test_each_lane_gets_its_own_correction_of_a_prompt(lake, config):
    """acme (pooled) and globex (isolated) fail the same prompt: each lane needs its own correction,
    since a lane trains on its own tenant's rows only; acme's was made already, globex's was not."""
    lake.append(TRAJECTORIES, conform(pa.Table.from_pylist([
        {"trajectory_id": t, "session_id": s, "user_prompt": "What is 7 * 8?", "origin": o, "task_type": "calculator",
         "tenant_id": tenant, "created_at": T0 + timedelta(minutes=m)}
        for t, s, o, tenant, m in (("a1", "s1", "usage", "acme", 1), ("g1", "s2", "usage", "globex", 2),
                                   ("c0", None, "correction", "acme", 3))]), TRAJECTORIES))
    lake.append(TRAJECTORY_SCORES, conform(pa.Table.from_pylist([
        {"trajectory_id": t, "session_id": s, "tier": "bronze"} for t, s in (("a1", "s1"), ("g1", "s2"))]),
        TRAJECTORY_SCORES))
    assert failed_requests(lake, config, limit=10) == []  # one lane: the prompt is corrected
    config.tenancy = config.tenancy.model_copy(update={"policies": {"globex": "isolated"}})
    assert [(f["trajectory_id"], f["tenant_id"]) for f in failed_requests(lake, config, limit=10)] == [("g1", "globex")]
