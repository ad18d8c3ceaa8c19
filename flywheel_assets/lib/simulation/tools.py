"""The embedded default's five tools as real Python: data/tools.json declares them as OpenAI function
schemas, data/capitals.json and data/weather.json are the tables they look up. run_tool checks the
arguments against the schema and returns what the agent sees; a failure is a JSON {"error": ...}."""

from __future__ import annotations

import ast
import json
import math
import operator
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[3] / "data"
TOOLS: list[dict] = json.loads((DATA_DIR / "tools.json").read_text())
CAPITALS: dict[str, str] = json.loads((DATA_DIR / "capitals.json").read_text())
WEATHER: dict[str, dict] = json.loads((DATA_DIR / "weather.json").read_text())
_FACTORS = {("km", "miles"): 1 / 1.609344, ("miles", "km"): 1.609344, ("kg", "lb"): 1 / 0.45359237,
            ("lb", "kg"): 0.45359237, ("m", "ft"): 1 / 0.3048, ("ft", "m"): 0.3048,
            ("l", "gal"): 1 / 3.785411784, ("gal", "l"): 3.785411784}
CONVERSIONS = {**{pair: (lambda value, factor=factor: value * factor) for pair, factor in _FACTORS.items()},
               ("celsius", "fahrenheit"): lambda value: value * 9 / 5 + 32,
               ("fahrenheit", "celsius"): lambda value: (value - 32) * 5 / 9}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
_CAPITALS = {country.casefold(): city for country, city in CAPITALS.items()}
_WEATHER = {city.casefold(): json.dumps(report) for city, report in WEATHER.items()}


class ToolError(ValueError):
    pass


def _calculator(expression: str) -> str:
    if len(expression) > 200:
        raise ToolError("expression too long")
    try:
        return str(_evaluate(ast.parse(expression.strip(), mode="eval").body))
    except SyntaxError as problem:
        raise ToolError(f"invalid expression: {problem.msg}") from problem


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ToolError("only integers with + - * are supported")


def _convert_units(value: float, from_unit: str, to_unit: str) -> str:
    if (from_unit, to_unit) not in CONVERSIONS:
        raise ToolError(f"unsupported conversion: {from_unit} -> {to_unit}")
    if not math.isfinite(value):
        raise ToolError("value must be a finite number")
    return str(round(CONVERSIONS[from_unit, to_unit](value), 2))


def _lookup(table: dict[str, str], key: str, what: str) -> str:
    if (found := table.get(key.strip().casefold())) is None:
        raise ToolError(f"unknown {what}: {key}")
    return found


_TOOL_CODE = {
    "calculator": _calculator, "convert_units": _convert_units,
    "lookup_capital": lambda country: _lookup(_CAPITALS, country, "country"),
    "get_weather": lambda city: _lookup(_WEATHER, city, "city"),
    "text_transform": lambda text, operation: {"reverse": text[::-1], "upper": text.upper(), "lower": text.lower(),
                                               "word_count": str(len(text.split()))}[operation],
}


def _check_arguments(name: str, arguments) -> dict:
    """Arguments as the tool's JSON schema declares them: required present, no others, types and enums."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as problem:
            raise ToolError(f"invalid arguments: not JSON ({problem.msg})") from problem
    if not isinstance(arguments, dict):
        raise ToolError("invalid arguments: expected a JSON object")
    schema = _SCHEMAS[name]
    if missing := [key for key in schema["required"] if key not in arguments]:
        raise ToolError(f"invalid arguments: missing {', '.join(missing)}")
    for key, value in arguments.items():
        if (spec := schema["properties"].get(key)) is None:
            raise ToolError(f"invalid arguments: unexpected {key}")
        if isinstance(value, bool) or not isinstance(value, str if spec["type"] == "string" else (int, float)):
            raise ToolError(f"invalid arguments: {key} must be a {spec['type']}")
        if value not in spec.get("enum", [value]):
            raise ToolError(f"invalid arguments: {key} must be one of {', '.join(spec['enum'])}")
    return arguments


def run_tool(name: str, arguments: dict | str) -> str:
    """The tool's result as the agent sees it; failures are a JSON string {"error": ...}."""
    try:
        if name not in _TOOL_CODE:
            raise ToolError(f"unknown tool: {name}")
        return _TOOL_CODE[name](**_check_arguments(name, arguments))
    except (ValueError, RecursionError, OverflowError, MemoryError) as problem:  # ToolError is a ValueError
        return json.dumps({"error": str(problem) or type(problem).__name__})
