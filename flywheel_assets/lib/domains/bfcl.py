"""BFCL (Berkeley Function-Calling Leaderboard) as a domain: its single-turn AST categories.

Data: the files the PyPI package `bfcl-eval` ships (`find_bfcl_data()`), or a user's own
in the same format: `<dir>/BFCL_v4_<category>.json` (one task a line: `id`, `question` =
turns of OpenAI messages, `function` = docs with `"type": "dict"`) and
`<dir>/possible_answer/BFCL_v4_<category>.json` (`id`, `ground_truth` = a list of
`{function_name: {param: [accepted values]}}`, `""` among them meaning "may be absent").

The checker is our own reading of BFCL's `eval_checker/ast_eval/ast_checker.py` (Python
language path; the package imports every vendor SDK, so it cannot be a dependency):

- The function name must match. BFCL compares against the name with dots turned into
  underscores for models whose API forbids dots, else the original; we offer tools under
  the OpenAI-safe name (`tool_name`) and accept either spelling.
- Every parameter the doc requires must be present; a parameter absent from the doc or
  from the ground truth is rejected; a ground-truth parameter may be absent only when
  `""` is among its accepted values.
- Types: an int is accepted where a float is expected, never the reverse; a bool is not a
  number and never equals one. Differences: BFCL checks element types one level into
  arrays, never inside dicts, and turns int into float only at the top; we check the
  whole value against the doc's schema, int for float at any depth (so `[1, 3]` for a
  float array passes us, not BFCL; 9.0 for an integer or 0 for false inside a dict
  passes BFCL, not us). `any` accepts any JSON value (BFCL demands a string). Where the
  ground truth itself breaks the doc's types (BFCL's "variable" case: `"data['sales']"`
  for an array, `true` for a string; 9 real tasks), a value of the ground truth's own
  type equal to it is accepted, as in BFCL, though strings are then standardized where
  BFCL compares them exactly. Inside dict parameters the doc's types always hold.
- Values: each must equal one accepted value. Strings are compared after BFCL's
  `standardize_string` (drop spaces and `,./-_*^`, lowercase, `'` → `"`). BFCL applies it
  to top-level strings, strings directly in a list and string values of a dict parameter;
  we apply it to strings at any depth (more lenient for e.g. lists inside dicts). A dict
  parameter's accepted values are `{key: [accepted]}` templates (same rules one level
  down), an array-of-dicts parameter's are lists of such templates (order kept); deeper
  values are literals, as in BFCL.
- Calls: the model must make exactly as many calls as the ground truth has (so one for
  simple and multiple), matched order-free, each to a distinct ground-truth entry. BFCL
  matches greedily in ground-truth order and can miss a matching that exists; we find
  one whenever it exists (maximum bipartite matching), so we only ever accept more
  (real case: parallel_178's four correct calls in reverse order fail BFCL).

Checked against BFCL's own checker (vendor imports stubbed) on the six categories'
2,311 tasks, with the oracle answer and 48,000 perturbations of it (each alternative
value, each parameter dropped, unknown parameter, case and punctuation, int/float/bool
swaps, reordered, missing or extra calls): 31 verdicts differ, all of the kinds above.
Four tasks have no passing answer under either checker (their ground truth contradicts
their doc); see the real-data test.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flywheel_assets.lib.domains import (
    DEFAULT_HELDOUT_FRACTION,
    DEFAULT_SPLIT_SEED,
    CheckResult,
    Domain,
)

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple")
FILE_PREFIX = "BFCL_v4_"
OPTIONAL = ""  # among accepted values: the parameter may be left out

# BFCL type names → JSON Schema's; None: no type, any value (others are JSON Schema's already).
_JSON_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": None,
               "list": "array", "bool": "boolean"}
_STANDARDIZE = re.compile(r"[ ,./\-_*^]")


@dataclass(frozen=True)
class BFCLTask:
    id: str
    category: str
    messages: list[dict]
    functions: list[dict]  # BFCL docs, as in the file
    ground_truth: list[dict]  # [{function_name: {param: [accepted values]}}]


def find_bfcl_data() -> Path | None:
    """The data folder of an installed `bfcl-eval`, or None. Uses find_spec, which locates
    the package without importing it (its __init__ pulls in vendor SDKs)."""
    spec = importlib.util.find_spec("bfcl_eval")
    for location in (spec.submodule_search_locations or []) if spec else []:
        data = Path(location) / "data"
        if (data / "possible_answer").is_dir():
            return data
    return None


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def load_bfcl(data_dir: str | Path, categories: Sequence[str] = CATEGORIES) -> list[BFCLTask]:
    """Every task of the categories, in file order. Fails loudly on a task without an
    answer or with several turns: a silently dropped task would skew every score."""
    data_dir = Path(data_dir)
    tasks = []
    for category in categories:
        questions = _read_jsonl(data_dir / f"{FILE_PREFIX}{category}.json")
        answers = {row["id"]: row["ground_truth"]
                   for row in _read_jsonl(data_dir / "possible_answer" / f"{FILE_PREFIX}{category}.json")}
        for row in questions:
            if row["id"] not in answers:
                raise ValueError(f"{category}: task {row['id']} has no possible answer")
            if len(row["question"]) != 1:
                raise ValueError(f"{category}: task {row['id']} has {len(row['question'])} turns; "
                                 "only single-turn tasks can be checked from the calls alone")
            tasks.append(BFCLTask(id=row["id"], category=category, messages=row["question"][0],
                                  functions=row["function"], ground_truth=answers[row["id"]]))
    return tasks


def tool_name(name: str) -> str:
    """The OpenAI-safe spelling (names must match ^[a-zA-Z0-9_-]{1,64}$), as BFCL does."""
    return name.replace(".", "_")


def _kind(schema: dict | None) -> str | None:
    bfcl_type = (schema or {}).get("type")
    return _JSON_TYPES.get(bfcl_type, bfcl_type)


def to_json_schema(schema: dict) -> dict:
    """A BFCL parameter schema as JSON Schema, recursively; other keys kept as they are."""
    converted = {key: value for key, value in schema.items() if key not in ("type", "properties", "items")}
    if (json_type := _kind(schema)) is not None:
        converted["type"] = json_type
    if "properties" in schema:
        converted["properties"] = {name: to_json_schema(sub) for name, sub in schema["properties"].items()}
    if "items" in schema:
        converted["items"] = to_json_schema(schema["items"])
    return converted


def to_openai_tool(function: dict) -> dict:
    return {"type": "function", "function": {"name": tool_name(function["name"]),
                                             "description": function.get("description", ""),
                                             "parameters": to_json_schema(function["parameters"])}}


def standardize_string(text: str) -> str:
    """BFCL's string normalization, so "April 1, 2024" equals "april 1 2024"."""
    return _STANDARDIZE.sub("", text).lower().replace("'", '"')


def _type_error(value, schema: dict | None, path: str) -> str | None:
    kind = _kind(schema)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    expected = {"string": isinstance(value, str), "boolean": isinstance(value, bool),
                "integer": isinstance(value, int) and not isinstance(value, bool),
                "number": is_number,  # an int where a float is expected is fine
                "array": isinstance(value, list), "object": isinstance(value, dict)}.get(kind, True)
    if not expected:
        return f"{path}: expected {schema['type']}, got {type(value).__name__} {value!r}"
    if kind == "array":
        for index, item in enumerate(value):
            if error := _type_error(item, schema.get("items"), f"{path}[{index}]"):
                return error
    if kind == "object":
        properties = schema.get("properties", {})
        for key, item in value.items():
            if error := _type_error(item, properties.get(key), f"{path}.{key}"):
                return error
    return None


def _same(value, accepted) -> bool:
    """Literal equality, strings standardized at any depth, bools never equal to numbers."""
    if isinstance(value, str) and isinstance(accepted, str):
        return standardize_string(value) == standardize_string(accepted)
    if isinstance(value, bool) or isinstance(accepted, bool):
        return type(value) is type(accepted) and value == accepted
    if isinstance(value, (int, float)) and isinstance(accepted, (int, float)):
        return value == accepted
    if isinstance(value, list) and isinstance(accepted, list):
        return len(value) == len(accepted) and all(map(_same, value, accepted))
    if isinstance(value, dict) and isinstance(accepted, dict):
        return value.keys() == accepted.keys() and all(_same(value[k], accepted[k]) for k in value)
    return type(value) is type(accepted) and value == accepted


def _fits_template(value: dict, template) -> bool:
    """A dict against `{key: [accepted]}`: no key outside it, each value accepted, and a
    missing key only where `""` is accepted."""
    if not isinstance(template, dict) or not isinstance(value, dict):
        return False
    return (all(key in template and any(_same(item, a) for a in template[key]) for key, item in value.items())
            and all(key in value or OPTIONAL in accepted for key, accepted in template.items()))


def _param_error(name: str, value, schema: dict, accepted: list) -> str | None:
    kind, item_kind = _kind(schema), _kind(schema.get("items"))
    uses_templates = kind == "object" or (kind == "array" and item_kind == "object")
    if error := _type_error(value, schema, name):
        # Where the ground truth itself breaks the doc's types (a Python variable name for
        # an array, True for a "string"), reproducing it is right: BFCL's variable escape.
        if uses_templates or not any(type(a) is type(value) and _type_error(a, schema, name) and _same(value, a)
                                     for a in accepted if a != OPTIONAL):
            return error
    if kind == "object":
        ok = any(_fits_template(value, template) for template in accepted)
    elif kind == "array" and item_kind == "object":
        ok = any(isinstance(templates, list) and len(templates) == len(value)
                 and all(map(_fits_template, value, templates)) for templates in accepted)
    else:
        ok = any(_same(value, a) for a in accepted)
    return None if ok else f"{name}: {value!r} is not among the accepted values {accepted!r}"


def _call_error(call: dict, function: dict, expected_name: str, expected: dict) -> str | None:
    """Why one model call does not match one ground-truth entry, or None when it does."""
    if call["name"] not in (expected_name, tool_name(expected_name)):
        return f"function {call['name']!r} is not {expected_name!r}"
    arguments, properties = call["arguments"], function["parameters"].get("properties", {})
    for param in function["parameters"].get("required", []):
        if param not in arguments:
            return f"missing required parameter {param!r}"
    for param, value in arguments.items():
        if param not in properties or param not in expected:
            return f"unexpected parameter {param!r}"
        if error := _param_error(param, value, properties[param], expected[param]):
            return error
    for param, accepted in expected.items():
        if param not in arguments and OPTIONAL not in accepted:
            return f"missing parameter {param!r} (not optional here)"
    return None


def _parse_call(call: dict) -> dict:
    """{name, arguments: dict}; accepts OpenAI's {"function": {...}} wrapper and JSON-string arguments."""
    call = call.get("function", call)
    arguments = call.get("arguments") or {}
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
        raise ValueError("a call needs a string name and an object of arguments")
    return {"name": call["name"], "arguments": arguments}


def _perfect_matching(fits: list[list[bool]]) -> bool:
    """Whether each call can take a distinct ground-truth entry it fits (Kuhn's augmenting paths)."""
    owner: dict[int, int] = {}  # ground-truth entry → call

    def claim(call: int, seen: set[int]) -> bool:
        for entry, fit in enumerate(fits[call]):
            if fit and entry not in seen:
                seen.add(entry)
                if entry not in owner or claim(owner[entry], seen):
                    owner[entry] = call
                    return True
        return False

    return all(claim(call, set()) for call in range(len(fits)))


def check_calls(task: BFCLTask, calls: Sequence[dict]) -> CheckResult:
    """BFCL's AST check of a list of tool calls against the task's ground truth."""
    try:
        parsed = [_parse_call(call) for call in calls]
    except (ValueError, TypeError, AttributeError) as error:  # json.JSONDecodeError is a ValueError
        return CheckResult(False, f"malformed call: {error}")
    if len(parsed) != len(task.ground_truth):
        return CheckResult(False, f"{len(parsed)} calls, expected {len(task.ground_truth)}")
    docs = {function["name"]: function for function in task.functions}
    errors = [[None] * len(task.ground_truth) for _ in parsed]
    for entry, truth in enumerate(task.ground_truth):
        (expected_name, expected), = truth.items()
        if expected_name not in docs:
            return CheckResult(False, f"ground truth names {expected_name!r}, which the task does not offer")
        for index, call in enumerate(parsed):
            errors[index][entry] = _call_error(call, docs[expected_name], expected_name, expected)
    if _perfect_matching([[error is None for error in row] for row in errors]):
        return CheckResult(True, "ok")
    if len(parsed) == 1:
        return CheckResult(False, errors[0][0])
    unmatched = [entry for entry in range(len(task.ground_truth)) if all(row[entry] for row in errors)]
    if unmatched:
        entry = unmatched[0]
        name = next(iter(task.ground_truth[entry]))
        return CheckResult(False, f"no call matches expected call {entry} ({name}): "
                                  + "; ".join(f"call {i}: {row[entry]}" for i, row in enumerate(errors)))
    return CheckResult(False, "the calls cannot be matched one-to-one with the expected calls")


def _first(accepted: list):
    return next((value for value in accepted if value != OPTIONAL), OPTIONAL)


def _concrete(value, schema: dict):
    """A dict parameter's template (or an array-of-dicts' templates) as a plain value."""
    def fill(template: dict) -> dict:
        return {key: _first(accepted) for key, accepted in template.items() if OPTIONAL not in accepted}
    if _kind(schema) == "object" and isinstance(value, dict):
        return fill(value)
    if _kind(schema) == "array" and _kind(schema.get("items")) == "object" and isinstance(value, list):
        return [fill(item) for item in value]
    return value


def reference_calls(task: BFCLTask) -> list[dict]:
    """The oracle answer: each ground-truth call with the first accepted value of every
    parameter that is not optional (optional ones left out, unless the doc requires them)."""
    docs = {function["name"]: function for function in task.functions}
    calls = []
    for truth in task.ground_truth:
        (name, expected), = truth.items()
        parameters = docs[name]["parameters"]
        required = set(parameters.get("required", []))
        arguments = {param: _concrete(_first(accepted), parameters["properties"].get(param))
                     for param, accepted in expected.items() if OPTIONAL not in accepted or param in required}
        calls.append({"name": tool_name(name), "arguments": arguments})
    return calls


class BFCLDomain(Domain):
    name = "bfcl"

    def __init__(self, tasks: Sequence[BFCLTask], *, seed: int = DEFAULT_SPLIT_SEED,
                 heldout_fraction: float = DEFAULT_HELDOUT_FRACTION):
        self._tasks = list(tasks)
        self.seed, self.heldout_fraction = seed, heldout_fraction

    @classmethod
    def from_dir(cls, data_dir: str | Path | None = None, categories: Sequence[str] = CATEGORIES,
                 **split) -> BFCLDomain:
        """From a folder of BFCL-format files, by default the installed bfcl-eval's."""
        data_dir = data_dir or find_bfcl_data()
        if data_dir is None:
            raise FileNotFoundError("no BFCL data: pass data_dir, or `pip install --no-deps bfcl-eval`")
        return cls(load_bfcl(data_dir, categories), **split)

    def tasks(self) -> list[BFCLTask]:
        return self._tasks

    def tools_for(self, task: BFCLTask) -> list[dict]:
        return [to_openai_tool(function) for function in task.functions]

    def check(self, task: BFCLTask, tool_calls: Sequence[dict]) -> CheckResult:
        return check_calls(task, tool_calls)

    def reference_answer(self, task: BFCLTask) -> list[dict]:
        return reference_calls(task)
