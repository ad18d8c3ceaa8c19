"""The embedded default's task environment: the tasks users ask, the scripted expert's answers, the verifier.

The tools the tasks call are real Python (tools.py). A tiny model must copy numbers and entities from the question into tool
calls and answers, so every number it copies is an integer 0..999 or a 2-decimal
number, and each task type has 8 phrasings sharing its key noun: cold-start data
uses the first COLD_START_PHRASINGS, the held-out evaluation all 8 (FINDINGS.md).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache

from flywheel_assets.lib.simulation.tools import CAPITALS, CONVERSIONS, DATA_DIR, run_tool

TASK_TYPES = ("calculator", "unit_conversion", "capital_lookup", "text_ops", "weather_of_capital")
N_PHRASINGS = 8
COLD_START_PHRASINGS = 3
EVAL_SEED = 1_000_003
EVAL_SIZE = 600
PHRASINGS: dict[str, list[str]] = {
    "calculator": [
        "What is {expression}?", "Calculate {expression}.", "Compute {expression} for me.",
        "Please work out {expression}.", "Can you calculate {expression}?", "I need the result of {expression}.",
        "How much is {expression}?", "Evaluate {expression}, please."],
    "unit_conversion": [
        "Convert {value} {from_name} to {to_name}.", "How many {to_name} is {value} {from_name}?",
        "What is {value} {from_name} in {to_name}?", "Please convert {value} {from_name} into {to_name}.",
        "{value} {from_name} equals how many {to_name}?", "I have {value} {from_name}. How much is that in {to_name}?",
        "Express {value} {from_name} in {to_name}, please.", "Can you convert {value} {from_name} to {to_name} for me?"],
    "capital_lookup": [
        "What is the capital of {country}?", "Tell me the capital of {country}.",
        "Which city is the capital of {country}?", "What's the capital city of {country}?",
        "Name the capital of {country}, please.", "I need to know the capital of {country}.",
        "{country}: what is its capital?", "Do you know which city is the capital of {country}?"],
    "text_ops": [
        'What is the {op} of the text "{text}"?', 'Give me the {op} of the text "{text}".',
        'Find the {op} of the text "{text}".', 'I need the {op} of this text: "{text}"',
        'Text: "{text}". What is its {op}?', 'Please compute the {op} of the text "{text}".',
        'Could you tell me the {op} of the text "{text}"?', 'For the text "{text}", what is the {op}?'],
    "weather_of_capital": [
        "What is the weather in the capital of {country}?", "How is the weather in the capital of {country} today?",
        "Tell me the weather in the capital of {country}.", "What's the weather like in the capital city of {country}?",
        "I am visiting the capital of {country}. What is the weather there?",
        "Check the weather for the capital of {country}, please.", "Weather report for the capital of {country}?",
        "Could you get me the current weather in the capital of {country}?"],
}
# The scripted expert's final answers (the first is a task's canonical `expected`) and, where it is not
# the last tool result, the span of the answer that the verifier looks for.
ANSWERS: dict[str, list[str]] = {
    "calculator": ["{expression} = {result}.", "The result is {result}.", "{expression} equals {result}.",
                   "The answer is {result}."],
    "unit_conversion": ["{value} {from_name} is {result} {to_name}.", "That is {result} {to_name}.",
                        "{value} {from_name} equals {result} {to_name}.", "It comes to {result} {to_name}."],
    "capital_lookup": ["The capital of {country} is {result}.", "{result} is the capital of {country}.",
                       "The capital city of {country} is {result}.", "It is {result}."],
    "reverse": ['"{text}" reversed is "{result}".', 'The reverse is "{result}".', 'Reversed: "{result}".'],
    "word_count": ['"{text}" has {result} words.', "The text has {result} words.", "Word count: {result}."],
    "weather_of_capital": [
        "In {city}, the capital of {country}, it is {condition} and {temp_c} °C.",
        "The capital of {country} is {city}, where it is {condition} and {temp_c} °C.",
        "{city} is the capital of {country}; right now it is {condition} and {temp_c} °C.",
        "Weather in {city}: {condition} and {temp_c} °C."],
}
SPANS = {"weather_of_capital": "{condition} and {temp_c} °C"}
UNIT_NAMES = {"km": "km", "miles": "miles", "kg": "kg", "lb": "pounds", "celsius": "celsius",
              "fahrenheit": "fahrenheit", "m": "meters", "ft": "feet", "l": "liters", "gal": "gallons"}
OPERATION_NOUNS = {"reverse": "reverse", "word_count": "word count"}
# upper/lower are left out of tasks: the verifier ignores case, so echoing the text would pass.
WORDS = (
    "apple", "river", "green", "house", "music", "table", "light", "water", "happy", "cloud", "stone", "bread",
    "chair", "dream", "field", "glass", "horse", "lemon", "money", "night", "ocean", "paper", "plant", "quiet",
    "robot", "smile", "sugar", "tiger", "train", "voice", "world", "yellow", "bird", "book", "cake", "door",
    "fish", "game", "hand", "king", "lamp", "moon", "road", "ship", "star", "tree", "wind", "blue", "cold",
    "fast", "warm", "small", "early", "brave", "sweet", "winter", "summer", "garden", "window", "forest",
    "silver", "market", "rabbit", "pencil", "orange", "family", "friend", "letter", "planet", "school", "coffee",
    "dinner", "doctor", "flower", "island", "jacket", "mirror", "number", "pocket", "simple")
_UNITS = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Task:
    task_id: str
    task_type: str
    prompt: str
    phrasing: int
    calls: tuple[tuple[str, str], ...]  # the right tool calls in order: (name, canonical JSON arguments)
    expected: str  # the canonical right final answer
    answer_units: tuple[str, ...]  # what verify looks for, as lowercased units


def units(text: str) -> list[str]:
    return _UNITS.findall(text.lower())


def _contains(haystack: list[str], needle: Sequence[str]) -> bool:
    size = len(needle)
    return size > 0 and any(tuple(haystack[i:i + size]) == tuple(needle) for i in range(len(haystack) - size + 1))


def verify(task: Task, final_answer: str | None) -> bool:
    """The answer holds the task's answer units, contiguously (case and spacing ignored)."""
    return isinstance(final_answer, str) and _contains(units(final_answer), [u.lower() for u in task.answer_units])


MAX_NUMBER = 999  # one token per integer 0..MAX_NUMBER (lib/training/tokenizer.py)


def _number(rng: random.Random, high: int) -> int:
    """2..high (or 0..high when high < 2), with 1- to 3-digit sizes equally likely."""
    top = min(high, 10 ** rng.randint(1, 3) - 1)
    return rng.randint(min(2, top), top)


def _expression(rng: random.Random) -> str:
    form = rng.choice(("+", "-", "*", "+", "-", "*", "*+", "*-", "+-"))
    if form == "*" or form[0] == "*":
        a = rng.randint(2, 31)
        b = _number(rng, MAX_NUMBER // a)
        if form == "*":
            return f"{a} * {b}"
        c = _number(rng, MAX_NUMBER - a * b if form == "*+" else a * b)
        return f"{a} * {b} {form[1]} {c}"
    a = _number(rng, MAX_NUMBER - 2)
    b = _number(rng, MAX_NUMBER - a) if form[0] == "+" else _number(rng, a)
    return f"{a} {form[0]} {b}" if len(form) == 1 else f"{a} + {b} - {_number(rng, a + b)}"


def _draw_calls(rng: random.Random, task_type: str) -> list[tuple[str, dict]]:
    if task_type == "calculator":
        return [("calculator", {"expression": _expression(rng)})]
    if task_type == "unit_conversion":
        from_unit, to_unit = rng.choice(list(CONVERSIONS))
        while True:  # every number the model copies stays one token: results too stay within MAX_NUMBER
            if from_unit in ("celsius", "fahrenheit"):
                value = rng.randint(0, 300) if from_unit == "celsius" else rng.randint(32, 600)
            else:
                value = _number(rng, 999) if rng.random() < 0.8 else round(_number(rng, 999) + rng.randint(1, 99) / 100, 2)
            if CONVERSIONS[from_unit, to_unit](value) <= MAX_NUMBER:
                break
        return [("convert_units", {"value": value, "from_unit": from_unit, "to_unit": to_unit})]
    country = rng.choice(sorted(CAPITALS))
    if task_type == "capital_lookup":
        return [("lookup_capital", {"country": country})]
    if task_type == "text_ops":
        text = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
        return [("text_transform", {"text": text, "operation": rng.choice(sorted(OPERATION_NOUNS))})]
    return [("lookup_capital", {"country": country}), ("get_weather", {"city": CAPITALS[country]})]


def _slots(calls: Sequence[tuple[str, dict]], results: Sequence[str]) -> dict:
    """Everything a prompt or answer template may name, from the calls and their results."""
    slots: dict = {"result": results[-1]}
    for (name, arguments), result in zip(calls, results):
        slots.update(arguments)
        if name == "get_weather":
            slots.update(json.loads(result))
        elif name == "lookup_capital":
            slots["city"] = result
    if "from_unit" in slots:
        slots.update(from_name=UNIT_NAMES[slots["from_unit"]], to_name=UNIT_NAMES[slots["to_unit"]])
    if "operation" in slots:
        slots["op"] = OPERATION_NOUNS[slots["operation"]]
    return slots


def _answers(task_type: str, slots: dict) -> list[str]:
    return ANSWERS[slots["operation"] if task_type == "text_ops" else task_type]


def _draw_task(rng: random.Random, task_type: str, phrasing: int, task_id: str) -> Task | None:
    calls = _draw_calls(rng, task_type)
    slots = _slots(calls, [run_tool(name, arguments) for name, arguments in calls])
    task = _task(task_type, phrasing, PHRASINGS[task_type][phrasing].format(**slots), calls, slots, task_id)
    if _contains(units(task.prompt), task.answer_units):
        return None  # the answer is in the question (`10 - 5`): echoing it would pass
    return task


def _task(task_type: str, phrasing: int, prompt: str, calls: Sequence[tuple[str, dict]], slots: dict,
          task_id: str) -> Task:
    answer_units = tuple(units(SPANS.get(task_type, "{result}").format(**slots)))
    canonical = tuple((name, json.dumps(arguments, sort_keys=True)) for name, arguments in calls)
    expected = _answers(task_type, slots)[0].format(**slots)
    return Task(task_id, task_type, prompt, phrasing, canonical, expected, answer_units)


def _alternatives(values) -> str:
    return "|".join(re.escape(value) for value in sorted(values, key=len, reverse=True))


_SLOT_PATTERNS = {
    "expression": r"[0-9]+(?: [-+*] [0-9]+)+", "value": r"[0-9]+(?:\.[0-9]+)?",
    "from_name": _alternatives(UNIT_NAMES.values()), "to_name": _alternatives(UNIT_NAMES.values()),
    "country": _alternatives(CAPITALS), "op": _alternatives(OPERATION_NOUNS.values()), "text": r"[a-z]+(?: [a-z]+)*",
}


@cache
def _prompt_patterns() -> list[tuple[str, int, re.Pattern]]:
    patterns = []
    for task_type, phrasings in PHRASINGS.items():
        for phrasing, template in enumerate(phrasings):
            parts = re.split(r"\{(\w+)\}", template)
            regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_SLOT_PATTERNS[part]})"
                            for i, part in enumerate(parts))
            patterns.append((task_type, phrasing, re.compile(regex + r"\Z")))
    return patterns


def task_from_prompt(prompt: str, task_id: str = "parsed") -> Task | None:
    """The task a user's request states, read back from the task environment's phrasings
    (what the scripted teacher works from when it corrects a failed request); None when
    the request is not one of them."""
    text = " ".join(prompt.split())
    units_by_name = {name: unit for unit, name in UNIT_NAMES.items()}
    operations = {noun: operation for operation, noun in OPERATION_NOUNS.items()}
    for task_type, phrasing, pattern in _prompt_patterns():
        if (match := pattern.match(text)) is None:
            continue
        slots = match.groupdict()
        if task_type == "calculator":
            calls = [("calculator", {"expression": slots["expression"]})]
        elif task_type == "unit_conversion":
            value = float(slots["value"]) if "." in slots["value"] else int(slots["value"])
            calls = [("convert_units", {"value": value, "from_unit": units_by_name[slots["from_name"]],
                                        "to_unit": units_by_name[slots["to_name"]]})]
        elif task_type == "capital_lookup":
            calls = [("lookup_capital", {"country": slots["country"]})]
        elif task_type == "text_ops":
            calls = [("text_transform", {"text": slots["text"], "operation": operations[slots["op"]]})]
        else:
            calls = [("lookup_capital", {"country": slots["country"]}),
                     ("get_weather", {"city": CAPITALS[slots["country"]]})]
        results = [run_tool(name, arguments) for name, arguments in calls]
        if any(result.startswith('{"error"') for result in results):
            return None
        return _task(task_type, phrasing, prompt, calls, _slots(calls, results), task_id)
    return None


def _prompt_key(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def _generate(n: int, seed: int, phrasings: Sequence[int] | None, task_types: Sequence[str],
              exclude: frozenset[str], unique: bool) -> list[Task]:
    choices = list(range(N_PHRASINGS) if phrasings is None else phrasings)
    if not choices or not set(choices) <= set(range(N_PHRASINGS)) or not set(task_types) <= set(TASK_TYPES):
        raise ValueError(f"phrasings must be among 0..{N_PHRASINGS - 1} and task types among {TASK_TYPES}")
    rng, seen, tasks = random.Random(seed), set(), []
    for i, task_type in enumerate(task_types[i % len(task_types)] for i in range(n)):
        for _ in range(10_000):
            task = _draw_task(rng, task_type, rng.choice(choices), f"{task_type}-{seed}-{i}")
            if task is not None and (key := _prompt_key(task.prompt)) not in exclude and key not in seen:
                break
        else:
            raise RuntimeError(f"no {task_type} task outside the excluded prompts for phrasings {choices}")
        seen.update([key] if unique else [])
        tasks.append(task)
    return tasks


def generate_tasks(n: int, seed: int, phrasings: Sequence[int] | None = None,
                   task_types: Sequence[str] = TASK_TYPES) -> list[Task]:
    """n tasks, round-robin over task_types, deterministic for a seed; never an evaluation prompt."""
    exclude = frozenset() if seed == EVAL_SEED else eval_prompt_keys()
    return _generate(n, seed, phrasings, task_types, exclude, unique=False)


def eval_tasks(n: int = EVAL_SIZE) -> list[Task]:
    """The fixed held-out evaluation set: distinct prompts over all 8 phrasings."""
    return _generate(n, EVAL_SEED, None, TASK_TYPES, frozenset(), unique=True)


@cache
def eval_prompt_keys() -> frozenset[str]:
    return frozenset(_prompt_key(task.prompt) for task in eval_tasks(EVAL_SIZE))


def is_eval_prompt(prompt: str) -> bool:
    return _prompt_key(prompt) in eval_prompt_keys()


def expert_messages(task: Task, rng: random.Random) -> list[dict]:
    """A correct OpenAI-chat conversation solving the task: the right calls, real results, a varied answer."""
    messages: list[dict] = [{"role": "user", "content": task.prompt}]
    calls, results = [], []
    for name, canonical in task.calls:
        arguments = json.loads(canonical)
        call_id = f"call_{rng.getrandbits(48):012x}"
        result = run_tool(name, arguments)
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": canonical}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
        calls.append((name, arguments))
        results.append(result)
    slots = _slots(calls, results)
    messages.append({"role": "assistant", "content": rng.choice(_answers(task.task_type, slots)).format(**slots)})
    return messages


if __name__ == "__main__":
    lines = [json.dumps(asdict(task)) + "\n" for task in eval_tasks()]
    (DATA_DIR / "eval_tasks.jsonl").write_text("".join(lines))
    print(f"wrote {len(lines)} evaluation tasks to {DATA_DIR / 'eval_tasks.jsonl'}")
