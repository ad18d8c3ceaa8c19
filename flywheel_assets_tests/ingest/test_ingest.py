"""Landing zone → bronze: every line in a table or in quarantine, and never twice."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from flywheel_assets_tests.helpers import write_lines
from flywheel_assets.lib.ingest.pipeline import ingest_landing, pending_files
from flywheel_assets.lib.tables import ANNOTATIONS, INGESTED_FILES, QUARANTINE, SESSION_EVENTS, TRAJECTORIES


def event(i: int, **overrides) -> dict:
    base = {"event_id": f"e{i}", "session_id": f"s{i % 3}", "user_id": "u1", "event_type": "output_accepted",
            "ts": "2026-11-26T10:00:00Z", "trajectory_id": f"t{i}"}
    return {**base, **overrides}


HERMES = {
    "trajectory_id": "h1", "session_id": "s1", "user_id": "u1", "task_type": "calculator", "model_version": "v1",
    "created_at": "2026-11-25T08:00:00Z",
    "conversations": [
        {"from": "system", "value": 'Use tools. <tools>[{"type": "function", "function": {"name": "calculator"}}]</tools>'},
        {"from": "human", "value": "What is 663 + 859?"},
        {"from": "gpt", "value": '<tool_call>\n{"name": "calculator", "arguments": {"expression": "663 + 859"}}\n</tool_call>'},
        {"from": "tool", "value": '<tool_response>\n{"name": "calculator", "content": "1522"}\n</tool_response>'},
        {"from": "gpt", "value": "663 + 859 = 1522."},
    ],
}
OPENAI = {
    "trajectory_id": "o1", "session_id": "s2", "user_id": "u2", "tenant_id": "acme", "task_type": "capital_lookup",
    "tools": [{"type": "function", "function": {"name": "lookup_capital"}}],
    "messages": [
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c9", "type": "function", "function": {"name": "lookup_capital", "arguments": '{"country": "Peru"}'}},
            {"id": "c10", "type": "function", "function": {"name": "web_search", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c10", "content": '{"error": "unknown tool"}'},
        {"role": "tool", "tool_call_id": "c9", "content": "Lima"},
        {"role": "assistant", "content": "Lima."},
    ],
}


def test_both_formats_normalise_to_one_schema(config, lake):
    write_lines(config.landing / "trajectories" / "a.jsonl", [HERMES, OPENAI])
    ingest_landing(config, lake, log=lambda _: None)
    rows = {r["trajectory_id"]: r for r in lake.read(TRAJECTORIES).to_pylist()}
    hermes, openai = rows["h1"], rows["o1"]
    assert hermes["source_format"] == "hermes" and openai["source_format"] == "openai"
    assert hermes["tool_calls"] == [{"turn_index": 2, "name": "calculator", "arguments": '{"expression": "663 + 859"}',
                                     "arguments_valid": True, "result": "1522", "success": True}]
    assert hermes["tools_offered"] == ["calculator"]
    assert hermes["system_prompt"] == "Use tools."
    assert (hermes["user_prompt"], hermes["final_response"]) == ("What is 663 + 859?", "663 + 859 = 1522.")
    assert (hermes["n_turns"], hermes["n_tool_calls"], hermes["tenant_id"]) == (5, 1, "default")
    # results are matched to calls by id, whatever order they come back in
    assert [(c["name"], c["arguments_valid"], c["result"], c["success"]) for c in openai["tool_calls"]] == [
        ("lookup_capital", True, "Lima", True), ("web_search", False, '{"error": "unknown tool"}', False)]
    assert openai["tenant_id"] == "acme" and openai["final_response"] == "Lima."


def test_reingest_and_overlapping_files_add_no_row(config, lake):
    write_lines(config.landing / "events" / "a.jsonl", [event(i) for i in range(10)])
    first = ingest_landing(config, lake, log=lambda _: None)
    assert first.rows_new["events"] == 10
    assert ingest_landing(config, lake, log=lambda _: None).files == []  # the ledger knows the file
    # the same content dropped again under another name, and an overlapping file
    write_lines(config.landing / "events" / "copy.jsonl", [event(i) for i in range(10)])
    write_lines(config.landing / "events" / "overlap.jsonl", [event(i) for i in range(5, 15)])
    again = ingest_landing(config, lake, log=lambda _: None)
    assert (again.rows_new["events"], again.duplicates["events"]) == (5, 15)
    assert lake.row_count(SESSION_EVENTS) == 15
    assert sorted(lake.read(SESSION_EVENTS).column("event_id").to_pylist()) == sorted(f"e{i}" for i in range(15))


def test_event_id_is_derived_from_content_when_absent(config, lake):
    anonymous = {k: v for k, v in event(1).items() if k != "event_id"}
    write_lines(config.landing / "events" / "a.jsonl", [anonymous, anonymous])
    write_lines(config.landing / "events" / "b.jsonl", [anonymous, {**anonymous, "ts": "2026-11-26T11:00:00Z"}])
    ingest_landing(config, lake, log=lambda _: None)
    assert lake.row_count(SESSION_EVENTS) == 2


BAD_LINES = [
    ("events", "{not json", "malformed_json"),
    ("events", "[1, 2, 3]", "not_an_object"),
    ("events", json.dumps({k: v for k, v in event(1).items() if k != "session_id"}), "missing_key"),
    ("events", json.dumps(event(1, session_id=42)), "wrong_type"),
    ("events", json.dumps(event(1, ts="yesterday")), "invalid_value"),
    ("events", json.dumps(event(1, event_type="output_edited", data={"edit_ratio": "lots"})), "wrong_type"),
    ("events", json.dumps(event(1, event_type="output_edited", data={"edit_ratio": 1.7})), "invalid_value"),
    ("events", json.dumps(event(1, event_type="output_edited")), "missing_key"),
    ("events", b'{"session_id": "s\xff\xfe"}', "not_utf8"),
    ("events", json.dumps(event(1, data={"blob": "x" * 3000})), "oversized"),
    ("trajectories", json.dumps({"trajectory_id": "x", "prompt": "hi", "completion": "yo"}), "unknown_format"),
    ("trajectories", json.dumps({**HERMES, "is_synthetic": "yes"}), "wrong_type"),
    ("trajectories", json.dumps({**HERMES, "conversations": []}), "invalid_value"),
    ("trajectories", "{\"conversations\": [", "malformed_json"),
    ("trajectories", json.dumps({**HERMES, "padding": "x" * 3000}), "oversized"),
    ("annotations", json.dumps({"trajectory_id": "h1", "score": 3}), "invalid_value"),
    ("annotations", json.dumps({"score": 1}), "missing_key"),
]


@pytest.mark.parametrize("kind,line,reason", BAD_LINES)
def test_each_kind_of_bad_line_is_quarantined_with_its_reason(config, lake, kind, line, reason):
    config.ingest.max_line_bytes = 2000
    good = event(100) if kind == "events" else (HERMES if kind == "trajectories" else {"trajectory_id": "h1", "score": 1})
    write_lines(config.landing / kind / "mixed.jsonl", [good, line, good])
    report = ingest_landing(config, lake, log=lambda _: None)
    quarantined = lake.read(QUARANTINE).to_pylist()
    assert [(q["reason_code"], q["source_line"], q["source_file"], q["kind"]) for q in quarantined] == [
        (reason, 2, f"{kind}/mixed.jsonl", kind)]
    raw = line.decode("utf-8", "backslashreplace") if isinstance(line, bytes) else line
    assert quarantined[0]["raw"] == raw[:2000]
    assert quarantined[0]["raw_truncated"] == (reason == "oversized")
    assert report.rows_new[kind] == 1  # the good line (twice, so one row) still lands
    target = {"events": SESSION_EVENTS, "trajectories": TRAJECTORIES, "annotations": ANNOTATIONS}[kind]
    assert lake.row_count(target) == 1


def test_gzip_files_and_temp_names(config, lake):
    folder = config.landing / "events"
    folder.mkdir(parents=True)
    with gzip.open(folder / "a.jsonl.gz", "wt") as handle:
        handle.write("\n".join(json.dumps(event(i)) for i in range(4)) + "\n\n")
    write_lines(folder / ".b.jsonl.tmp", [event(9)])
    write_lines(folder / "c.jsonl.part", [event(8)])
    assert [f.relative for f in pending_files(config, lake)] == ["events/a.jsonl.gz"]
    ingest_landing(config, lake, log=lambda _: None)
    assert lake.row_count(SESSION_EVENTS) == 4
    ledger = lake.read(INGESTED_FILES).to_pylist()
    assert [(r["source_file"], r["lines"], r["rows_new"]) for r in ledger] == [("events/a.jsonl.gz", 4, 4)]


def test_a_rewritten_file_is_read_again_but_adds_only_new_rows(config, lake):
    path = write_lines(config.landing / "events" / "a.jsonl", [event(1)])
    ingest_landing(config, lake, log=lambda _: None)
    write_lines(path, [event(1), event(2)])
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    report = ingest_landing(config, lake, log=lambda _: None)
    assert (report.rows_new["events"], report.duplicates["events"]) == (1, 1)
