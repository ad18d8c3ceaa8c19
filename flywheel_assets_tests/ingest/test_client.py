"""The logging client agents import: atomic files the ingester reads back exactly."""

from __future__ import annotations

import threading

import pytest

from flywheel_assets.client import FlywheelLogger
from flywheel_assets.lib.ingest.landing import list_landing
from flywheel_assets.lib.ingest.pipeline import ingest_landing
from flywheel_assets.lib.tables import QUARANTINE, SESSION_EVENTS, TRAJECTORIES

CONVERSATION = [
    {"from": "human", "value": "Capital of Peru?"},
    {"from": "gpt", "value": '<tool_call>{"name": "lookup_capital", "arguments": {"country": "Peru"}}</tool_call>'},
    {"from": "tool", "value": '<tool_response>{"name": "lookup_capital", "content": "Lima"}</tool_response>'},
    {"from": "gpt", "value": "Lima."},
]


def test_logged_lines_are_ingested_exactly(home, config, lake):
    with FlywheelLogger(home=home, buffer_size=3) as log:
        trajectory = log.log_trajectory(CONVERSATION, session_id="s1", user_id="u1", task_type="capital_lookup",
                                        model_version="v1")
        log.log_event("s1", "output_edited", user_id="u1", trajectory_id=trajectory, data={"edit_ratio": 0.25})
        log.log_event("s1", "output_accepted", user_id="u1", trajectory_id=trajectory)
        log.log_event("s1", "session_continued", user_id="u1")
        assert [f.kind for f in list_landing(config.landing)] == ["events"]  # auto-flushed at 3
    assert sorted(f.kind for f in list_landing(config.landing)) == ["events", "trajectories"]
    ingest_landing(config, lake, log=lambda _: None)
    assert lake.row_count(QUARANTINE) == 0
    events = lake.read(SESSION_EVENTS).to_pylist()
    assert sorted(e["event_type"] for e in events) == ["output_accepted", "output_edited", "session_continued"]
    assert [e["edit_ratio"] for e in events if e["event_type"] == "output_edited"] == [0.25]
    row = lake.read(TRAJECTORIES).to_pylist()[0]
    assert (row["trajectory_id"], row["final_response"], row["tool_calls"][0]["result"]) == (trajectory, "Lima.", "Lima")


def test_no_partial_file_is_ever_visible(home, config):
    log = FlywheelLogger(home=home, buffer_size=50)
    seen_partial = []

    def watch():
        for _ in range(200):
            for landing_file in list_landing(config.landing):
                lines = landing_file.path.read_text().splitlines()
                if len(lines) % 50:
                    seen_partial.append(len(lines))

    watcher = threading.Thread(target=watch)
    watcher.start()
    for i in range(1000):
        log.log_event(f"s{i}", "output_accepted", user_id="u")
    watcher.join()
    log.close()
    assert seen_partial == []
    assert sum(len(f.path.read_text().splitlines()) for f in list_landing(config.landing)) == 1000


@pytest.mark.parametrize("kwargs,message", [
    ({"event_type": "output_edited", "data": {"edit_ratio": 2}}, "edit_ratio"),
    ({"event_type": "output_accepted", "ts": "yesterday"}, "ISO-8601"),
])
def test_bad_events_are_refused_at_the_source(home, kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlywheelLogger(home=home).log_event("s1", user_id="u1", **kwargs)
