"""The right to be forgotten on a real home: landing files → lake → training set → adapter → champion,
then `flywheel forget`: no byte of the user's text is left under FLYWHEEL_HOME (Delta history,
gzip landing files and model folders included), other users' data is untouched, the adapter trained
on it is withdrawn and the clean base serves again."""

from __future__ import annotations

import gzip
import json
from datetime import datetime, timedelta

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flywheel_assets.cli import app
from flywheel_assets.defs.curation.assets import curated_trajectories, training_dataset
from flywheel_assets.defs.feedback.assets import judge_scores, session_feedback, trajectory_scores
from flywheel_assets.defs.ingest.assets import bronze_ingest
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.defs.training.assets import base_model, lora_adapter
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.privacy.forget import PURGED, SUBJECT_TABLES, find_subject, subject_rows
from flywheel_assets.lib.storage import key_index
from flywheel_assets.lib.simulation.seed import write_cold_start
from flywheel_assets.lib.tables import (
    DATASET_MANIFESTS, FORGET_REQUESTS, QUARANTINE, SESSION_EVENTS, TRAINING_DATASET, TRAJECTORIES,
)
from flywheel_assets_tests.helpers import write_lines

SMALL = {
    "cold_start": {"synthetic_trajectories": 200},
    "base_model": {"hidden_size": 64, "layers": 2, "intermediate_size": 128, "pretrain_steps": 30},
    "lora": {"steps": 4, "rank": 4, "alpha": 8, "batch_size": 8},
    "curation": {"target_size": 400},
}
SECRET = "zebra-quokka-4411"  # in every line of the forgotten user, nowhere else
KEPT = "okapi-lynx-2290"  # in the other user's lines: must survive
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate an expression.",
                                           "parameters": {"type": "object", "properties": {
                                               "expression": {"type": "string"}}, "required": ["expression"]}}}]


PROMPTS = {  # distinct enough that none is a near-duplicate of another
    "t-gone-1": ("Please compute 17 * 23 for my invoice", "17 * 23", "391"),
    "t-gone-2": ("How much is 905 - 77 when my budget shrinks", "905 - 77", "828"),
    "correction-t-gone-1": ("Quick arithmetic for the warehouse: 64 + 15 * 3", "64 + 15 * 3", "109"),
    "t-kept-1": ("Add 4412 and 1190 together for the quarterly totals", "4412 + 1190", "5602"),
}


def _trajectory(trajectory_id, session, user, text, **extra):
    prompt, expression, answer = PROMPTS[trajectory_id]
    return {"trajectory_id": trajectory_id, "session_id": session, "user_id": user, "tenant_id": "acme",
            "task_type": "calculator", "model_version": "base-v0", "origin": "usage",
            "created_at": "2026-11-01T10:00:00Z", "tools": TOOLS, "messages": [
                {"role": "user", "content": f"{prompt}. My code name is {text}."},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "calculator", "arguments": json.dumps({"expression": expression})}}]},
                {"role": "tool", "tool_call_id": "c1", "content": answer}, {"role": "assistant", "content": answer}],
            **extra}


def _event(event_id, session, user, trajectory_id, event_type="output_accepted", **data):
    return {"event_id": event_id, "session_id": session, "user_id": user, "tenant_id": "acme",
            "trajectory_id": trajectory_id, "event_type": event_type, "ts": "2026-11-01T10:01:00Z", "data": data}


def _land(landing):
    gone, kept = "user-gone", "user-kept"
    write_lines(landing / "trajectories" / "usage.jsonl", [
        _trajectory("t-gone-1", "s-gone-1", gone, SECRET), _trajectory("t-gone-2", "s-gone-2", gone, SECRET),
        _trajectory("t-kept-1", "s-kept-1", kept, KEPT)])
    # the teacher's correction of the forgotten user's request: its text is theirs too
    write_lines(landing / "trajectories" / "corrections.jsonl", [
        _trajectory("correction-t-gone-1", None, None, SECRET, corrects="t-gone-1", origin="correction",
                    is_synthetic=True)])
    write_lines(landing / "events" / "usage.jsonl", [
        _event("e-gone-1", "s-gone-1", gone, "t-gone-1"),
        _event("e-gone-2", "s-gone-2", gone, "t-gone-2", "output_edited", edit_ratio=0.1,
               edited_answer=f"5, {SECRET}"),
        _event("e-kept-1", "s-kept-1", kept, "t-kept-1"),
        f'{{"event_id": "e-bad", "user_id": "{gone}", "tenant_id": "acme", "note": "{SECRET}", broken',  # quarantined
    ])
    # the same event again in a gzip file (a duplicate the ingest skips) beside another user's line
    with gzip.open(landing / "events" / "again.jsonl.gz", "wt") as handle:
        handle.write(json.dumps(_event("e-gone-2", "s-gone-2", gone, "t-gone-2", "output_edited", edit_ratio=0.1,
                                       edited_answer=f"5, {SECRET}")) + "\n")
        handle.write(json.dumps(_event("e-kept-2", "s-kept-1", kept, "t-kept-1", "session_continued")) + "\n")
    write_lines(landing / "annotations" / "labels.jsonl", [
        {"trajectory_id": t, "score": 1.0, "annotator": "ann", "note": "good", "annotated_at": "2026-11-02T00:00:00Z"}
        for t in ("t-gone-1", "t-gone-2", "t-kept-1", "correction-t-gone-1")])


def _found(home, text: str) -> list[str]:
    """Every file under home holding `text`: raw bytes, gzip decompressed, Parquet decoded."""
    needle, found = text.encode(), []
    for path in sorted(p for p in home.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        elif data[:4] == b"PAR1":
            data += json.dumps(pq.read_table(path).to_pylist(), default=str).encode()
        if needle in data:
            found.append(str(path.relative_to(home)))
    return found


@pytest.fixture
def trained_home(home, config, lake):
    (home / "config.json").write_text(json.dumps(SMALL))
    config.cold_start.synthetic_trajectories = SMALL["cold_start"]["synthetic_trajectories"]
    write_cold_start(config)
    _land(config.landing)
    resources = {"flywheel": FlywheelResource(home=str(home), config_path=str(home / "config.json"))}
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([bronze_ingest, session_feedback, judge_scores, trajectory_scores, curated_trajectories,
                           base_model], resources=resources, instance=instance).success
    instance.add_dynamic_partitions("cycle", ["c1"])
    assert dg.materialize([training_dataset, lora_adapter], partition_key="c1", resources=resources,
                          instance=instance).success
    registry = ModelRegistry(lake)
    registry.transition("c1-lora", "treatment", reason="test", actor="test")
    registry.transition("c1-lora", "champion", reason="test", actor="test")
    return resources, instance


def test_forget_leaves_no_trace_and_withdraws_what_was_trained_on_it(home, config, lake, trained_home, monkeypatch):
    resources, instance = trained_home
    trained = set(lake.read(TRAINING_DATASET, columns=["trajectory_id"]).column("trajectory_id").to_pylist())
    assert {"t-gone-1", "correction-t-gone-1", "t-kept-1"} <= trained  # labelled platinum (t-gone-2's session: holdout)
    assert lake.row_count(QUARANTINE) >= 1
    before = _found(home, SECRET)  # the scan sees every place the text is: tables, history, files, exports
    assert {"landing/events/again.jsonl.gz", "landing/trajectories/usage.jsonl", "datasets/c1/train.jsonl"} <= set(before)
    assert any(p.startswith("lake/bronze/trajectories/") for p in before)
    counts = {t.name: lake.row_count(t) for t in SUBJECT_TABLES + (QUARANTINE,)}
    landing_lines = {p: p.read_bytes().count(b"\n") for p in config.landing.rglob("*.jsonl")}

    monkeypatch.setenv("FLYWHEEL_CONFIG", str(home / "config.json"))
    dry = CliRunner().invoke(app, ["forget", "--user", "user-gone", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.stdout[dry.stdout.index("{"):])
    assert planned["versions"] == ["c1-lora"] and _found(home, SECRET) == before  # a dry run changes nothing

    con = duckdb.connect()  # a refresh's lookup indexes the files holding the user's rows
    con.register("keys", pa.table({"key": ["t-gone-1", "t-kept-1"]}))
    assert key_index.keyed(con, lake, TRAJECTORIES, "trajectory_id", "keys").num_rows == 2
    indexed = list((home / "cache" / "key_index").rglob("*.npy"))
    result = CliRunner().invoke(app, ["forget", "--user", "user-gone", "--by", "dpo@acme", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["rows"] == planned["rows"] and report["passes"] == 1

    assert _found(home, SECRET) == []
    assert _found(home, KEPT)  # the other user's data is all there
    # the key index kept no hashes of the files purged: each index file left names a file the tables hold
    live = set().union(*(key_index.live_names(lake, table) for table in PURGED))
    assert indexed and all(path.name in live for path in (home / "cache" / "key_index").rglob("*.npy"))
    assert all(n == 0 for n in subject_rows(lake, find_subject(lake, "user-gone"), find_subject(
        lake, "user-gone").matcher()).values())
    gone = {"trajectories": 3, "session_events": 2, "annotations": 3, "quarantine": 1}
    for name, n in gone.items():
        assert report["rows"][name] == n, name
    for table in SUBJECT_TABLES + (QUARANTINE,):
        assert lake.row_count(table) == counts[table.name] - report["rows"].get(table.name, 0), table.name
    kept = lake.read(SESSION_EVENTS, filter_sql="user_id = 'user-kept'").num_rows
    assert kept == 2 and lake.read(TRAJECTORIES, filter_sql="trajectory_id = 't-kept-1'").num_rows == 1
    # landing files keep every other line, and its number (rows' source_line still point at them)
    assert {p: p.read_bytes().count(b"\n") for p in config.landing.rglob("*.jsonl")} == landing_lines
    with pytest.raises(Exception):  # no earlier version to travel back to
        lake.delta(TRAJECTORIES, version=0).to_pyarrow_dataset().to_table()

    # the training set, its export and the adapter's id list without them; the export matches the manifest
    manifest = lake.read(DATASET_MANIFESTS).to_pylist()[0]
    assert not {"t-gone-1", "t-gone-2", "correction-t-gone-1"} & set(manifest["trajectory_ids"])
    assert manifest["n_rows"] == len(manifest["trajectory_ids"]) == lake.row_count(TRAINING_DATASET)
    import hashlib
    assert hashlib.sha256((home / manifest["export_path"]).read_bytes()).hexdigest() == manifest["content_sha256"]
    assert "t-gone-1" not in json.loads((home / "models" / "c1-lora" / "trajectory_ids.json").read_text())

    registry = ModelRegistry(lake)
    adapter, champion = registry.get("c1-lora"), registry.champion()
    assert adapter["status"] == "rolled_back" and json.loads(adapter["metadata_json"])["tainted_by"] == report["request_id"]
    assert champion["version"].startswith("base-") and champion["traffic_share"] == 1.0
    audit = lake.read(FORGET_REQUESTS).to_pylist()
    assert len(audit) == 1 and audit[0]["requested_by"] == "dpo@acme" and audit[0]["rows_deleted"] == report["total_rows"]
    assert audit[0]["versions_withdrawn"] == ["c1-lora"] and "user-gone" not in json.dumps(audit, default=str)

    # the loop goes on: nothing comes back from the landing zone, the scores recompute without the user
    again = dg.materialize([bronze_ingest, session_feedback, judge_scores, trajectory_scores, curated_trajectories],
                           resources=resources, instance=instance)
    assert again.success
    assert lake.row_count(TRAJECTORIES) == counts["trajectories"] - 3
    assert _found(home, SECRET) == []


def test_forget_job_scoped_to_a_tenant_and_asking_for_a_retrain(home, lake, trained_home):
    from flywheel_assets.defs.privacy.jobs import forget_job
    from flywheel_assets.lib.automation.trigger import retrain_requested

    resources, instance = trained_home

    def run(tenant):
        config = {"user_id": "user-gone", "tenant_id": tenant, "requested_by": "dpo", "policy": "retrain"}
        result = forget_job.execute_in_process(run_config={"ops": {"forget_user": {"config": config}}},
                                               resources=resources, instance=instance)
        assert result.success
        return [e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]

    run("globex")  # the same user id in another tenant: nothing of acme's user goes
    assert lake.read(TRAJECTORIES, filter_sql="user_id = 'user-gone'").num_rows == 2
    assert ModelRegistry(lake).get("c1-lora")["status"] == "champion"
    events = {e.asset_key.to_user_string() for e in run("acme")}
    assert {"forget_requests", "model_registry"} <= events  # the audit row and the withdrawal, in the run's log
    assert lake.read(TRAJECTORIES, filter_sql="user_id = 'user-gone'").num_rows == 0
    assert _found(home, SECRET) == []

    champion = ModelRegistry(lake).champion()
    assert champion["version"].startswith("base-")
    last_training = lake.read(DATASET_MANIFESTS).column("created_at").to_pylist()[0]
    assert "retrain requested" in retrain_requested(champion, last_training)  # the trigger starts a cycle
    after = datetime.fromisoformat(json.loads(champion["metadata_json"])["retrain_after"])
    assert retrain_requested(champion, after + timedelta(hours=1)) is None  # ... once: a newer dataset answers it
    audit = lake.read(FORGET_REQUESTS).to_pylist()
    assert [(a["tenant_scoped"], a["rows_deleted"] > 0, a["retrain_requested"]) for a in sorted(
        audit, key=lambda a: a["requested_at"])] == [(True, False, False), (True, True, True)]


def test_a_line_is_matched_by_its_ids_as_json_strings_and_blanked_in_place(tmp_path):
    from flywheel_assets.lib.privacy.files import Matcher, scrub_file

    match = Matcher.build("u-1", "acme", ["s-9"])
    assert match(b'{"user_id": "u-1", "tenant_id": "acme"}') and match(b'{"session_id":"s-9"} broken')
    assert match(b'{"event_type": "x", "data": {"trajectory_id": "s-9"}}')  # at any depth
    assert not match(b'{"user_id": "u-1", "tenant_id": "globex"}')  # another tenant's user of that id
    # another tenant's session of the same id (retention matches ids alone: no user)
    ids = Matcher.build(None, "acme", ["s-9"])
    assert ids(b'{"session_id": "s-9", "tenant_id": "acme"}') and ids(b'{"trajectory_id": "s-9"}')
    assert not ids(b'{"session_id": "s-9"}')  # the default tenant's session of that id
    assert not ids(b'{"session_id": "s-9", "tenant_id": "globex"}') and not ids(b'{"user_id": null, "tenant_id": "acme"}')
    assert not ids(b'{"tenant_id": "globex", "data": {"trajectory_id": "s-9"}}')  # the enclosing object's tenant
    assert not ids(b'{"session_id":"s-9", "tenant_id": "globex"} broken') and ids(b'{"session_id":"s-9"} broken')
    assert ids(b'{"kind": "conversation", "tenant": "acme", "session_id": "s-9"}')
    assert not ids(b'{"kind": "conversation", "tenant": "globex", "session_id": "s-9"}')
    assert not match(b'{"user_id": "u-10", "tenant_id": "acme"}') and not match(b'{"session_id": "s-99"}')
    assert not match(b'{"user_id": "bob", "tenant_id": "acme", "final_response": "u-1"}')  # content is not an id
    default = Matcher.build("u-1", "default", [])
    assert default(b'{"user_id": "u-1"}') and not default(b'{"user_id": "u-1", "tenant_id": "acme"}')
    assert Matcher.build("ren\u00e9e", None, [])('{"user_id": "renée", broken'.encode())  # UTF-8, unparsed
    plain = tmp_path / "a.jsonl"
    line = b'{"session_id": "s-9", "tenant_id": "acme"}'
    plain.write_bytes(line + b'\n{"session_id": "s-1"}\n')
    mtime = plain.stat().st_mtime_ns
    done = scrub_file(plain, match)
    assert (done.lines, done.size_before, done.size_after) == (1, len(line) + 23, len(line) + 23)
    assert plain.read_bytes() == b" " * len(line) + b'\n{"session_id": "s-1"}\n' and plain.stat().st_mtime_ns == mtime
    assert scrub_file(plain, match) is None  # nothing left to blank


def test_a_running_gateways_journal_is_left_to_it(tmp_path):
    from flywheel_assets.lib.gateway.journal import Journal
    from flywheel_assets.lib.privacy.files import journal_held

    journal = Journal(tmp_path / "gateway" / "journal", tmp_path)
    with journal_held(tmp_path / "gateway") as held:
        assert not held  # the gateway appends to its open segment: not rewritten under it
    journal.close()
    with journal_held(tmp_path / "gateway") as held:
        assert held
