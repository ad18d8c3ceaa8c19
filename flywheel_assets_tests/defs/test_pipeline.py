"""The Dagster objects over a temporary FLYWHEEL_HOME: one materialization of the whole
chain, the landing sensor's cursor, the blocking checks, the immutable dataset."""

from __future__ import annotations

import json

import dagster as dg

from flywheel_assets.defs.curation.assets import curated_trajectories, training_dataset
from flywheel_assets.defs.curation.checks import no_holdout_leakage, no_pii_in_training_set
from flywheel_assets.defs.feedback.assets import judge_scores, session_feedback, trajectory_scores
from flywheel_assets.defs.feedback.checks import scores_within_bounds
from flywheel_assets.defs.ingest.assets import bronze_ingest
from flywheel_assets.defs.ingest.checks import session_events_check, trajectories_check
from flywheel_assets.defs.resources import FlywheelResource
from flywheel_assets.lib.curation.scrub import find_pii
from flywheel_assets.lib.simulation.seed import seed_demo_usage, write_cold_start
from flywheel_assets.lib.tables import (
    DATASET_MANIFESTS, INGESTED_FILES, QUARANTINE, TRAINING_DATASET, TRAJECTORIES, TRAJECTORY_SCORES,
)
from flywheel_assets_tests.helpers import landing_sensor_ticks, write_lines

UNPARTITIONED = [bronze_ingest, session_feedback, judge_scores, trajectory_scores, curated_trajectories]
CHECKS = [session_events_check, trajectories_check, scores_within_bounds]


def _lines(path):
    import gzip

    with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as handle:
        return handle.read().split(b"\n")


def test_definitions_load_with_stages_as_groups():
    from flywheel_assets.definitions import defs

    loaded = defs()
    graph = loaded.resolve_asset_graph()
    groups = {graph.get(key).group_name for key in graph.get_all_asset_keys()}
    assert {"ingest", "feedback", "curation"} <= groups
    assert loaded.resolve_sensor_def("landing_sensor").default_status == dg.DefaultSensorStatus.RUNNING
    assert loaded.resolve_job_def("ingest_job") and loaded.resolve_job_def("dataset_job")


def test_whole_chain_on_the_shipped_demo_data(home, config, lake):
    config.cold_start.synthetic_trajectories = 100
    write_cold_start(config)
    seed_demo_usage(config)
    instance = dg.DagsterInstance.ephemeral()
    resources = {"flywheel": FlywheelResource(home=str(home))}
    result = dg.materialize(UNPARTITIONED + CHECKS, resources=resources, instance=instance)
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"session_events_schema_and_rows": True, "trajectories_schema_and_rows": True,
                      "scores_within_bounds": True}

    # every line of every landing file is in a table (new or already there) or in quarantine
    ledger = lake.read(INGESTED_FILES).to_pylist()
    assert len(ledger) == len(list((config.landing).rglob("*.jsonl*")))
    assert all(f["lines"] == f["rows_new"] + f["rows_duplicate"] + f["rows_quarantined"] for f in ledger)
    assert sum(f["lines"] for f in ledger) == sum(
        1 for path in config.landing.rglob("*.jsonl*") for line in _lines(path) if line.strip())
    assert lake.row_count(QUARANTINE) == sum(f["rows_quarantined"] for f in ledger) > 0
    assert lake.row_count(TRAJECTORIES) >= 36
    scores = lake.read(TRAJECTORY_SCORES).to_pylist()
    assert {s["tier"] for s in scores} == {"platinum", "gold", "silver", "bronze"}
    golden = [s for s in scores if s["origin"] == "golden"]
    assert len(golden) >= 30 and all(s["tier"] == "platinum" for s in golden)

    instance.add_dynamic_partitions("cycle", ["c1"])
    cycle = dg.materialize([training_dataset, no_pii_in_training_set, no_holdout_leakage], partition_key="c1",
                           resources=resources, instance=instance, selection=[training_dataset])
    assert cycle.success
    assert {e.check_name: e.passed for e in cycle.get_asset_check_evaluations()} == {
        "no_pii_in_training_set": True, "no_holdout_leakage": True}
    rows = lake.read(TRAINING_DATASET).to_pylist()
    manifest = lake.read(DATASET_MANIFESTS).to_pylist()[0]
    assert manifest["n_rows"] == len(rows) > 0
    assert sorted(manifest["trajectory_ids"]) == sorted(r["trajectory_id"] for r in rows)
    assert json.loads(manifest["input_versions_json"])["trajectories"] == lake.version(TRAJECTORIES)
    exported = (config.home / manifest["export_path"]).read_text().splitlines()
    assert len(exported) == len(rows)
    first = json.loads(exported[0])
    assert {"messages", "tools", "weight", "tier"} <= set(first) and first["messages"][0]["role"] in ("system", "user")
    assert not any(find_pii(line) for line in exported)
    # the manifest table is an asset of its own: its new row is a materialization in this run
    recorded = [m for m in cycle.get_asset_materialization_events() if m.asset_key.to_user_string() == "dataset_manifests"]
    assert len(recorded) == 1 and recorded[0].materialization.metadata["n_rows"].value == len(rows)

    # immutable: a second materialization of the cycle keeps the same rows
    again = dg.materialize([training_dataset], partition_key="c1", resources=resources, instance=instance)
    assert again.success and lake.row_count(TRAINING_DATASET) == len(rows)


def test_blocking_pii_check_fails_on_a_leaked_dataset(home, config, lake):
    import pyarrow as pa

    from flywheel_assets.lib.lake import conform

    lake.append(TRAINING_DATASET, conform(pa.Table.from_pylist([
        {"cycle": "bad", "trajectory_id": "t1", "messages_json": json.dumps([{"role": "user", "content": "mail me at ann@example.com"}])},
    ]), TRAINING_DATASET))
    # a dataset written before the scrubber learned a pattern: the manifest exists, so it is kept as is
    lake.append(DATASET_MANIFESTS, conform(pa.Table.from_pylist([
        {"cycle": "bad", "n_rows": 1, "tier_counts_json": "{}", "task_type_counts_json": "{}",
         "input_versions_json": "{}", "export_path": "datasets/bad/train.jsonl", "content_sha256": ""},
    ]), DATASET_MANIFESTS))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("cycle", ["bad"])
    result = dg.materialize([training_dataset, no_pii_in_training_set], partition_key="bad", instance=instance,
                            resources={"flywheel": FlywheelResource(home=str(home))}, raise_on_error=False)
    evaluations = result.get_asset_check_evaluations()
    assert [(e.check_name, e.passed) for e in evaluations] == [("no_pii_in_training_set", False)]
    assert evaluations[0].metadata["rows_with_pii"].value == 1


def test_landing_sensor_cursor(home, config):
    tick = landing_sensor_ticks(home)
    instance = tick.instance

    empty = tick(None)
    assert empty.run_requests == [] and empty.skip_message.startswith("no new ready file")
    write_lines(config.landing / "events" / "a.jsonl", [{"x": 1}])
    write_lines(config.landing / "events" / ".b.jsonl.tmp", [{"x": 1}])
    first = tick(None)
    assert len(first.run_requests) == 1 and first.run_requests[0].tags["flywheel/files"] == "1"
    cursor = json.loads(first.cursor)
    assert cursor["path"] == "events/a.jsonl"
    # nothing new since the cursor: no second request, even though a.jsonl is not ingested yet
    assert tick(first.cursor).run_requests == []
    # the writer renames its temp file: a new request for that file only
    (config.landing / "events" / ".b.jsonl.tmp").rename(config.landing / "events" / "b.jsonl")
    second = tick(first.cursor)
    assert [r.tags["flywheel/newest"] for r in second.run_requests] == ["events/b.jsonl"]
    assert second.run_requests[0].tags["flywheel/files"] == "1"
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    assert json.loads(second.cursor)["path"] == "events/b.jsonl"
    # while a simulated day is writing, its files wait for one ingest; the cursor does not move
    day = dg.DagsterRun(job_name="simulated_usage_job", status=dg.DagsterRunStatus.STARTED)
    instance.add_run(day)
    write_lines(config.landing / "trajectories" / "c.jsonl", [{"x": 1}])
    waiting = tick(second.cursor)
    assert waiting.run_requests == [] and waiting.cursor == second.cursor
    assert waiting.skip_message == (f"1 new file(s), but simulated day run {day.run_id} is still writing to the "
                                    "landing zone: ingesting once it ends")
    instance.handle_run_event(day.run_id, dg.DagsterEvent(
        event_type_value="PIPELINE_SUCCESS", job_name=day.job_name, message="done"))
    assert [r.tags["flywheel/newest"] for r in tick(second.cursor).run_requests] == ["trajectories/c.jsonl"]
