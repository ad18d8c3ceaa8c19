"""A landing zone with only one kind of file still scores what it can: ingest_job succeeds,
emptiness is reported (not blocking) on bronze, and only what feeds training waits for data."""

from __future__ import annotations

import dagster as dg
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from flywheel_assets.defs.curation.assets import training_dataset
from flywheel_assets.defs.curation.checks import no_pii_in_training_set
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.tables import (
    CURATED_TRAJECTORIES, JUDGE_SCORES, SESSION_EVENTS, SESSION_FEEDBACK, TRAINING_DATASET, TRAJECTORIES,
    TRAJECTORY_SCORES,
)
from flywheel_assets_tests.helpers import write_lines


def _event(i: int, session: str, event_type: str, **data) -> dict:
    return {"event_id": f"e{i}", "session_id": session, "user_id": "u1", "event_type": event_type,
            "ts": f"2026-11-26T10:{i:02d}:00Z", "trajectory_id": f"t-{session}", "data": data}


_CALL = '{"name": "calculator", "arguments": {"expression": "1+1"}}'


def _trajectory(i: int) -> dict:
    return {"trajectory_id": f"t{i}", "session_id": f"s{i}", "user_id": "u1", "task_type": "calculator",
            "created_at": "2026-11-25T08:00:00Z", "conversations": [
                {"from": "human", "value": f"What is {i} + 1?"},
                {"from": "gpt", "value": f'<tool_call>\n{_CALL}\n</tool_call>'},
                {"from": "tool", "value": '<tool_response>\n{"name": "calculator", "content": "2"}\n</tool_response>'},
                {"from": "gpt", "value": f"{i} + 1 = {i + 1}."}]}


def _run_ingest_job() -> dg.ExecuteInProcessResult:
    from flywheel_assets.definitions import defs

    job = defs().resolve_job_def("ingest_job")
    return job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, tuple[bool, dg.AssetCheckSeverity]]:
    return {e.check_name: (e.passed, e.severity) for e in result.get_asset_check_evaluations()}


def test_events_alone_give_session_feedback(home, config, lake):
    write_lines(config.landing / "events" / "a.jsonl", [
        _event(1, "s1", "output_accepted"), _event(2, "s1", "session_continued"),
        _event(3, "s2", "retry_requested"), _event(4, "s2", "output_edited", edit_ratio=0.5),
        _event(5, "s3", "error_reported"),
    ])
    result = _run_ingest_job()
    assert result.success
    assert lake.row_count(SESSION_EVENTS) == 5 and not lake.exists(TRAJECTORIES)
    feedback = {r["session_id"]: r for r in lake.read(SESSION_FEEDBACK).to_pylist()}
    assert sorted(feedback) == ["s1", "s2", "s3"]
    assert feedback["s1"]["task_accepted"] and feedback["s2"]["edit_ratio"] == 0.5
    assert feedback["s1"]["final_trajectory_id"] == "t-s1"  # named by its events: no trajectory logged yet
    assert lake.read(TRAJECTORY_SCORES).num_rows == 0 and lake.read(CURATED_TRAJECTORIES).num_rows == 0
    checks = _checks(result)
    # a bronze table not there yet is no schema failure: its emptiness is a warning
    assert checks["session_events_schema_and_rows"][0]
    assert checks["trajectories_schema_and_rows"] == (False, dg.AssetCheckSeverity.WARN)
    assert checks["scores_within_bounds"][0]

    # what would train a model is where emptiness stops the run
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("cycle", ["c1"])
    cycle = dg.materialize([training_dataset, no_pii_in_training_set], partition_key="c1", instance=instance,
                           resources={"flywheel": FlywheelResource(home=str(home))}, raise_on_error=False)
    assert not cycle.success and lake.read(TRAINING_DATASET).num_rows == 0


def test_trajectories_alone_give_judge_and_trajectory_scores(home, config, lake):
    write_lines(config.landing / "trajectories" / "a.jsonl", [_trajectory(i) for i in range(4)])
    result = _run_ingest_job()
    assert result.success
    assert lake.row_count(TRAJECTORIES) == 4 and not lake.exists(SESSION_EVENTS)
    assert sorted(r["trajectory_id"] for r in lake.read(JUDGE_SCORES).to_pylist()) == ["t0", "t1", "t2", "t3"]
    scores = lake.read(TRAJECTORY_SCORES).to_pylist()
    assert sorted(s["trajectory_id"] for s in scores) == ["t0", "t1", "t2", "t3"]
    assert all(s["score_source"] == "judges_only" and s["tier"] for s in scores)
    assert lake.read(SESSION_FEEDBACK).num_rows == 0
    assert lake.read(CURATED_TRAJECTORIES).num_rows == 4
    assert _checks(result)["session_events_schema_and_rows"] == (False, dg.AssetCheckSeverity.WARN)


def test_an_empty_landing_zone_fails_nothing(home, config, lake):
    result = _run_ingest_job()
    assert result.success
    scored = (SESSION_FEEDBACK, JUDGE_SCORES, TRAJECTORY_SCORES)
    assert all(lake.exists(t) and lake.read(t).num_rows == 0 for t in scored)
    checks = _checks(result)
    assert checks["session_events_schema_and_rows"] == checks["trajectories_schema_and_rows"] == (
        False, dg.AssetCheckSeverity.WARN)


@pytest.mark.parametrize("kind", ["events", "trajectories"])
def test_a_wrong_schema_still_blocks(home, config, lake, kind):
    table = SESSION_EVENTS if kind == "events" else TRAJECTORIES
    # a bronze table written by something else, with a column of the wrong type
    wrong = pa.table({f.name: pa.array(["x"], pa.string()) for f in table.schema})
    write_deltalake(lake.uri(table), wrong)
    result = _run_ingest_job()
    assert not result.success
    passed, severity = _checks(result)[f"{table.name}_schema_and_rows"]
    assert (passed, severity) == (False, dg.AssetCheckSeverity.ERROR)
