"""Input a hostile or careless operator drops: links, special files, poison, odd names, re-dropped labels."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time

import pytest
from typer.testing import CliRunner

from flywheel_assets_tests.helpers import landing_sensor_ticks, write_lines
from flywheel_assets_tests.ingest.faults import lock_held_elsewhere
from flywheel_assets_tests.ingest.test_ingest import HERMES, event
from flywheel_assets.cli import EXIT_BUSY, EXIT_WRITE_FAILED, app
from flywheel_assets.lib.ingest import parsing, pipeline
from flywheel_assets.lib.ingest.cleanup import clean_stale
from flywheel_assets.lib.ingest.landing import STAGING_PREFIX
from flywheel_assets.lib.ingest.pipeline import ingest_landing
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import ANNOTATIONS, INGESTED_FILES, QUARANTINE, SESSION_EVENTS, TRAJECTORIES


def quiet(_: str) -> None:
    pass


def test_a_symlink_is_recorded_never_followed(config, lake, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 20)
    (config.landing / "events").mkdir(parents=True)
    os.symlink(secret, config.landing / "events" / "p.jsonl")
    os.symlink(tmp_path, config.landing / "events" / "linked-folder")  # a linked folder is not entered
    report = ingest_landing(config, lake, log=quiet)
    [row] = lake.read(QUARANTINE).to_pylist()
    assert (row["reason_code"], row["source_file"], row["raw"]) == ("unreadable_file", "events/p.jsonl", "")
    assert "symbolic link" in row["reason"] and "root:x" not in json.dumps(row, default=str)
    assert [f["file"] for f in report.files] == ["events/p.jsonl"]
    assert ingest_landing(config, lake, log=quiet).files == []  # recorded once


@pytest.mark.parametrize("name,data,expected", [
    ("truncated.jsonl.gz", gzip.compress(b'{"a": 1}\n' * 1000)[:15], "truncated"),
    ("plain.jsonl.gz", b'{"not": "gzip"}\n', "not a gzip file"),
    ("corrupt.jsonl.gz", gzip.compress(b"x\n")[:10] + b"\x00garbage" * 10, "corrupt gzip data"),
])
def test_a_poison_file_is_quarantined_as_a_file_and_the_others_still_land(config, lake, name, data, expected):
    write_lines(config.landing / "events" / "a-before.jsonl", [event(1)])
    (config.landing / "events" / name).write_bytes(data)
    os.utime(config.landing / "events" / name, ns=(2 * 10**18,) * 2)  # the newest: read between the others
    write_lines(config.landing / "events" / "z-after.jsonl", [event(2)])
    os.utime(config.landing / "events" / "z-after.jsonl", ns=(3 * 10**18,) * 2)
    ingest_landing(config, lake, log=quiet)
    assert sorted(lake.read(SESSION_EVENTS).column("event_id").to_pylist()) == ["e1", "e2"]
    [row] = lake.read(QUARANTINE).to_pylist()
    assert row["source_file"] == f"events/{name}" and expected in row["reason"] and str(len(data)) in row["reason"]
    assert len(lake.read(INGESTED_FILES)) == 3


def test_an_unreadable_file_is_quarantined_with_its_error(config, lake, monkeypatch):
    write_lines(config.landing / "trajectories" / "locked.jsonl", [HERMES])
    write_lines(config.landing / "trajectories" / "open.jsonl", [{**HERMES, "trajectory_id": "h2"}])
    real_open = parsing.read_line_batches

    def refuse(path, *args):  # root reads any file whatever its mode, so the refusal is simulated
        if path.name == "locked.jsonl":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args)

    monkeypatch.setattr(parsing, "read_line_batches", refuse)
    ingest_landing(config, lake, log=quiet)
    assert lake.read(TRAJECTORIES).column("trajectory_id").to_pylist() == ["h2"]
    [row] = lake.read(QUARANTINE).to_pylist()
    assert "PermissionError: Permission denied" in row["reason"]


@pytest.mark.parametrize("kind,line,reason", [
    ("trajectories", json.dumps({**HERMES, "created_at": "0001-01-01T00:00:00+05:00"}), "outside"),
    ("trajectories", json.dumps({**HERMES, "created_at": "9999-12-31T23:00:00-05:00"}), "outside"),
    ("trajectories", json.dumps(HERMES)[:-1] + ', "extra": ' + "[" * 1000 + "]" * 1000 + "}", "nested deeper"),
    ("annotations", '{"trajectory_id": "h1", "score": 1, "note": ' + "[" * 1000 + "]" * 1000 + "}", "nested deeper"),
    ("annotations", json.dumps({"trajectory_id": "h1", "score": 1, "annotated_at": "0001-01-01T00:00:00+05:00"}),
     "outside"),
    ("events", json.dumps(event(1, ts="9999-12-31T23:00:00-05:00")), "outside"),
    ("events", json.dumps(event(1, ts="20000-01-01T00:00:00Z")), "outside"),
    ("events", json.dumps(event(1, data={"deep": "x"}))[:-2] + ', "d": ' + "[" * 1000 + "]" * 1000 + "}}", "nested deeper"),
])
def test_a_line_that_breaks_a_parser_is_quarantined_and_the_run_goes_on(config, lake, kind, line, reason):
    good = {"events": event(5), "trajectories": {**HERMES, "trajectory_id": "ok"},
            "annotations": {"trajectory_id": "ok", "score": 1}}[kind]
    write_lines(config.landing / kind / "a.jsonl", [line, good])
    ingest_landing(config, lake, log=quiet)
    [row] = lake.read(QUARANTINE).to_pylist()
    assert row["source_line"] == 1 and reason in row["reason"], row["reason"]
    table = {"events": SESSION_EVENTS, "trajectories": TRAJECTORIES, "annotations": ANNOTATIONS}[kind]
    assert lake.read(table).to_pylist()  # readable, the good line in it
    assert lake.row_count(table) == 1


def test_annotations_are_idempotent_and_an_old_label_dropped_again_stays_old(config, lake):
    labels = [{"trajectory_id": "t1", "score": 1, "annotator": "ann"},
              {"trajectory_id": "t1", "label": "bad", "annotator": "ann", "annotated_at": "2026-11-01T00:00:00Z"}]
    first = write_lines(config.landing / "annotations" / "a.jsonl", labels)
    ingest_landing(config, lake, log=quiet)
    stored = {r["annotation_id"]: r["annotated_at"] for r in lake.read(ANNOTATIONS).to_pylist()}
    shutil.copyfile(first, config.landing / "annotations" / "copy.jsonl")
    os.utime(first, ns=(first.stat().st_mtime_ns + 10**9,) * 2)  # touched: read again
    time.sleep(0.01)
    report = ingest_landing(config, lake, log=quiet)
    assert report.rows_new["annotations"] == 0 and report.duplicates["annotations"] == 4
    assert {r["annotation_id"]: r["annotated_at"] for r in lake.read(ANNOTATIONS).to_pylist()} == stored


def test_bom_upper_case_suffix_and_unscored_event_types(config, lake):
    folder = config.landing / "events"
    folder.mkdir(parents=True)
    (folder / "WINDOWS.JSONL").write_bytes(b"\xef\xbb\xbf" + json.dumps(event(1)).encode() + b"\r\n"
                                           + json.dumps(event(2, event_type="")).encode() + b"\r\n"
                                           + json.dumps(event(3, event_type="Output_Accepted")).encode() + b"\r\n")
    report = ingest_landing(config, lake, log=quiet)
    assert lake.row_count(QUARANTINE) == 0 and lake.row_count(SESSION_EVENTS) == 3
    assert report.unscored_event_types == {"": 1, "Output_Accepted": 1}


def test_a_retry_after_a_failure_mid_file_counts_the_file_truly(config, lake, monkeypatch):
    monkeypatch.setattr(pipeline, "COMMIT_ROWS", 10)
    config.ingest.batch_lines = 10
    write_lines(config.landing / "events" / "big.jsonl", [event(i) for i in range(35)] + ["{bad"])
    calls = []
    original = Lake.append

    def fail_third(lake_, table, rows):
        calls.append(table.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(lake_, table, rows)

    monkeypatch.setattr(Lake, "append", fail_third)
    with pytest.raises(pipeline.IngestError, match="big.jsonl to bronze/session_events failed"):
        ingest_landing(config, lake, log=quiet)
    assert lake.row_count(INGESTED_FILES) == 0 and lake.row_count(SESSION_EVENTS) == 20
    monkeypatch.setattr(Lake, "append", original)
    report = ingest_landing(config, lake, log=quiet)
    [ledger] = lake.read(INGESTED_FILES).to_pylist()
    assert (ledger["lines"], ledger["rows_new"], ledger["rows_duplicate"], ledger["rows_quarantined"]) == (36, 35, 0, 1)
    assert (report.rows_new["events"], report.resumed["events"]) == (15, 20)
    assert lake.row_count(SESSION_EVENTS) == 35


def test_stale_leftovers_are_swept_and_agents_temp_files_kept(config, lake):
    write_lines(config.landing / "events" / "a.jsonl", [event(1)])
    ingest_landing(config, lake, log=quiet)
    table = lake.uri(SESSION_EVENTS)
    orphan = os.path.join(table, "part-00000-orphan-c000.snappy.parquet")
    with open(orphan, "wb") as handle:
        handle.write(b"PAR1 left by a write that never committed")
    commit_tmp = os.path.join(table, "_delta_log", "_commit_1234.json.tmp")
    open(commit_tmp, "w").close()
    staging = config.landing / "events" / "cli" / f"{STAGING_PREFIX}abcd-x.jsonl"
    agents = config.landing / "events" / "agent-writing.jsonl.tmp"
    write_lines(staging, [event(2)])
    write_lines(agents, [event(3)])
    live = set(os.listdir(table))
    old = time.time() - config.ingest.stale_after_s - 60
    for path in (orphan, commit_tmp, staging, agents):
        os.utime(path, (old, old))
    assert clean_stale(config, lake, now=old + 30) == []  # younger than the grace period then
    deleted = set(clean_stale(config, lake))
    assert deleted == {orphan, commit_tmp, str(staging)}
    assert agents.exists() and live - {os.path.basename(orphan)} <= set(os.listdir(table))
    assert lake.read(SESSION_EVENTS).column("event_id").to_pylist() == ["e1"]


def test_the_cli_says_what_went_wrong_with_an_exit_code(config, lake, tmp_path, monkeypatch):
    runner = CliRunner()
    corrupt = tmp_path / "drop.jsonl.gz"
    corrupt.write_bytes(b'{"not": "gzip"}\n')
    result = runner.invoke(app, ["ingest", str(corrupt)])
    assert result.exit_code == 2 and "cannot be read: not a gzip file" in result.output
    result = runner.invoke(app, ["ingest", str(corrupt), "--kind", "events"])
    assert result.exit_code == 0 and "1 quarantined (not a gzip file" in result.output

    good = write_lines(tmp_path / "good.jsonl", [event(1)])
    config.ingest.lock_timeout_s = 0.2
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(write_config(tmp_path, {"ingest": {"lock_timeout_s": 0.2}})))
    with lock_held_elsewhere(config.landing, "someone else"):
        result = runner.invoke(app, ["ingest", str(good)])
    assert result.exit_code == EXIT_BUSY and "another ingest is running" in result.output

    monkeypatch.setattr(Lake, "append", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    result = runner.invoke(app, ["ingest", str(good)])
    assert result.exit_code == EXIT_WRITE_FAILED and "No space left on device" in result.output
    assert "reads them again" in result.output


def write_config(folder, settings: dict):
    path = folder / "flywheel.json"
    path.write_text(json.dumps(settings))
    return path


def test_a_rust_panic_in_a_write_fails_the_run_and_records_nothing(config, lake, monkeypatch):
    class PanicException(BaseException):  # what pyo3 raises for a panic in deltalake: not an Exception
        pass

    write_lines(config.landing / "annotations" / "a.jsonl", [{"trajectory_id": "t1", "score": 1}])
    original = Lake.append

    def panic(lake_, table, rows):
        if table is ANNOTATIONS:
            raise PanicException("called `Option::unwrap()` on a `None` value")
        return original(lake_, table, rows)

    monkeypatch.setattr(Lake, "append", panic)
    with pytest.raises(pipeline.IngestError, match="PanicException"):
        ingest_landing(config, lake, log=quiet)
    assert lake.row_count(INGESTED_FILES) == 0
    monkeypatch.setattr(Lake, "append", original)
    ingest_landing(config, lake, log=quiet)
    assert lake.row_count(ANNOTATIONS) == 1


def test_a_lone_surrogate_is_quarantined_not_a_crash(config, lake):
    write_lines(config.landing / "trajectories" / "a.jsonl", [
        '{"trajectory_id": "t2", "messages": [{"role": "user", "content": "\\ud800"}, '
        '{"role": "assistant", "content": "ok"}]}', {**HERMES, "trajectory_id": "fine"}])
    write_lines(config.landing / "annotations" / "b.jsonl", ['{"trajectory_id": "t\\udfff", "score": 1}'])
    ingest_landing(config, lake, log=quiet)
    assert lake.read(TRAJECTORIES).column("trajectory_id").to_pylist() == ["fine"]
    assert sorted(r["reason_code"] for r in lake.read(QUARANTINE).to_pylist()) == ["not_utf8", "not_utf8"]


def test_an_unterminated_string_full_of_escaped_quotes_is_read_in_linear_time(config, lake):
    # the string pattern of the depth check was quadratic here (40k escapes took 36 s, 1 MB hours)
    line = "[" * 101 + '"' + '\\"' * 200_000
    write_lines(config.landing / "trajectories" / "a.jsonl", [line, HERMES])
    ingest_landing(config, lake, log=quiet)
    assert [r["reason_code"] for r in lake.read(QUARANTINE).to_pylist()] == ["too_deep"]
    assert lake.row_count(TRAJECTORIES) == 1


def test_a_fault_of_the_machine_fails_the_run_and_the_file_is_read_again(config, lake, monkeypatch):
    write_lines(config.landing / "events" / "a.jsonl", [event(1)])
    real = parsing.read_line_batches

    def io_error(path, *args):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(parsing, "read_line_batches", io_error)
    with pytest.raises(pipeline.IngestError, match="Input/output error.*read again by the next ingest"):
        ingest_landing(config, lake, log=quiet)
    assert lake.row_count(QUARANTINE) == 0 and lake.row_count(INGESTED_FILES) == 0
    monkeypatch.setattr(parsing, "read_line_batches", real)
    assert ingest_landing(config, lake, log=quiet).rows_new["events"] == 1


def test_a_failed_cli_ingest_leaves_the_file_in_the_landing_zone_for_the_sensor(config, lake, tmp_path, monkeypatch):
    source = write_lines(tmp_path / "drop.jsonl", [event(1), event(2)])
    original = Lake.append
    monkeypatch.setattr(Lake, "append", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert CliRunner().invoke(app, ["ingest", str(source), "--kind", "events"]).exit_code == EXIT_WRITE_FAILED
    monkeypatch.setattr(Lake, "append", original)
    [landed] = [p for p in (config.landing / "events" / "cli").iterdir()]
    assert not landed.name.startswith(".") and landed.read_bytes() == source.read_bytes()
    assert [f.relative for f in pipeline.pending_files(config, lake)] == [f"events/cli/{landed.name}"]
    assert ingest_landing(config, lake, log=quiet).rows_new["events"] == 2


def test_a_partial_data_file_of_a_killed_write_is_swept(config, lake):
    write_lines(config.landing / "events" / "a.jsonl", [event(1)])
    ingest_landing(config, lake, log=quiet)
    partial = os.path.join(lake.uri(SESSION_EVENTS), "part-00001-abc-c000.snappy.parquet#1")
    with open(partial, "wb") as handle:
        handle.write(b"PAR1 half written")
    old = time.time() - config.ingest.stale_after_s - 60
    os.utime(partial, (old, old))
    assert clean_stale(config, lake) == [partial]


def test_landing_sensor_sees_a_file_renamed_in_with_an_old_mtime(home, config):
    tick = landing_sensor_ticks(home)
    early = write_lines(config.landing / ".a.jsonl.tmp", [event(1)])  # written first, renamed in last
    os.utime(early, ns=(10**18, 10**18))
    write_lines(config.landing / "events" / "b.jsonl", [event(2)])
    first = tick(None)
    os.replace(early, config.landing / "events" / "a.jsonl")  # os.replace keeps the old mtime
    second = tick(first.cursor)
    assert [r.tags["flywheel/newest"] for r in second.run_requests] == ["events/a.jsonl"]
