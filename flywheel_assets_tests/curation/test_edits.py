"""A near miss the user edited is learned as the user's answer, not the model's."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa

from flywheel_assets.lib.curation.curate import apply_edit, user_edits
from flywheel_assets.lib.lake import conform
from flywheel_assets.lib.tables import SESSION_EVENTS

T = datetime(2026, 11, 2, tzinfo=timezone.utc)


def test_the_latest_edit_of_each_trajectory_wins():
    events = conform(pa.Table.from_pylist([
        {"trajectory_id": "t1", "event_type": "output_edited", "ts": T.replace(hour=1),
         "data_json": json.dumps({"edit_ratio": 0.2, "edited_answer": "first"})},
        {"trajectory_id": "t1", "event_type": "output_edited", "ts": T.replace(hour=2),
         "data_json": json.dumps({"edit_ratio": 0.1, "edited_answer": "12 + 30 = 42."})},
        {"trajectory_id": "t2", "event_type": "output_edited", "ts": T, "data_json": json.dumps({"edit_ratio": 0.3})},
        {"trajectory_id": "t3", "event_type": "output_accepted", "ts": T,
         "data_json": json.dumps({"edited_answer": "not an edit"})},
    ]), SESSION_EVENTS)
    assert user_edits(events) == {"t1": "12 + 30 = 42."}


def test_only_a_final_answer_is_replaced():
    messages = [{"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                 "function": {"name": "calculator", "arguments": "{\"expression\": \"12 + 30\"}"}}]},
                {"role": "tool", "tool_call_id": "c", "content": "42"},
                {"role": "assistant", "content": "12 + 30 = 24."}]
    assert apply_edit(messages, "12 + 30 = 42.") and messages[-1]["content"] == "12 + 30 = 42."
    assert not apply_edit(messages[:2], "x") and messages[1]["content"] is None
    assert not apply_edit(messages, None)
