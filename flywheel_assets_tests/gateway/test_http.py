"""The gateway's HTTP contract with a scripted model: OpenAI shapes, routing, streaming,
one trajectory per agent conversation, feedback, every error code, do_not_log."""

from __future__ import annotations

import json
from difflib import SequenceMatcher

import pytest

from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.experiments.registry import ModelRegistry
from flywheel_assets.lib.gateway.backends import Completion
from flywheel_assets.lib.ingest.pipeline import ingest_landing
from flywheel_assets.lib.lake import Lake
from flywheel_assets.lib.tables import SESSION_EVENTS, TRAJECTORIES

from flywheel_assets_tests.gateway.support import CANARY, CHAMPION, Scripted, landed_lines, tool_call

USER_TURN = [{"role": "user", "content": "What is 12 * 7?"}]
CALC = [{"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]


def chat(client, messages, **body):
    return client.post("/v1/chat/completions", json={"model": "flywheel", "messages": messages, **body})


def test_a_completion_has_openai_shape_and_names_what_served_it(serve):
    client, gateway, backend, _ = serve()
    backend.replies.append(Completion("84", [], "stop", 11, 3))
    response = chat(client, USER_TURN, user="u-1", temperature=0.0, max_tokens=20)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "84"},
                                "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    assert body["model"] == response.headers["x-flywheel-model-version"] in (CHAMPION, CANARY)
    assert len(response.headers["x-flywheel-trajectory-id"]) == 32
    assert backend.requests[0]["max_tokens"] == 20 and backend.requests[0]["temperature"] == 0.0
    assert client.get("/healthz").json()["status"] == "ok"
    models = client.get("/v1/models").json()["data"]
    assert {(m["id"], m["status"]) for m in models} == {(CHAMPION, "champion"), (CANARY, "canary")}


def test_users_are_routed_stickily_by_the_registry(serve, home):
    client, gateway, backend, _ = serve()
    route = ModelRegistry(Lake(load_config(home))).router()
    served = {}
    for round_ in range(2):
        for n in range(40):
            user = f"user-{n}"
            response = chat(client, [{"role": "user", "content": f"q{round_}-{n}"}], user=user)
            version = response.headers["x-flywheel-model-version"]
            assert served.setdefault(user, version) == version  # sticky across calls
            assert version == route(user, "acme")  # the same route() the simulator uses
    assert set(served.values()) == {CHAMPION, CANARY}  # a 50% canary gets some of 40 users
    header_user = chat(client, [{"role": "user", "content": "hi"}], **{}).headers  # no user: "anonymous"
    assert header_user["x-flywheel-model-version"] == route("anonymous", "acme")
    response = client.post("/v1/chat/completions", json={"messages": USER_TURN},
                           headers={"x-flywheel-user": "user-3"})
    assert response.headers["x-flywheel-model-version"] == served["user-3"]


def test_streaming_sends_openai_chunks_with_content_and_tool_calls(serve):
    client, gateway, backend, _ = serve()
    text = "The answer is eighty-four, " * 5
    backend.replies += [Completion(text, [], "stop", 4, 30),
                        Completion(None, [tool_call("calculator", {"expression": "12*7"})], "tool_calls", 4, 9)]
    for expected_finish in ("stop", "tool_calls"):
        with client.stream("POST", "/v1/chat/completions",
                           json={"messages": USER_TURN, "tools": CALC, "stream": True, "user": "s"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-flywheel-trajectory-id"]
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["choices"][0]["finish_reason"] == expected_finish
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        arguments = "".join(call["function"].get("arguments", "") for c in chunks
                            for call in c["choices"][0]["delta"].get("tool_calls") or [])
        if expected_finish == "stop":
            assert content == text and len(chunks) > 3
        else:
            names = [call["function"].get("name") for c in chunks for call in c["choices"][0]["delta"].get("tool_calls") or []]
            assert content == "" and "calculator" in names and json.loads(arguments) == {"expression": "12*7"}


def test_an_agent_tool_loop_is_one_trajectory_and_retries_and_follow_ups_are_events(serve, home):
    client, gateway, backend, _ = serve()
    call = tool_call("calculator", {"expression": "12*7"})
    backend.replies += [Completion(None, [call], "tool_calls", 5, 5), Completion("It is 84.", [], "stop", 9, 4),
                        Completion("84, surely.", [], "stop", 9, 4), Completion("Then 85.", [], "stop", 9, 4)]
    first = chat(client, USER_TURN, tools=CALC, user="agent-1")
    assistant = first.json()["choices"][0]["message"]
    assert assistant["tool_calls"][0]["function"]["name"] == "calculator"
    loop = USER_TURN + [assistant, {"role": "tool", "tool_call_id": "call_0", "content": "84"}]
    second = chat(client, loop, tools=CALC, user="agent-1")
    trajectory = first.headers["x-flywheel-trajectory-id"]
    assert second.headers["x-flywheel-trajectory-id"] == trajectory  # the tool loop goes on in one trajectory
    # the same conversation re-sent without its last assistant turn: a retry, a new trajectory
    retry = chat(client, loop, tools=CALC, user="agent-1")
    assert retry.headers["x-flywheel-trajectory-id"] != trajectory
    assert retry.headers["x-flywheel-session-id"] == first.headers["x-flywheel-session-id"]
    # a further user turn after the answer: session_continued, same session, another trajectory
    onward = loop + [retry.json()["choices"][0]["message"], {"role": "user", "content": "And plus one?"}]
    follow = chat(client, onward, tools=CALC, user="agent-1")
    assert follow.headers["x-flywheel-session-id"] == first.headers["x-flywheel-session-id"]
    assert len({r.headers["x-flywheel-trajectory-id"] for r in (first, retry, follow)}) == 3

    assert gateway.flush() == {"trajectories": 3, "events": 2, "files": 2}
    trajectories = {t["trajectory_id"]: t for t in landed_lines(home, "trajectories")}
    assert [m["role"] for m in trajectories[trajectory]["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert trajectories[trajectory]["messages"][-1]["content"] == "It is 84."
    assert {t["model_version"] for t in trajectories.values()} == {second.headers["x-flywheel-model-version"]}
    assert trajectories[trajectory]["tools"] == CALC and trajectories[trajectory]["tenant_id"] == "acme"
    events = landed_lines(home, "events")
    assert sorted((e["event_type"], e["trajectory_id"]) for e in events) == sorted([
        ("retry_requested", trajectory), ("session_continued", retry.headers["x-flywheel-trajectory-id"])])

    config = load_config(home)
    lake = Lake(config)
    ingest_landing(config, lake, log=lambda _: None)
    assert lake.row_count(TRAJECTORIES) == 3 and lake.row_count(SESSION_EVENTS) == 2


def test_feedback_becomes_events_and_an_edit_is_measured_against_the_answer(serve, home):
    client, gateway, backend, _ = serve()
    backend.replies.append(Completion("The capital of France is Lyon.", [], "stop", 5, 7))
    response = chat(client, [{"role": "user", "content": "Capital of France?"}], user="u-9")
    trajectory = response.headers["x-flywheel-trajectory-id"]
    posted = [client.post("/v1/feedback", json={"trajectory_id": trajectory, **body}) for body in (
        {"type": "edited", "edited_text": "The capital of France is Paris."},
        {"type": "accepted"}, {"type": "accepted"},  # twice: counted once
        {"type": "rating", "rating": 4}, {"type": "thumbs_up", "comment": "good"})]
    assert [p.status_code for p in posted] == [200] * 5, [p.text for p in posted]
    ratio = 1 - SequenceMatcher(None, "The capital of France is Lyon.", "The capital of France is Paris.",
                                autojunk=False).ratio()
    assert posted[0].json()["edit_ratio"] == round(ratio, 4) and 0 < ratio < 0.3
    assert posted[1].json()["event_id"] == posted[2].json()["event_id"]
    gateway.flush()
    config = load_config(home)
    lake = Lake(config)
    ingest_landing(config, lake, log=lambda _: None)
    events = lake.read(SESSION_EVENTS).to_pylist()
    assert sorted(e["event_type"] for e in events) == ["output_accepted", "output_edited", "rating", "thumbs_up"]
    assert {e["session_id"] for e in events} == {response.headers["x-flywheel-session-id"]}
    rating = next(e for e in events if e["event_type"] == "rating")
    assert json.loads(rating["data_json"]) == {"rating": 4}

    bad = [client.post("/v1/feedback", json=body) for body in (
        {"type": "accepted"}, {"trajectory_id": trajectory, "type": "love"},
        {"trajectory_id": trajectory, "type": "rating", "rating": 6},
        {"trajectory_id": trajectory, "type": "edited"}, {"trajectory_id": "f" * 32, "type": "accepted"})]
    assert [b.status_code for b in bad] == [400, 400, 400, 400, 404]
    assert all(b.json()["error"]["message"] for b in bad)


@pytest.mark.parametrize("body, param", [
    ({}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "assistant", "tool_calls": "x"}, {"role": "user", "content": "y"}]}, "messages"),
    ({"messages": USER_TURN, "temperature": 9}, "temperature"),
    ({"messages": USER_TURN, "temperature": "hot"}, "temperature"),
    ({"messages": USER_TURN, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER_TURN, "max_tokens": 10**6}, "max_tokens"),
    ({"messages": USER_TURN, "tools": [{"type": "function"}]}, "tools"),
    ({"messages": USER_TURN, "tool_choice": "always"}, "tool_choice"),
    ({"messages": USER_TURN, "n": 3}, "n"), ({"messages": USER_TURN, "stream": "yes"}, "stream"),
    ({"messages": USER_TURN, "user": 7}, "user"),
])
def test_every_malformed_request_is_a_400_naming_the_field(serve, body, param):
    client, *_ = serve()
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and response.json()["error"]["type"] == "invalid_request_error"


def test_the_other_error_codes(serve, home):
    client, gateway, backend, key = serve(max_body_bytes=4096, rate_limit_per_minute=60, request_timeout_s=0.3)
    for raw in (b"{not json", b"[1, 2]", "\udcff".encode("utf-8", "surrogatepass")):
        assert client.post("/v1/chat/completions", content=raw).status_code == 400
    assert client.post("/v1/chat/completions", json={"messages": USER_TURN}, headers={"Authorization": ""}).status_code == 401
    assert client.post("/v1/chat/completions", json={"messages": USER_TURN},
                       headers={"Authorization": "Bearer fw-nope"}).json()["error"]["type"] == "authentication_error"
    huge = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert client.post("/v1/chat/completions", json=huge).status_code == 413
    assert client.get("/v1/nothing").status_code == 404 and client.get("/v1/chat/completions").status_code == 405
    backend.delay_s = 1.0
    timed_out = chat(client, USER_TURN)
    assert timed_out.status_code == 504 and timed_out.json()["error"]["type"] == "timeout_error"
    backend.delay_s = 0.0
    codes = [chat(client, USER_TURN).status_code for _ in range(15)]  # burst: a sixth of 60 a minute
    assert 429 in codes and codes.index(429) >= 5
    gateway.keys.revoke(key)
    assert chat(client, USER_TURN).status_code == 401  # revoked: refused from the next request on


def test_a_journal_that_cannot_write_fails_the_request_and_serves_nothing(serve, monkeypatch):
    client, gateway, backend, _ = serve()

    def full_disk(records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gateway.journal, "append", full_disk)
    response = chat(client, USER_TURN)
    assert response.status_code == 503 and "No space left" in response.json()["error"]["message"]


def test_a_do_not_log_tenant_is_served_and_nothing_of_it_is_written(serve, home):
    client, gateway, backend, _ = serve(do_not_log=["secretco"])
    key, _ = gateway.keys.create("secretco")
    headers = {"Authorization": f"Bearer {key}"}
    response = client.post("/v1/chat/completions", json={"messages": USER_TURN, "user": "spy"}, headers=headers)
    assert response.status_code == 200 and "x-flywheel-trajectory-id" not in response.headers
    feedback = client.post("/v1/feedback", json={"trajectory_id": "x", "type": "accepted"}, headers=headers)
    assert feedback.json() == {"accepted": True, "logged": False}
    gateway.flush()
    assert landed_lines(home, "trajectories") == [] and landed_lines(home, "events") == []
    journal = home / "gateway" / "journal"
    assert "What is 12" not in "".join(p.read_text() for p in journal.glob("*.jsonl"))


def test_no_champion_is_a_503_not_a_crash(home, gateway_config):
    from starlette.testclient import TestClient

    from flywheel_assets.lib.gateway.app import create_app
    from flywheel_assets.lib.gateway.service import Gateway

    gateway = Gateway(gateway_config(), backend=Scripted())
    key, _ = gateway.keys.create("acme")
    with TestClient(create_app(gateway), headers={"Authorization": f"Bearer {key}"}) as client:
        response = chat(client, USER_TURN)
    assert response.status_code == 503 and "no champion" in response.json()["error"]["message"]


def test_the_upstream_backend_forwards_each_version_under_its_name_and_maps_failures_to_502(serve, home):
    from flywheel_assets.lib.config import load_config as reload
    from flywheel_assets.lib.gateway.backends import UpstreamBackend
    from flywheel_assets_tests.helpers import openai_stand_in

    with openai_stand_in() as stand_in:
        stand_in.reply({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "tool_calls",
                        "message": {"role": "assistant", "content": None,
                                    "tool_calls": [tool_call("calculator", {"expression": "12*7"})]}}],
                        "usage": {"prompt_tokens": 12, "completion_tokens": 6}})
        stand_in.reply({"error": {"message": "overloaded"}}, status=500)
        settings = {"upstream": {"base_url": stand_in.url, "api_key": "up-key", "model_name": "lora/{version}"}}
        client, gateway, _, _ = serve(backend=UpstreamBackend(reload(home).gateway.upstream.model_copy(
            update=settings["upstream"])), **settings)
        ok = chat(client, USER_TURN, tools=CALC, tool_choice="auto", user="u-up", max_tokens=30)
        failed = chat(client, USER_TURN, user="u-up")
    assert ok.status_code == 200, ok.text
    message = ok.json()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "calculator"
    assert ok.json()["choices"][0]["finish_reason"] == "tool_calls" and ok.json()["usage"]["total_tokens"] == 18
    sent = stand_in.requests[0]
    version = ok.headers["x-flywheel-model-version"]
    assert sent["body"]["model"] == f"lora/{version}" and sent["authorization"] == "Bearer up-key"
    assert sent["body"]["tools"] == CALC and sent["body"]["tool_choice"] == "auto" and sent["body"]["max_tokens"] == 30
    assert sent["path"] == "/v1/chat/completions"
    assert failed.status_code == 502 and "HTTP 500" in failed.json()["error"]["message"]
    gateway.flush()
    assert landed_lines(home, "trajectories") == []  # left on a tool call; the failed retry changed nothing
    [open_] = gateway.tracker.open()
    assert open_.model_version == version and open_.messages[-1]["tool_calls"][0]["function"]["name"] == "calculator"


def test_the_same_question_from_another_user_is_not_a_retry(serve, home):
    client, gateway, backend, _ = serve()
    first = chat(client, USER_TURN, user="ann")
    other = chat(client, USER_TURN, user="bob")  # the same words, another user: a conversation of its own
    again = chat(client, USER_TURN, user="ann")  # ann asks again: her retry
    assert len({r.headers["x-flywheel-session-id"] for r in (first, other)}) == 2
    assert again.headers["x-flywheel-session-id"] == first.headers["x-flywheel-session-id"]
    gateway.flush()
    assert [(e["event_type"], e["user_id"], e["trajectory_id"]) for e in landed_lines(home, "events")] == [
        ("retry_requested", "ann", first.headers["x-flywheel-trajectory-id"])]


@pytest.mark.parametrize("raw", [
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
])
def test_bodies_python_parses_but_nobody_can_store_are_400s(serve, raw):
    client, *_ = serve(max_body_bytes=10**6)
    response = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text


def test_nulls_are_absent_and_a_header_spelling_gets_no_second_rate_bucket(serve):
    client, gateway, backend, key = serve(rate_limit_per_minute=12)  # bursts of 2
    ok = client.post("/v1/chat/completions", json={"messages": USER_TURN, "temperature": None, "max_tokens": None,
                                                   "stream": None, "n": None, "user": None, "tools": None})
    assert ok.status_code == 200, ok.text
    spellings = [f"Bearer {key}", f"bearer {key}", f"BEARER {key}", f"Bearer  {key}"]
    codes = [client.post("/v1/chat/completions", json={"messages": USER_TURN},
                         headers={"Authorization": s}).status_code for s in spellings]
    assert codes[0] == 200 and set(codes[1:]) == {429}


def test_a_failed_write_leaves_no_trace_and_retries_are_counted_once(serve, home, monkeypatch):
    client, gateway, backend, _ = serve()
    first = chat(client, USER_TURN, user="ann")
    real_append = gateway.journal.append

    def full_disk(records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gateway.journal, "append", full_disk)
    assert chat(client, USER_TURN, user="ann").status_code == 503  # a retry the client never saw answered
    monkeypatch.setattr(gateway.journal, "append", real_append)
    second = chat(client, USER_TURN, user="ann")  # the client's retry of its failed call
    feedback = client.post("/v1/feedback", json={"trajectory_id": first.headers["x-flywheel-trajectory-id"],
                                                 "type": "retry"})
    assert feedback.status_code == 200
    gateway.flush()
    events = landed_lines(home, "events")
    assert [(e["event_type"], e["trajectory_id"]) for e in events] == [
        ("retry_requested", first.headers["x-flywheel-trajectory-id"])]  # once: re-sent and posted
    landed = {t["trajectory_id"] for t in landed_lines(home, "trajectories")}
    assert landed == {first.headers["x-flywheel-trajectory-id"], second.headers["x-flywheel-trajectory-id"]}


def test_without_a_user_nothing_is_inferred_across_calls(serve, home):
    client, gateway, backend, _ = serve()
    a, b = chat(client, USER_TURN), chat(client, USER_TURN)  # two people behind one key, perhaps
    assert a.headers["x-flywheel-session-id"] != b.headers["x-flywheel-session-id"]
    gateway.flush()
    assert landed_lines(home, "events") == []


def test_a_thumb_can_change_and_the_latest_counts(serve, home):
    client, gateway, backend, _ = serve()
    trajectory = chat(client, USER_TURN, user="u").headers["x-flywheel-trajectory-id"]
    ids = [client.post("/v1/feedback", json={"trajectory_id": trajectory, "type": kind}).json()["event_id"]
           for kind in ("thumbs_up", "thumbs_down", "thumbs_up")]
    assert len(set(ids)) == 3


def test_a_restart_remembers_landed_answers_for_feedback_and_follow_ups(serve, home, gateway_config):
    from starlette.testclient import TestClient

    from flywheel_assets.lib.gateway.app import create_app
    from flywheel_assets.lib.gateway.service import Gateway

    client, gateway, backend, key = serve()
    first = chat(client, USER_TURN, user="ann")
    gateway.flush()
    client.__exit__(None, None, None)  # shut down (closes the journal); a kill -9 leaves the same files
    restarted = Gateway(gateway_config(), backend=Scripted())
    with TestClient(create_app(restarted), headers={"Authorization": f"Bearer {key}"}) as again:
        trajectory = first.headers["x-flywheel-trajectory-id"]
        assert again.post("/v1/feedback", json={"trajectory_id": trajectory, "type": "accepted"}).status_code == 200
        onward = USER_TURN + [first.json()["choices"][0]["message"], {"role": "user", "content": "And 13 * 7?"}]
        follow = chat(again, onward, user="ann")
        assert follow.headers["x-flywheel-session-id"] == first.headers["x-flywheel-session-id"]
    assert len(landed_lines(home, "trajectories")) == 2  # the first landed once, before the restart
    assert sorted(e["event_type"] for e in landed_lines(home, "events")) == ["output_accepted", "session_continued"]


def test_upstream_tool_calls_are_normalised_and_a_stream_can_end_with_usage(serve, home):
    from flywheel_assets.lib.gateway.backends import _tool_calls

    assert _tool_calls([{"function": {"name": "f", "arguments": {"x": 1}}}]) == [
        {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    client, gateway, backend, _ = serve()
    backend.replies.append(Completion("hi", [], "stop", 7, 2))
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": USER_TURN, "stream": True, "stream_options": {"include_usage": True}}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 2,
                                                                   "total_tokens": 9}


def test_a_saved_key_is_private_even_over_an_existing_file(tmp_path):
    from flywheel_assets.lib.gateway.keys import write_private

    path = tmp_path / "dev.key"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, "fw-secret\n")
    assert path.read_text() == "fw-secret\n" and path.stat().st_mode & 0o777 == 0o600


def test_an_embedded_call_comes_back_as_tool_calls_without_its_markup_in_the_content():
    from flywheel_assets.lib.gateway.backends import completion_of
    from flywheel_assets.lib.training.inference import Turn

    written = '<tool_call> calculator {"expression": "12 * 7"} </tool_call>'
    completion = completion_of(Turn([("calculator", {"expression": "12 * 7"})], written, True, 8, 11))
    assert completion.content is None and completion.finish_reason == "tool_calls"
    assert completion.tool_calls[0]["function"] == {"name": "calculator", "arguments": '{"expression": "12 * 7"}'}
    unreadable = completion_of(Turn([(None, "<tool_call> calc {oops")], "<tool_call> calc {oops", False, 8, 40))
    assert unreadable.tool_calls == [] and unreadable.content == "<tool_call> calc {oops"


def test_a_tenant_is_served_and_shown_its_own_lane_only(home, monkeypatch):
    """globex is isolated (README Tenancy): its users get its lane's versions (or the base), never the
    shared canary, and /v1/models shows each key's tenant its own lane's versions, no other's."""
    from starlette.testclient import TestClient

    from flywheel_assets.lib.gateway.app import create_app
    from flywheel_assets.lib.gateway.service import Gateway
    from flywheel_assets_tests.gateway.support import Scripted, register_versions

    path = home / "flywheel.json"
    path.write_text(json.dumps({"gateway": {"flush_interval_s": 3600},
                                "tenancy": {"policies": {"globex": "isolated"}}}))
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(path))
    config = load_config(home)
    registry = register_versions(config)
    lane_version = "cycle-0001@globex-lora"
    registry.register(lane_version, base=CHAMPION, base_path="models/base", adapter_path="models/g", parent=CHAMPION,
                      cycle="cycle-0001@globex", reason="test", actor="test")
    registry.transition(lane_version, "canary", reason="test", actor="test", traffic_share=0.5)
    gateway = Gateway(config, backend=Scripted())
    served, shown = {}, {}
    with TestClient(create_app(gateway)) as client:  # one app: its shutdown closes the gateway's journal
        for tenant in ("acme", "globex"):
            auth = {"Authorization": f"Bearer {gateway.keys.create(tenant)[0]}"}
            served[tenant] = {client.post("/v1/chat/completions", headers=auth, json={
                "model": "flywheel", "messages": [{"role": "user", "content": f"q{n}"}], "user": f"user-{n}"})
                .headers["x-flywheel-model-version"] for n in range(40)}
            shown[tenant] = {(m["id"], m["status"], m["traffic_share"])
                             for m in client.get("/v1/models", headers=auth).json()["data"]}
    assert served == {"acme": {CHAMPION, CANARY}, "globex": {CHAMPION, lane_version}}
    assert shown == {"acme": {(CHAMPION, "champion", 0.5), (CANARY, "canary", 0.5)},
                     "globex": {(CHAMPION, "champion", 0.5), (lane_version, "canary", 0.5)}}
