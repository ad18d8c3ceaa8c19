"""Per-tenant retention on a real home: landing files → lake (part of it in the cold tier) →
training set, then lake_maintenance with acme kept 30 days: acme's expired sessions leave no byte
under FLYWHEEL_HOME (cold tier, Delta history, landing files and the exported training set
included), acme's recent sessions and every globex session (no retention) stay, one audit row
says how many rows went, and the loop's refreshes go on."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone

import dagster as dg
from dagster_duckdb import DuckDBResource

from flywheel_assets.defs.curation.assets import curated_trajectories, training_dataset
from flywheel_assets.defs.feedback.assets import judge_scores, session_feedback, trajectory_scores
from flywheel_assets.defs.ingest.assets import bronze_ingest
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.defs.storage.jobs import lake_maintenance_job
from flywheel_assets.lib.clock import set_now
from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.privacy.retention import expired_sessions
from flywheel_assets.lib.storage import tiers
from flywheel_assets.lib.storage.maintenance import maintain
from flywheel_assets.lib.tables import FORGET_REQUESTS, SESSION_EVENTS, TRAINING_DATASET, TRAJECTORIES
from flywheel_assets_tests.helpers import write_lines
from flywheel_assets_tests.privacy.test_forget import TOOLS, _found

NOW = datetime(2026, 11, 20, tzinfo=timezone.utc)
# (tenant, session, days before NOW of its last activity, a word only its lines hold)
SESSIONS = [("acme", "s-old", 45, "walrus-old-7781"), ("acme", "s-new", 3, "heron-new-1204"),
            ("globex", "s-old-g", 45, "badger-kept-5530"), ("acme", "s-edge", 29, "lemur-edge-9021")]


def _lines(tenant, session, days, word, i):
    at = (NOW - timedelta(days=days)).isoformat().replace("+00:00", "Z")
    trajectory = f"t-{session}"
    expression, answer = f"{100 + i * 37} + {i * 11 + 5}", str(100 + i * 37 + i * 11 + 5)
    return ({"trajectory_id": trajectory, "session_id": session, "user_id": f"u-{session}", "tenant_id": tenant,
             "task_type": "calculator", "model_version": "base-v0", "origin": "usage", "created_at": at,
             "tools": TOOLS, "messages": [
                 {"role": "user", "content": f"Compute {expression} for case {word} number {i}"},
                 {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                     "name": "calculator", "arguments": json.dumps({"expression": expression})}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": answer}, {"role": "assistant", "content": answer}]},
            {"event_id": f"e-{session}", "session_id": session, "user_id": f"u-{session}", "tenant_id": tenant,
             "trajectory_id": trajectory, "event_type": "output_edited", "ts": at,
             "data": {"edit_ratio": 0.1, "edited_answer": f"{answer} ({word})"}})


def test_retention_erases_a_tenants_expired_sessions_everywhere(home, config, lake):
    (home / "config.json").write_text(json.dumps({"maintenance": {"tenant_retention_days": {"acme": 30}},
                                                  "curation": {"target_size": 50, "holdout_fraction": 0.0}}))
    lines = [_lines(*session, i) for i, session in enumerate(SESSIONS)]
    write_lines(config.landing / "trajectories" / "usage.jsonl", [t for t, _ in lines])
    write_lines(config.landing / "events" / "usage.jsonl", [e for _, e in lines])
    resources = {"flywheel": FlywheelResource(home=str(home), config_path=str(home / "config.json")),
                 "catalog": DuckDBResource(database=str(home / "flywheel.duckdb"))}
    instance = dg.DagsterInstance.ephemeral()
    scoring = [bronze_ingest, session_feedback, judge_scores, trajectory_scores, curated_trajectories]
    assert dg.materialize(scoring, resources=resources, instance=instance).success
    instance.add_dynamic_partitions("cycle", ["c1"])
    assert dg.materialize([training_dataset], partition_key="c1", resources=resources, instance=instance).success
    assert "t-s-old" in lake.read(TRAINING_DATASET).column("trajectory_id").to_pylist()
    assert {s for s in expired_sessions(lake, "acme", NOW - timedelta(days=30)).sessions} == {"s-old"}
    for _, _, _, word in SESSIONS:
        assert _found(home, word), word

    # every bronze row goes cold first, so retention has to find them there
    for table in (SESSION_EVENTS, TRAJECTORIES):
        assert tiers.move_to_cold(lake, table, datetime.now(timezone.utc) + timedelta(hours=1)).rows == 4
    set_now(config, NOW)  # the flywheel's clock: retention ages sessions by their own timestamps
    result = lake_maintenance_job.execute_in_process(resources=resources, instance=instance, run_config={
        "ops": {"maintain_lake": {"config": {"retention_hours": 0}}}})
    assert result.success
    logged = "\n".join(record.user_message for record in instance.all_logs(result.run_id))
    assert "retention: tenant acme: 1 sessions" in logged
    audit = lake.read(FORGET_REQUESTS).to_pylist()
    assert len(audit) == 1 and audit[0]["requested_by"] == "retention:acme" and audit[0]["policy"] == "expire"
    rows = json.loads(audit[0]["rows_by_table_json"])
    assert rows["trajectories"] == 1 and rows["session_events"] == 1 and rows["training_dataset"] == 1
    assert audit[0]["cycles_tainted"] == ["c1"] and "s-old" not in json.dumps(audit, default=str)

    assert _found(home, "walrus-old-7781") == []
    for word in ("heron-new-1204", "badger-kept-5530", "lemur-edge-9021"):
        assert _found(home, word), word
    assert sorted(lake.read(TRAJECTORIES).column("session_id").to_pylist()) == ["s-edge", "s-new", "s-old-g"]
    assert lake.read(TRAJECTORIES, hot_only=True).num_rows == 0  # all three read from the cold tier

    # expire again: nothing left to expire; two days later s-edge expires
    config = load_config(home, str(home / "config.json"))
    assert maintain(config, lake, retention_hours=0, now=NOW).expired == {}
    later = maintain(config, lake, retention_hours=0, now=NOW + timedelta(days=2))
    assert later.expired["acme"].rows["trajectories"] == 1 and _found(home, "lemur-edge-9021") == []
    assert len(lake.read(FORGET_REQUESTS).to_pylist()) == 2

    # a run that failed halfway left its subject pending: the next run finishes it, even with acme's
    # retention since lifted
    pending = home / "privacy" / f"pending-expire-{hashlib.sha256(b'acme').hexdigest()}.json"
    pending.write_text(json.dumps({"user_id": None, "tenant_id": "acme", "sessions": ["s-new"],
                                   "trajectories": ["t-s-new"], "cycles": [], "versions": []}))
    (home / "config.json").write_text(json.dumps({"maintenance": {"tenant_retention_days": {"acme": None}}}))
    resumed = maintain(load_config(home, str(home / "config.json")), lake, retention_hours=0, now=NOW)
    assert resumed.retention_error is None and resumed.expired["acme"].rows["trajectories"] == 1 and not pending.exists()
    assert _found(home, "heron-new-1204") == [] and _found(home, "badger-kept-5530")

    # the loop's refreshes go on over the tiered, expired lake
    assert dg.materialize(scoring, resources=resources, instance=instance).success
    assert lake.read(SESSION_EVENTS).column("session_id").to_pylist() == ["s-old-g"]


def test_retention_of_one_tenant_keeps_another_tenants_session_of_the_same_id(home, config, lake):
    (home / "config.json").write_text(json.dumps({"maintenance": {"tenant_retention_days": {"acme": 30}}}))
    acme, globex = _lines("acme", "s-1", 45, "acme-word-1180", 0), _lines("globex", "s-1", 45, "globex-word-7702", 1)
    globex[0]["trajectory_id"] = globex[1]["trajectory_id"] = "t-globex-s-1"
    globex[1]["event_id"] = "e-globex-s-1"
    write_lines(config.landing / "trajectories" / "usage.jsonl", [acme[0], globex[0]])
    write_lines(config.landing / "events" / "usage.jsonl", [acme[1], globex[1]])
    resources = {"flywheel": FlywheelResource(home=str(home), config_path=str(home / "config.json"))}
    assert dg.materialize([bronze_ingest, session_feedback, judge_scores, trajectory_scores, curated_trajectories],
                          resources=resources).success
    done = maintain(load_config(home, str(home / "config.json")), lake, retention_hours=0, now=NOW)
    assert done.expired["acme"].rows["trajectories"] == 1 and done.expired["acme"].rows["session_events"] == 1
    assert _found(home, "acme-word-1180") == []
    assert {"landing/trajectories/usage.jsonl", "landing/events/usage.jsonl"} <= set(_found(home, "globex-word-7702"))
    assert lake.read(TRAJECTORIES).column("trajectory_id").to_pylist() == ["t-globex-s-1"]
    assert lake.read(SESSION_EVENTS).column("tenant_id").to_pylist() == ["globex"]


def test_a_retention_of_zero_days_is_refused():
    import pytest
    from pydantic import ValidationError

    from flywheel_assets.lib.config import FlywheelConfig

    with pytest.raises(ValidationError, match="above 0"):
        FlywheelConfig.model_validate({"maintenance": {"tenant_retention_days": {"acme": 0}}})
