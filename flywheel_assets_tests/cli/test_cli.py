"""The `flywheel` command line against a temporary FLYWHEEL_HOME, through typer's runner."""

from __future__ import annotations

import getpass
import gzip
import hashlib
import json
from datetime import datetime, timezone

import duckdb
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from flywheel_assets.cli import EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_USAGE, app
from flywheel_assets.lib import clock
from flywheel_assets.lib.curation.select import export_chat_jsonl
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.feedback.scoring import trajectory_scores
from flywheel_assets.lib.ingest.pipeline import ingest_landing, pending_files
from flywheel_assets.lib.tables import (
    AB_RESULTS, ANNOTATIONS, DATASET_MANIFESTS, INGESTED_FILES, JUDGE_SCORES, MODEL_REGISTRY, QUARANTINE, SESSION_EVENTS,
    SESSION_FEEDBACK, TRAINING_DATASET, TRAJECTORIES,
)
from flywheel_assets_tests.helpers import write_lines

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
ACTOR = f"cli:{getpass.getuser()}"


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def trajectory(trajectory_id: str) -> dict:
    return {"trajectory_id": trajectory_id, "session_id": f"s-{trajectory_id}", "user_id": "u1",
            "task_type": "capital_lookup", "model_version": "base-v0", "created_at": "2026-11-25T08:00:00Z",
            "conversations": [{"from": "human", "value": "Capital of Peru?"}, {"from": "gpt", "value": "Lima."}]}


@pytest.fixture
def registry(config, lake) -> ModelRegistry:
    clock.set_now(config, NOW)
    registry = ModelRegistry(lake, clock=lambda: clock.now(config))
    registry.register("base-v0", base="base-v0", base_path="models/base-v0", reason="pretrained", actor="base_model")
    for cycle in ("cycle-0001", "cycle-0002"):
        registry.register(f"{cycle}-lora", base="base-v0", base_path="models/base-v0",
                          adapter_path=f"models/{cycle}-lora", parent="base-v0", cycle=cycle,
                          reason=f"trained on {cycle}", actor="lora_adapter")
    return registry


def test_help_documents_every_command_and_the_exit_codes():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("status", "ingest", "annotate", "promote", "rollback", "export"):
        assert command in result.output
    assert "3 not found" in result.output and "4 refused" in result.output


def test_status_shows_phase_trigger_running_test_champion_and_history(registry, lake, config):
    registry.transition("cycle-0001-lora", "treatment", reason="canary healthy", actor="ab_monitor")
    lake.append(AB_RESULTS, pa.Table.from_pylist([{
        "test_id": "ab-cycle-0001-lora", "cycle": "cycle-0001", "treatment": "cycle-0001-lora", "control": "base-v0",
        "stage": "treatment", "looked_at": NOW, "outcome": "CONTINUE", "rule": "min_users",
        "reason": "120 of 1000 treatment users", "effect": 0.031, "effect_low": -0.05, "effect_high": 0.11,
        "users_control": 1100, "users_treatment": 120}], schema=AB_RESULTS.schema))

    result = run("status", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["phase"], report["real_trajectories"]) == (0, 0)
    assert report["trigger"]["train"] is False
    assert report["trigger"]["reason"].startswith("0 real trajectories, training starts at 500")
    assert report["champion"]["version"] == "base-v0"
    assert report["champion"]["traffic_share"] == pytest.approx(0.91)
    [test] = report["ab_tests"]
    assert (test["version"], test["status"], test["traffic_share"]) == ("cycle-0001-lora", "treatment", 0.09)
    assert (test["last_look"]["outcome"], test["last_look"]["users_treatment"]) == ("CONTINUE", 120)
    assert [(r["version"], r["status"]) for r in report["history"]] == [
        ("base-v0", "champion"), ("cycle-0001-lora", "candidate"), ("cycle-0002-lora", "candidate"),
        ("cycle-0001-lora", "treatment")]
    assert report["now"] == "2026-11-26T12:00:00Z"  # the flywheel clock, not the wall clock

    text = run("status", "--history", "1")
    assert text.exit_code == 0
    assert "champion   base-v0 on 91% of users" in text.output
    assert "A/B test   cycle-0001-lora as treatment on 9% of users" in text.output
    assert "CONTINUE (treatment, rule min_users)" in text.output and "effect +0.031 [-0.050, +0.110]" in text.output
    assert "1 latest changes of 3 versions" in text.output


def test_status_on_a_missing_home_says_so(tmp_path):
    result = run("--home", str(tmp_path / "nowhere"), "status")
    assert result.exit_code == EXIT_NOT_FOUND
    assert "does not exist" in result.output


def test_promote_writes_a_history_row_with_the_actor_and_reason(registry):
    assert run("promote", "cycle-0001-lora", "--to", "treatment", "--reason", "manual test").exit_code == 0
    result = run("promote", "cycle-0001-lora", "--reason", "looks good to me")
    assert result.exit_code == 0, result.output
    assert "cycle-0001-lora: treatment -> champion" in result.output
    assert "base-v0: champion -> retired" in result.output
    last = registry.history("cycle-0001-lora")[-1]
    assert (last["status"], last["actor"], last["reason"], last["traffic_share"]) == (
        "champion", ACTOR, "looks good to me", 1.0)
    old = registry.history("base-v0")[-1]
    assert (old["status"], old["actor"]) == ("retired", ACTOR)
    assert old["reason"] == "replaced by cycle-0001-lora: looks good to me"
    report = json.loads(run("status", "--json").output)
    assert report["champion"]["version"] == "cycle-0001-lora"
    assert report["history"][-1]["actor"] == ACTOR


def test_rollback_of_the_champion_reinstates_the_previous_one_and_shows_in_history(registry):
    registry.transition("cycle-0001-lora", "treatment", reason="canary healthy", actor="ab_monitor")
    registry.transition("cycle-0001-lora", "champion", reason="A/B SHIP", actor="ab_monitor")
    result = run("rollback", "cycle-0001-lora", "--reason", "complaints from acme")
    assert result.exit_code == 0, result.output
    assert registry.champion()["version"] == "base-v0"
    rolled = registry.get("cycle-0001-lora")
    assert (rolled["status"], rolled["actor"], rolled["reason"]) == ("rolled_back", ACTOR, "complaints from acme")
    history = json.loads(run("status", "--json", "--history", "2").output)["history"]
    assert [(r["version"], r["status"], r["actor"]) for r in history] == [
        ("cycle-0001-lora", "rolled_back", ACTOR), ("base-v0", "champion", ACTOR)]


@pytest.mark.parametrize("args, code, message", [
    (("promote", "cycle-0009-lora", "--reason", "x"), EXIT_NOT_FOUND, "unknown version 'cycle-0009-lora'"),
    (("rollback", "nope", "--reason", "x"), EXIT_NOT_FOUND, "unknown version 'nope'"),
    (("promote", "cycle-0001-lora", "--reason", "x"), EXIT_REFUSED, "cannot go from candidate to champion"),
    (("rollback", "base-v0", "--reason", "x"), EXIT_REFUSED, "no retired champion to reinstate"),
    (("promote", "cycle-0001-lora", "--to", "treatment", "--share", "0.995", "--reason", "x"), EXIT_REFUSED,
     "exceeds 1"),
    (("promote", "cycle-0001-lora"), EXIT_USAGE, "--reason"),
    (("promote", "cycle-0001-lora", "--reason", "  "), EXIT_USAGE, "--reason must not be empty"),
    (("promote", "cycle-0001-lora", "--to", "retired", "--reason", "x"), EXIT_USAGE, "retired"),
])
def test_bad_registry_changes_give_the_documented_exit_code_and_write_nothing(registry, lake, args, code, message):
    registry.transition("cycle-0002-lora", "canary", reason="gate", actor="ab_monitor")
    before = lake.version(MODEL_REGISTRY)
    result = run(*args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert lake.version(MODEL_REGISTRY) == before


def test_ingest_puts_every_line_in_a_table_or_quarantine_and_never_twice(config, lake, tmp_path):
    source = write_lines(tmp_path / "outside" / "batch.jsonl", [trajectory("t1"), trajectory("t2"), "{not json", "[1, 2]"])
    result = run("ingest", str(source), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["rows_new"], summary["duplicates"]) == ({"trajectories": 2}, {"trajectories": 0})
    assert summary["quarantined"] == {"malformed_json": 1, "not_an_object": 1}
    assert sorted(lake.read(TRAJECTORIES).column("trajectory_id").to_pylist()) == ["t1", "t2"]
    assert sorted(lake.read(QUARANTINE).column("source_line").to_pylist()) == [3, 4]
    # the copy is kept in the landing zone, already in the ledger, so landing_sensor has nothing to do
    [ledger] = lake.read(INGESTED_FILES).to_pylist()
    copy = config.landing / ledger["source_file"]
    assert ledger["source_file"].startswith("trajectories/cli/") and copy.read_bytes() == source.read_bytes()
    assert (ledger["lines"], ledger["rows_new"], ledger["rows_quarantined"]) == (4, 2, 2)
    assert pending_files(config, lake) == []
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".")]

    again = run("ingest", str(source))
    assert again.exit_code == 0
    assert "already ingested" in again.output and "new rows: none" in again.output
    overlapping = run("ingest", str(write_lines(tmp_path / "more.jsonl", [trajectory("t1"), trajectory("t3")])))
    assert overlapping.exit_code == 0
    assert "new rows: 1 trajectories; duplicates: 1; quarantined: 0" in overlapping.output
    assert lake.row_count(TRAJECTORIES) == 3 and lake.row_count(INGESTED_FILES) == 2


def test_ingest_of_a_folder_takes_the_kind_from_subfolders_or_content(config, lake, tmp_path):
    folder = tmp_path / "drop"
    write_lines(folder / "events" / "a.jsonl", [
        {"event_id": "e1", "session_id": "s-t1", "user_id": "u1", "event_type": "output_accepted",
         "ts": "2026-11-25T08:01:00Z", "trajectory_id": "t1"}])
    (folder / "mixed").mkdir()
    with gzip.open(folder / "mixed" / "runs.jsonl.gz", "wt") as handle:  # no kind folder: the lines tell
        handle.write(json.dumps(trajectory("t1")) + "\n")
    result = run("ingest", str(folder))
    assert result.exit_code == 0, result.output
    assert "new rows: 1 events, 1 trajectories; duplicates: 0; quarantined: 0" in result.output
    assert lake.read(SESSION_EVENTS).column("event_id").to_pylist() == ["e1"]


def test_ingest_in_the_landing_zone_ingests_pending_files_in_place(config, lake):
    landed = write_lines(config.landing / "trajectories" / "agent.jsonl", [trajectory("t5")])
    result = run("ingest", str(config.landing))
    assert result.exit_code == 0, result.output
    assert "trajectories/agent.jsonl: 1 lines, 1 new" in result.output
    assert lake.read(INGESTED_FILES).column("source_file").to_pylist() == ["trajectories/agent.jsonl"]
    assert sorted(p.name for p in landed.parent.iterdir()) == ["agent.jsonl"]  # no copy


@pytest.mark.parametrize("content, args, code, message", [
    (None, (), EXIT_NOT_FOUND, "does not exist"),
    (['{"hello": "world"}'], (), EXIT_USAGE, "pass --kind"),
    (['{"hello": "world"}'], ("--kind", "nonsense"), EXIT_USAGE, "nonsense"),
])
def test_ingest_bad_arguments(config, lake, tmp_path, content, args, code, message):
    path = tmp_path / "in.jsonl"
    if content is not None:
        write_lines(path, content)
    result = run("ingest", str(path), *args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not lake.exists(INGESTED_FILES)


def test_ingest_with_kind_quarantines_lines_of_the_wrong_shape(lake, tmp_path):
    path = write_lines(tmp_path / "in.jsonl", ['{"hello": "world"}'])
    result = run("ingest", str(path), "--kind", "annotations", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["quarantined"] == {"missing_key": 1}


def test_annotate_goes_through_the_landing_zone_and_overrides_the_score(config, lake, tmp_path):
    clock.set_now(config, NOW)
    run("ingest", str(write_lines(tmp_path / "t.jsonl", [trajectory("t1"), trajectory("t2")])))
    result = run("annotate", "t1", "--label", "bad", "--note", "wrong capital")
    assert result.exit_code == 0, result.output
    [line] = [json.loads(p.read_text()) for p in (config.landing / "annotations").glob("cli-*.jsonl")]
    assert line == {"trajectory_id": "t1", "score": -1.0, "annotator": ACTOR, "note": "wrong capital",
                    "annotated_at": "2026-11-26T12:00:00Z"}
    assert [f.kind for f in pending_files(config, lake)] == ["annotations"]  # landing_sensor's to ingest

    ingest_landing(config, lake, log=lambda _: None)  # what ingest_job does, then its scoring
    con = duckdb.connect()
    for table in (TRAJECTORIES, SESSION_EVENTS, SESSION_FEEDBACK, JUDGE_SCORES, ANNOTATIONS):
        lake.register(con, table)
    scores = {r["trajectory_id"]: r for r in trajectory_scores(con, config).to_pylist()}
    assert (scores["t1"]["combined_score"], scores["t1"]["score_source"], scores["t1"]["human_verified"]) == (
        -1.0, "annotation", True)
    assert scores["t2"]["score_source"] != "annotation"


def test_annotate_with_ingest_writes_bronze_now(config, lake, tmp_path):
    run("ingest", str(write_lines(tmp_path / "t.jsonl", [trajectory("t1")])))
    result = run("annotate", "t1", "--score", "0.5", "--annotator", "alice", "--ingest")
    assert result.exit_code == 0, result.output
    [row] = lake.read(ANNOTATIONS).to_pylist()
    assert (row["trajectory_id"], row["score"], row["annotator"], row["note"]) == ("t1", 0.5, "alice", None)
    assert pending_files(config, lake) == []


@pytest.mark.parametrize("args, code, message", [
    (("t9", "--score", "1"), EXIT_NOT_FOUND, "unknown trajectory 't9'"),
    (("t1", "--score", "1.5"), EXIT_USAGE, "within [-1, 1]"),
    (("t1",), EXIT_USAGE, "exactly one of --score"),
    (("t1", "--score", "1", "--label", "good"), EXIT_USAGE, "exactly one of --score"),
])
def test_annotate_bad_arguments(config, lake, tmp_path, args, code, message):
    run("ingest", str(write_lines(tmp_path / "t.jsonl", [trajectory("t1")])))
    result = run("annotate", *args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not (config.landing / "annotations").exists()


@pytest.fixture
def dataset(config, lake) -> dict:
    """cycle-0001's rows as training_dataset stores them (not in selection order) and its original export."""
    rows = pa.Table.from_pylist([{
        "cycle": "cycle-0001", "trajectory_id": f"t{i}", "session_id": f"s{i}", "task_type": "capital_lookup",
        "tier": tier, "weight": weight, "combined_score": 0.5, "selection_rank": i,
        "messages_json": json.dumps([{"role": "user", "content": f"Capital n°{i}?"},
                                     {"role": "assistant", "content": "Lima."}]),
        "tools_json": "[]"} for i, (tier, weight) in enumerate([("gold", 2.0), ("silver", 1.0), ("bronze", 0.3)])],
        schema=TRAINING_DATASET.schema)
    selected = rows.take([2, 0, 1])
    original = config.datasets / "cycle-0001" / "train.jsonl"
    sha = export_chat_jsonl(selected, original)
    lake.append(TRAINING_DATASET, rows)
    lake.append(DATASET_MANIFESTS, pa.Table.from_pylist([{
        "cycle": "cycle-0001", "created_at": NOW, "n_rows": 3, "trajectory_ids": ["t2", "t0", "t1"],
        "export_path": "datasets/cycle-0001/train.jsonl", "content_sha256": sha}], schema=DATASET_MANIFESTS.schema))
    return {"path": original, "sha": sha}


def test_export_writes_the_cycles_exact_rows_to_a_file_or_stdout(dataset, tmp_path):
    out = tmp_path / "out" / "cycle-0001.jsonl"
    result = run("export", "cycle-0001", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == dataset["path"].read_bytes()
    assert f"3 rows to {out}; sha256 {dataset['sha']} matches the manifest" in result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["trajectory_id"], r["tier"], r["weight"]) for r in lines] == [
        ("t2", "bronze", 0.3), ("t0", "gold", 2.0), ("t1", "silver", 1.0)]
    assert lines[1]["messages"][0] == {"role": "user", "content": "Capital n°0?"}

    stdout = run("export", "cycle-0001")
    assert stdout.exit_code == 0
    assert stdout.stdout.encode() == dataset["path"].read_bytes()
    assert hashlib.sha256(stdout.stdout.encode()).hexdigest() == dataset["sha"]


def test_export_of_an_unknown_cycle_names_the_known_ones(dataset):
    result = run("export", "cycle-0042")
    assert result.exit_code == EXIT_NOT_FOUND
    assert "unknown cycle 'cycle-0042'" in result.output and "known: cycle-0001" in result.output


def test_flywheel_config_is_respected_and_a_missing_one_is_an_error(registry, tmp_path, monkeypatch):
    settings = tmp_path / "flywheel.json"
    settings.write_text(json.dumps({"trigger": {"phase1_min_real": 0}}))
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(settings))
    report = json.loads(run("status", "--json").output)
    assert (report["phase"], report["phase_thresholds"]["phase1"]) == (1, 0)
    trigger = report["trigger"]
    assert trigger["reason"] == "force trigger: never trained" and trigger["rules_say_train"] is True
    # ...but, as training_trigger would, status waits while a candidate is still under evaluation
    assert trigger["train"] is False
    assert trigger["blocked_by"].startswith("cycle-0001-lora is still being evaluated or A/B tested")
    missing = run("--config", str(tmp_path / "nope.json"), "status")
    assert missing.exit_code == EXIT_NOT_FOUND and "configuration file not found" in missing.output
