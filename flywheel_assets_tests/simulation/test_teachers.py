"""Teachers and the public-file importer; the OpenAI teacher against a real local stand-in server."""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone

import pytest

from flywheel_assets_tests.helpers import completion, openai_stand_in

from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.ingest.trajectories import parse_trajectory
from flywheel_assets.lib.simulation.hermes import HERMES_SYSTEM
from flywheel_assets.lib.simulation.tasks import Task, expert_messages, generate_tasks, is_eval_prompt, verify
from flywheel_assets.lib.simulation.tools import run_tool
from flywheel_assets.lib.simulation.teachers import (
    OpenAITeacher, ScriptedTeacher, TeacherError, cold_start_lines, import_public_file,
)
from flywheel_assets.lib.simulation.teachers import make_teacher as configured_teacher

SUM = Task("calculator-t-0", "calculator", "What is 663 + 859?", 0, (("calculator", '{"expression": "663 + 859"}'),),
           "663 + 859 = 1522.", ("1522",))
WEATHER = Task("weather_of_capital-t-1", "weather_of_capital", "What is the weather in the capital of Germany?", 0,
               (("lookup_capital", '{"country": "Germany"}'), ("get_weather", '{"city": "Berlin"}')),
               "In Berlin, the capital of Germany, it is sunny and 20 °C.", ("sunny", "and", "20", "°", "c"))
NOW = datetime(2026, 11, 20, tzinfo=timezone.utc)


def _ingested(line: dict) -> dict:
    return parse_trajectory(json.loads(json.dumps(line)), NOW)


def test_scripted_teacher_writes_verified_hermes_landing_lines():
    line = ScriptedTeacher(seed=1).trajectory(WEATHER)
    assert {k: v for k, v in line.items() if k not in ("conversations", "created_at")} == {
        "trajectory_id": "teacher-scripted-weather_of_capital-t-1", "task_type": "weather_of_capital",
        "origin": "synthetic", "is_synthetic": True, "reward": 0.8, "model_version": "teacher-scripted",
        "tenant_id": "default", "completed": True}
    assert line["conversations"][0] == {"from": "system", "value": HERMES_SYSTEM}
    row = _ingested(line)
    assert [(c["name"], c["success"]) for c in row["tool_calls"]] == [("lookup_capital", True), ("get_weather", True)]
    assert verify(WEATHER, row["final_response"]) and row["origin"] == "synthetic"


def test_cold_start_lines_use_only_cold_start_phrasings_and_no_eval_prompt():
    lines = cold_start_lines(60, seed=3)
    prompts = [line["conversations"][1]["value"] for line in lines]
    assert prompts == [t.prompt for t in generate_tasks(60, seed=3, phrasings=[0, 1, 2])]
    assert len({line["trajectory_id"] for line in lines}) == 60 and not any(map(is_eval_prompt, prompts))
    assert all(verify(t, _ingested(line)["final_response"])
               for t, line in zip(generate_tasks(60, seed=3, phrasings=[0, 1, 2]), lines))


def teacher_reply(task: Task, edit=None) -> dict:
    """What a good teacher returns for the task (the expert's conversation), optionally edited."""
    messages = expert_messages(task, random.Random(0))
    if edit:
        edit(messages)
    return completion({"messages": messages})


@pytest.fixture
def server():
    with openai_stand_in() as stand_in:
        yield stand_in


def make_teacher(stand_in, api_key: str | None = "sk-test") -> OpenAITeacher:
    return OpenAITeacher(stand_in.url, "m1", api_key, timeout_s=5, backoff_s=0.01)


def test_request_shape_auth_header_and_a_kept_trajectory(server):
    server.reply(teacher_reply(WEATHER))
    teacher = make_teacher(server)
    line = teacher.trajectory(WEATHER)
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions" and request["authorization"] == "Bearer sk-test"
    body = request["body"]
    assert body["model"] == "m1" and body["response_format"] == {"type": "json_object"}
    prompt = body["messages"][-1]["content"]
    assert WEATHER.prompt in prompt and '"messages"' in prompt and '"name": "get_weather"' in prompt
    assert "{condition} and {temp_c} °C" in prompt and "Berlin" not in prompt  # the style, not the answer
    assert line["model_version"] == "teacher-m1" and line["origin"] == "synthetic" and line["reward"] == 0.8
    assert verify(WEATHER, _ingested(line)["final_response"]) and teacher.rejected == 0


def test_no_auth_header_without_a_key(server):
    server.reply(teacher_reply(SUM))
    assert make_teacher(server, api_key=None).trajectory(SUM) is not None
    assert server.requests[0]["authorization"] is None


def test_a_teacher_lying_about_tool_results_gets_the_real_ones(server):
    def lie(messages):
        for message in messages:
            if message["role"] == "tool":
                message["content"] = "Munich" if "Berlin" in message["content"] else '{"condition": "rainy"}'
    server.reply(teacher_reply(WEATHER, lie))
    row = _ingested(make_teacher(server).trajectory(WEATHER))
    assert [c["result"] for c in row["tool_calls"]] == [
        "Berlin", json.dumps(json.loads(run_tool("get_weather", {"city": "Berlin"})), sort_keys=True)]
    assert "Munich" not in json.dumps(row["turns"]) and "rainy" not in json.dumps(row["turns"])


@pytest.mark.parametrize("edit, reason", [
    (lambda m: m[-1].update(content="663 + 859 = 1523."), "wrong_answer"),
    (lambda m: m.pop(), "no_final_answer"),
    (lambda m: m[1]["tool_calls"][0]["function"].update(name="web_search"), "unknown_tool"),
    (lambda m: m[1]["tool_calls"][0]["function"].update(arguments='{"expression": "663 + 858"}'), "wrong_calls"),
    (lambda m: m.__delitem__(slice(1, 3)), "wrong_calls"),  # answered from memory, no tool call
])
def test_wrong_trajectories_are_rejected_and_counted(server, edit, reason):
    server.reply(teacher_reply(SUM, edit))
    teacher = make_teacher(server)
    assert teacher.trajectory(SUM) is None
    assert teacher.rejects == {reason: 1} and teacher.rejected == 1


def test_malformed_replies_are_rejected_and_fenced_json_is_read(server):
    server.reply(completion("Sure! Here is the trajectory."))
    fenced = json.dumps({"messages": expert_messages(SUM, random.Random(0))})
    server.reply(completion(f"```json\n{fenced}\n```"))
    teacher = make_teacher(server)
    assert teacher.trajectory(SUM) is None and teacher.rejects == {"malformed": 1}
    assert teacher.trajectory(SUM) is not None


def test_a_503_is_retried(server):
    server.reply({"error": "overloaded"}, status=503)
    server.reply(teacher_reply(SUM))
    assert make_teacher(server).trajectory(SUM) is not None and len(server.requests) == 2


def test_persistent_failure_and_auth_errors_raise(server):
    for _ in range(3):
        server.reply({"error": "overloaded"}, status=429)
    with pytest.raises(TeacherError, match="gave up after 3 attempts"):
        make_teacher(server).trajectory(SUM)
    server.reply({"error": "bad key"}, status=401)
    with pytest.raises(TeacherError, match="HTTP 401"):
        make_teacher(server).trajectory(SUM)
    assert len(server.requests) == 4


def test_cold_start_through_the_openai_teacher(server):
    tasks = generate_tasks(4, seed=9, phrasings=[0, 1, 2])
    for task in tasks:
        server.reply(teacher_reply(task))
    lines = cold_start_lines(4, seed=9, teacher=make_teacher(server))
    assert [line["trajectory_id"] for line in lines] == [f"teacher-m1-{t.task_id}" for t in tasks]


def test_the_teacher_endpoint_comes_from_the_environment_through_the_config(tmp_path):
    assert OpenAITeacher.from_config(load_config(tmp_path, environ={}).teacher) is None
    with pytest.raises(ValueError, match="no endpoint"):
        configured_teacher("openai", 0, endpoint=load_config(tmp_path, environ={}).teacher)
    config = load_config(tmp_path, environ={"FLYWHEEL_TEACHER_URL": "http://localhost:8000/v1",
                                            "FLYWHEEL_TEACHER_MODEL": "qwen", "FLYWHEEL_TEACHER_API_KEY": "k"})
    teacher = configured_teacher("openai", 0, endpoint=config.teacher)
    assert (teacher.endpoint, teacher.model, teacher.api_key) == ("http://localhost:8000/v1/chat/completions", "qwen", "k")


def test_import_a_hermes_jsonl_file(tmp_path):
    source = tmp_path / "sharegpt-tools.jsonl"
    conversations = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    source.write_bytes(b"\n".join([
        json.dumps({"conversations": conversations}).encode(),
        b"",
        json.dumps({"id": "x2", "conversations": conversations, "origin": "toolbench"}).encode(),
        b'{"conversations": [',
    ]) + b"\n")
    target = import_public_file(source, tmp_path / "landing")
    assert target == tmp_path / "landing" / "trajectories" / "imported-sharegpt-tools.jsonl"
    lines = target.read_bytes().splitlines()
    assert [json.loads(line)["origin"] for line in lines[:2]] == ["imported", "toolbench"]
    assert all(json.loads(line)["is_synthetic"] is False for line in lines[:2])
    assert lines[2] == b'{"conversations": ['  # left for the ingester to quarantine
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    assert _ingested(json.loads(lines[0]))["final_response"] == "hello"


def test_import_an_openai_json_array_file(tmp_path):
    records = [{"messages": expert_messages(SUM, random.Random(0)), "is_synthetic": True},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}]
    source = tmp_path / "agent-traces.json"
    source.write_text(json.dumps(records, indent=2))
    target = import_public_file(source, tmp_path / "landing")
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert target.name == "imported-agent-traces.jsonl" and len(lines) == 2
    assert [(r["origin"], r["is_synthetic"]) for r in lines] == [("imported", True), ("imported", False)]
    assert verify(SUM, _ingested(lines[0])["final_response"])


def test_the_cold_start_is_made_on_the_flywheel_clock(config):
    """The demo's day 0, not the machine's date: the rows' day partitions and every "since" window
    must not depend on the day the demo runs."""
    from flywheel_assets.lib.clock import set_now
    from flywheel_assets.lib.simulation.seed import write_cold_start

    config.cold_start.synthetic_trajectories = 5
    set_now(config, datetime(2026, 11, 1, 0, 30, tzinfo=timezone.utc))
    write_cold_start(config)
    [synthetic] = (config.landing / "trajectories").glob("cold-start-synthetic-*.jsonl")
    stamps = {json.loads(line)["created_at"] for line in synthetic.read_text().splitlines()}
    assert stamps == {"2026-11-01T00:30:00Z"}
