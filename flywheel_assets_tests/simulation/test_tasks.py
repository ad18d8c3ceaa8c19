"""The task environment: real tools, the verifier, task generation, the held-out set, the expert."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest

from flywheel_assets.lib.simulation.hermes import HERMES_SYSTEM, to_hermes
from flywheel_assets.lib.simulation.tasks import (
    COLD_START_PHRASINGS, EVAL_SEED, MAX_NUMBER, PHRASINGS, TASK_TYPES, WORDS, Task, eval_tasks, expert_messages,
    generate_tasks, is_eval_prompt, verify,
)
from flywheel_assets.lib.simulation.tools import DATA_DIR, TOOLS, run_tool

GOLDEN = DATA_DIR / "golden" / "golden_trajectories.jsonl"


@pytest.mark.parametrize("name, arguments, result", [
    ("calculator", {"expression": "663 + 859"}, "1522"),
    ("calculator", {"expression": "15 * 12 + 9"}, "189"),
    ("calculator", {"expression": "2 + 3 * 4 - 1"}, "13"),
    ("calculator", {"expression": "1200 - 387"}, "813"),
    ("calculator", {"expression": "250 - 975"}, "-725"),
    ("calculator", {"expression": " 7*6 "}, "42"),
    ("convert_units", {"value": 10, "from_unit": "km", "to_unit": "miles"}, "6.21"),
    ("convert_units", {"value": 26.2, "from_unit": "miles", "to_unit": "km"}, "42.16"),
    ("convert_units", {"value": 72, "from_unit": "kg", "to_unit": "lb"}, "158.73"),
    ("convert_units", {"value": 50, "from_unit": "lb", "to_unit": "kg"}, "22.68"),
    ("convert_units", {"value": 100, "from_unit": "fahrenheit", "to_unit": "celsius"}, "37.78"),
    ("convert_units", {"value": 180, "from_unit": "celsius", "to_unit": "fahrenheit"}, "356.0"),
    ("convert_units", {"value": 1.83, "from_unit": "m", "to_unit": "ft"}, "6.0"),
    ("convert_units", {"value": 100, "from_unit": "ft", "to_unit": "m"}, "30.48"),
    ("convert_units", {"value": 5, "from_unit": "gal", "to_unit": "l"}, "18.93"),
    ("convert_units", {"value": 10, "from_unit": "l", "to_unit": "gal"}, "2.64"),
    ("lookup_capital", {"country": "France"}, "Paris"),
    ("lookup_capital", {"country": " south korea "}, "Seoul"),
    ("text_transform", {"text": "stressed", "operation": "reverse"}, "desserts"),
    ("text_transform", {"text": "hello world", "operation": "upper"}, "HELLO WORLD"),
    ("text_transform", {"text": "QUIET Please", "operation": "lower"}, "quiet please"),
    ("text_transform", {"text": "to be or  not to be", "operation": "word_count"}, "6"),
    ("get_weather", {"city": "Berlin"}, '{"condition": "sunny", "temp_c": 20}'),
    ("get_weather", {"city": "copenhagen"}, '{"condition": "foggy", "temp_c": 6}'),
    ("calculator", '{"expression": "2 + 2"}', "4"),
])
def test_tools_on_hand_computed_cases(name, arguments, result):
    assert run_tool(name, arguments) == result


@pytest.mark.parametrize("name, arguments, error", [
    ("web_search", {"query": "x"}, "unknown tool: web_search"),
    ("calculator", {"expression": "12 / 4"}, "only integers with + - * are supported"),
    ("calculator", {"expression": "2 ** 8"}, "only integers with + - * are supported"),
    ("calculator", {"expression": "__import__('os')"}, "only integers with + - * are supported"),
    ("calculator", {"expression": "1.5 + 2"}, "only integers with + - * are supported"),
    ("calculator", {"expression": "3 +"}, "invalid expression"),
    ("calculator", {"expression": "1 + " * 60 + "1"}, "expression too long"),
    ("calculator", '{"expression": "1 +', "invalid arguments: not JSON"),
    ("calculator", "[1, 2]", "invalid arguments: expected a JSON object"),
    ("calculator", {}, "invalid arguments: missing expression"),
    ("calculator", {"expression": 5}, "invalid arguments: expression must be a string"),
    ("convert_units", {"value": "3", "from_unit": "km", "to_unit": "miles"}, "value must be a number"),
    ("convert_units", {"value": True, "from_unit": "km", "to_unit": "miles"}, "value must be a number"),
    ("convert_units", {"value": 3, "from_unit": "stone", "to_unit": "kg"}, "from_unit must be one of"),
    ("convert_units", {"value": 3, "from_unit": "km", "to_unit": "kg"}, "unsupported conversion: km -> kg"),
    ("convert_units", {"value": 3, "from_unit": "km", "to_unit": "km"}, "unsupported conversion: km -> km"),
    ("convert_units", '{"value": Infinity, "from_unit": "km", "to_unit": "miles"}', "finite"),
    ("lookup_capital", {"country": "Atlantis"}, "unknown country: Atlantis"),
    ("lookup_capital", {"country": "France", "language": "fr"}, "invalid arguments: unexpected language"),
    ("get_weather", {"city": "Atlantis"}, "unknown city: Atlantis"),
    ("text_transform", {"text": "hello", "operation": "title"}, "operation must be one of"),
])
def test_tools_return_an_error_object_on_bad_input(name, arguments, error):
    result = json.loads(run_tool(name, arguments))
    assert list(result) == ["error"] and error in result["error"]


def test_tools_are_the_declared_five():
    assert TOOLS == json.loads((DATA_DIR / "tools.json").read_text())
    assert {t["function"]["name"] for t in TOOLS} == {
        "calculator", "convert_units", "lookup_capital", "text_transform", "get_weather"}


def _task(task_type, units, expected="") -> Task:
    return Task("t-0", task_type, "prompt", 0, (), expected, tuple(units))


CALC, CONVERT = _task("calculator", ["1522"]), _task("unit_conversion", ["12", ".", "43"])
CAPITAL, TEXT = _task("capital_lookup", ["buenos", "aires"]), _task("text_ops", ["god", "tac"])
COUNT, WEATHER = _task("text_ops", ["3"]), _task("weather_of_capital", ["sunny", "and", "20", "°", "c"])


@pytest.mark.parametrize("task, answer, right", [
    (CALC, "663 + 859 = 1522.", True), (CALC, "The result is 1522", True), (CALC, "1522", True),
    (CALC, "1523", False), (CALC, "15220", False), (CALC, "1,522", False), (CALC, "", False), (CALC, None, False),
    (CONVERT, "12.43 miles", True), (CONVERT, "That is 12.43.", True), (CONVERT, "12 . 43", True),
    (CONVERT, "12.4 miles", False), (CONVERT, "1243", False), (CONVERT, "12.435", False),
    (CAPITAL, "The capital of Argentina is Buenos Aires.", True), (CAPITAL, "BUENOS  AIRES", True),
    (CAPITAL, "Buenos", False), (CAPITAL, "Aires, Buenos", False), (CAPITAL, "Santiago", False),
    (TEXT, 'The reverse is "god tac".', True), (TEXT, '"tac god"', False), (TEXT, "god-tac", False),
    (COUNT, '"cat dog bird" has 3 words.', True), (COUNT, "Word count: 4.", False),
    (WEATHER, "In Berlin it is sunny and 20 °C.", True), (WEATHER, "SUNNY AND 20°C", True),
    (WEATHER, "sunny and 21 °C", False), (WEATHER, "20 °C and sunny", False), (WEATHER, "sunny and 20 °F", False),
])
def test_verifier_on_hand_made_answers(task, answer, right):
    assert verify(task, answer) is right


def test_generated_tasks_are_deterministic_round_robin_and_well_formed():
    tasks = generate_tasks(200, seed=3)
    assert tasks == generate_tasks(200, seed=3) and tasks != generate_tasks(200, seed=4)
    assert [t.task_type for t in tasks[:10]] == list(TASK_TYPES) * 2
    assert [t.task_id for t in tasks[:2]] == ["calculator-3-0", "unit_conversion-3-1"]
    assert all(verify(t, t.expected) and not verify(t, t.prompt) for t in tasks)
    cold = generate_tasks(100, seed=3, phrasings=range(COLD_START_PHRASINGS), task_types=["capital_lookup"])
    assert {t.task_type for t in cold} == {"capital_lookup"} and {t.phrasing for t in cold} == {0, 1, 2}
    with pytest.raises(ValueError):
        generate_tasks(5, seed=3, phrasings=[8])


def test_copied_numbers_and_words_stay_in_the_tokenizer_range():
    tasks = generate_tasks(2000, seed=5)
    for task in tasks:
        text = " ".join([task.prompt, task.expected, *(arguments for _, arguments in task.calls)])
        assert all(int(n) <= MAX_NUMBER for n in re.findall(r"\d+", text)), task
        assert not re.search(r"\d\.\d{3}", text), task
        # no negatives, but for the sub-zero temperatures of data/weather.json ("-" "3": still one token each)
        assert "-" not in task.answer_units or task.task_type == "weather_of_capital", task
        if task.task_type == "calculator":
            assert 0 <= int(task.answer_units[0]) <= MAX_NUMBER
        if task.task_type == "text_ops":
            words = json.loads(task.calls[0][1])["text"].split()
            assert 2 <= len(words) <= 4 and set(words) <= set(WORDS)


def test_phrasings_share_each_types_key_noun():
    keys = {"calculator": ["{expression}"], "unit_conversion": ["{value}", "{from_name}", "{to_name}"],
            "capital_lookup": ["capital", "{country}"], "text_ops": ["{op}", "text", '"{text}"'],
            "weather_of_capital": ["weather", "capital", "{country}"]}
    for task_type, templates in PHRASINGS.items():
        assert len(templates) == 8 and len(set(templates)) == 8
        assert all(key in template.lower() for template in templates for key in keys[task_type]), task_type


def test_the_held_out_set_is_fixed_distinct_and_never_generated_elsewhere():
    held_out = eval_tasks()
    assert len(held_out) == 600 and len({t.prompt.lower() for t in held_out}) == 600
    assert Counter(t.task_type for t in held_out) == {t: 120 for t in TASK_TYPES}
    assert {t.phrasing for t in held_out} == set(range(8))
    assert all(is_eval_prompt(t.prompt) for t in held_out)
    assert is_eval_prompt("  " + held_out[0].prompt.upper().replace(" ", "   "))
    assert generate_tasks(10, seed=EVAL_SEED) == eval_tasks(10)
    assert not any(is_eval_prompt(t.prompt) for t in generate_tasks(5000, seed=0))


def test_the_shipped_held_out_file_equals_eval_tasks():
    shipped = [json.loads(line) for line in (DATA_DIR / "eval_tasks.jsonl").read_text().splitlines()]
    assert shipped == [json.loads(json.dumps(asdict(task))) for task in eval_tasks()]


@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_the_expert_solves_its_tasks_with_real_tool_results(task_type):
    rng, canonical = random.Random(1), 0
    for task in generate_tasks(200, seed=11, task_types=[task_type]):
        messages = expert_messages(task, rng)
        assert messages[0] == {"role": "user", "content": task.prompt}
        calls = [c["function"] for m in messages[1:-1] if m["role"] == "assistant" for c in m["tool_calls"]]
        assert [(c["name"], c["arguments"]) for c in calls] == list(task.calls)
        tool_results = [m["content"] for m in messages if m["role"] == "tool"]
        assert tool_results == [run_tool(c["name"], c["arguments"]) for c in calls]
        assert messages[-1]["role"] == "assistant" and verify(task, messages[-1]["content"])
        canonical += messages[-1]["content"] == task.expected
    assert 20 < canonical < 180  # the wording varies


def _golden_as_openai(conversations: list[dict]) -> list[dict]:
    messages: list[dict] = []
    for turn in conversations[1:]:
        value = turn["value"]
        if turn["from"] == "human":
            messages.append({"role": "user", "content": value})
        elif turn["from"] == "gpt" and "<tool_call>" in value:
            calls = [json.loads(b) for b in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", value, re.DOTALL)]
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{len(messages)}", "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls]})
        elif turn["from"] == "gpt":
            messages.append({"role": "assistant", "content": value})
        else:
            body = json.loads(re.search(r"<tool_response>\n(.*)\n</tool_response>", value, re.DOTALL).group(1))
            content = body["content"] if isinstance(body["content"], str) else json.dumps(body["content"])
            messages.append({"role": "tool", "tool_call_id": messages[-1]["tool_calls"][0]["id"], "content": content})
    return messages


def test_golden_results_are_the_real_tools_and_to_hermes_reproduces_the_file():
    checked = 0
    for line in Path(GOLDEN).read_text().splitlines():
        record = json.loads(line)
        messages = _golden_as_openai(record["conversations"])
        for call, result in zip([m["tool_calls"][0]["function"] for m in messages if m.get("tool_calls")],
                                [m for m in messages if m["role"] == "tool"]):
            assert result["content"] == run_tool(call["name"], call["arguments"]), record["trajectory_id"]
            checked += 1
        assert to_hermes(messages) == record["conversations"]
    assert checked == 48


def test_to_hermes_keeps_broken_arguments_and_embeds_error_objects():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "calculator", "arguments": '{"expr'}}]},
                {"role": "tool", "tool_call_id": "a", "content": run_tool("calculator", '{"expr')}]
    turns = to_hermes(messages)
    assert [t["from"] for t in turns] == ["system", "human", "gpt", "tool"] and turns[0]["value"] == HERMES_SYSTEM
    assert turns[2]["value"] == '<tool_call>\n{"name": "calculator", "arguments": {"expr}\n</tool_call>'
    response = json.loads(turns[3]["value"].removeprefix("<tool_response>\n").removesuffix("\n</tool_response>"))
    assert response["name"] == "calculator" and "not JSON" in response["content"]["error"]


def test_the_demo_log_serves_environment_tasks_deterministically(tmp_path):
    from flywheel_assets.lib.simulation.demo_log import _plan, write_demo_log

    rng = random.Random(0)
    for task in generate_tasks(300, seed=7):
        plan = _plan(rng, task)
        assert verify(task, plan["answer"]) and not verify(task, plan["wrong"]), plan
        assert [(name, result) for name, _, result in plan["calls"]] == [
            (name, run_tool(name, arguments)) for name, arguments in task.calls]
    first, second = write_demo_log(tmp_path / "a", n_sessions=80), write_demo_log(tmp_path / "b", n_sessions=80)
    assert first == second and all(
        (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes() for name in first["bytes_by_file"])
    lines = (tmp_path / "a" / "trajectories" / "usage-hermes.jsonl").read_bytes().splitlines()
    records = [r for r in map(_json_or_none, lines) if isinstance(r, dict) and isinstance(r.get("conversations"), list)]
    prompts = [r["conversations"][1]["value"] for r in records]
    assert records and not any(is_eval_prompt(p) for p in prompts)


def _json_or_none(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None
