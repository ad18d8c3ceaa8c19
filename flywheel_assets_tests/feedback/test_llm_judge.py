"""The LLM judge against a real local stand-in for an OpenAI-compatible server."""

from __future__ import annotations

import socket

import pytest

from flywheel_assets_tests.helpers import completion, openai_stand_in

from flywheel_assets.lib.config import LLMJudgeConfig
from flywheel_assets.lib.feedback.llm_judge import RUBRIC, LLMJudge, LLMJudgeError

CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": '{"q": "Paris"}'}}]},
    {"role": "tool", "content": "sunny, 24C"},
    {"role": "assistant", "content": "It is sunny and 24C."},
]


@pytest.fixture
def server():
    with openai_stand_in(default=(200, completion({"score": 7, "reason": "fine"}))) as stand_in:
        yield stand_in


def judge(stand_in, api_key: str | None = "sk-test", timeout_s: float = 5.0) -> LLMJudge:
    config = LLMJudgeConfig(url=stand_in.url, model="judge-model", api_key=api_key, timeout_s=timeout_s)
    return LLMJudge(config, backoff_s=0.01)


def test_request_shape(server):
    server.reply(completion({"score": 8, "reason": "used the tool well"}))
    score, reason = judge(server).score(CONVERSATION)

    assert (score, reason) == (pytest.approx(5 / 9), "used the tool well")
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["authorization"] == "Bearer sk-test"
    assert request["content_type"] == "application/json"
    body = request["body"]
    assert set(body) == {"model", "messages", "temperature", "response_format"}
    assert body["model"] == "judge-model"
    assert body["temperature"] == 0
    assert body["response_format"] == {"type": "json_object"}
    system, user = body["messages"]
    assert system == {"role": "system", "content": RUBRIC}
    assert user["role"] == "user"
    assert user["content"] == (
        "[user]\nWeather in Paris?\n\n"
        '[assistant]\n-> call search({"q": "Paris"})\n\n'
        "[tool]\nsunny, 24C\n\n"
        "[assistant]\nIt is sunny and 24C."
    )


def test_no_authorization_header_without_api_key(server):
    judge(server, api_key=None).score(CONVERSATION)
    assert server.requests[0]["authorization"] is None


@pytest.mark.parametrize(("grade", "score"), [(1, -1.0), (10, 1.0), (5.5, 0.0), (4, -1 / 3)])
def test_grade_maps_linearly_to_score(server, grade, score):
    server.reply(completion({"score": grade, "reason": "r"}))
    assert judge(server).score(CONVERSATION) == (pytest.approx(score), "r")


def test_json_in_a_markdown_fence_is_accepted(server):
    server.reply(completion('```json\n{"score": 10, "reason": "perfect"}\n```'))
    assert judge(server).score(CONVERSATION) == (1.0, "perfect")


@pytest.mark.parametrize("status", [503, 429])
def test_retries_after_a_transient_error(server, status):
    server.reply({"error": "busy"}, status=status)
    server.reply(completion({"score": 10, "reason": "ok"}))
    assert judge(server).score(CONVERSATION) == (1.0, "ok")
    assert len(server.requests) == 2


def test_gives_up_after_three_attempts(server):
    for _ in range(3):
        server.reply({"error": "down"}, status=500)
    with pytest.raises(LLMJudgeError, match=r"gave up after 3 attempts; last: HTTP 500") as raised:
        judge(server).score(CONVERSATION)
    assert raised.value.endpoint == server.url + "chat/completions"
    assert len(server.requests) == 3


def test_client_errors_are_not_retried(server):
    server.reply({"error": "bad key"}, status=401)
    with pytest.raises(LLMJudgeError, match="HTTP 401"):
        judge(server).score(CONVERSATION)
    assert len(server.requests) == 1


def test_timeouts_are_retried_then_reported(server):
    for _ in range(3):
        server.reply(completion({"score": 5, "reason": "late"}), delay_s=0.5)
    with pytest.raises(LLMJudgeError, match="gave up after 3 attempts"):
        judge(server, timeout_s=0.1).score(CONVERSATION)
    assert len(server.requests) == 3


def test_connection_refused_is_reported():
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = LLMJudge(LLMJudgeConfig(url=f"http://127.0.0.1:{port}"), backoff_s=0.0)
    with pytest.raises(LLMJudgeError, match=rf"127\.0\.0\.1:{port}/chat/completions.*gave up after 3"):
        judge.score(CONVERSATION)


@pytest.mark.parametrize(
    "body",
    [
        completion("not json"),
        completion({"reason": "no score"}),
        completion({"score": 11, "reason": "too high"}),
        completion({"score": "7", "reason": "a string"}),
        completion({"score": True, "reason": "a boolean"}),
        completion(None),
        completion([7]),
        {"choices": []},
        {"error": "no choices"},
        b"<html>gateway</html>",
    ],
    ids=["not-json", "no-score", "out-of-range", "string-score", "bool-score", "null-content", "json-array",
         "empty-choices", "no-choices", "not-json-body"],
)
def test_malformed_response_raises(server, body):
    server.reply(body)
    with pytest.raises(LLMJudgeError, match=r"LLM judge at http://127\.0\.0\.1:\d+/v1/chat/completions: "):
        judge(server).score(CONVERSATION)
    assert len(server.requests) == 1  # a bad answer is not retried


def test_missing_url_is_refused():
    with pytest.raises(LLMJudgeError, match="url must be set"):
        LLMJudge(LLMJudgeConfig())


def test_score_many_isolates_a_failure(server):
    server.reply(completion({"score": 10, "reason": "great"}))
    server.reply(completion("garbage"))
    server.reply(completion({"score": 1, "reason": "wrong"}))
    rows = judge(server).score_many([("a", CONVERSATION), ("b", CONVERSATION), ("c", CONVERSATION)])

    assert [row["trajectory_id"] for row in rows] == ["a", "b", "c"]
    assert rows[0] == {"trajectory_id": "a", "llm_score": 1.0, "llm_reason": "great", "error": None}
    assert rows[2] == {"trajectory_id": "c", "llm_score": -1.0, "llm_reason": "wrong", "error": None}
    assert rows[1]["llm_score"] is None and rows[1]["llm_reason"] is None
    assert rows[1]["error"].startswith("malformed response")
