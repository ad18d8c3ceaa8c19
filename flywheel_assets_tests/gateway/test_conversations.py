"""The tracker alone: a conversation being answered never lands half-done."""

from __future__ import annotations

from flywheel_assets.lib.gateway.conversations import Tracker, prefix_keys


def test_a_conversation_being_answered_does_not_land_as_idle():
    now = [0.0]
    tracker = Tracker(idle_s=10, clock=lambda: now[0])
    ask = [{"role": "user", "content": "12 * 7?"}]
    call = tracker.begin("acme", "u", ask)
    tool_call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "calc", "arguments": '{"e": "12*7"}'}}]}
    tracker.served(call, ask, tool_call, model_version="v", tools=None)
    now[0] = 100.0  # idle for long
    loop = ask + [tool_call, {"role": "tool", "tool_call_id": "call_0", "content": "84"}]
    going_on = tracker.begin("acme", "u", loop)
    assert going_on.conversation is call.conversation
    assert tracker.due() == []  # in flight: the model is answering its next turn
    tracker.served(going_on, loop, {"role": "assistant", "content": "84"}, model_version="v", tools=None)
    [due] = tracker.due()
    assert [m["role"] for m in due.messages] == ["user", "assistant", "tool", "assistant"]


def test_prefix_keys_equal_whole_keys_and_ignore_call_ids():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "x1", "function": {"name": "f", "arguments": '{"b": 1, "a": 2}'}}]}]
    renamed = [messages[0], {**messages[1], "tool_calls": [{"id": "other", "function": {
        "name": "f", "arguments": '{"a": 2, "b": 1}'}}]}]
    keys = prefix_keys(messages, "t", "u")
    assert keys == prefix_keys(renamed, "t", "u")
    assert keys[0] == prefix_keys(messages[:1], "t", "u")[0] != prefix_keys(messages[:1], "t", "v")[0]
