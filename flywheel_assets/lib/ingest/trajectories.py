"""Trajectories: hermes/ShareGPT and OpenAI chat lines into one canonical row.

Trajectories are few and large next to events, so they are parsed in Python:
tool calls hide inside hermes text (`<tool_call>{json}</tool_call>`), which no SQL
JSON function can read.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from flywheel_assets.lib.ingest.limits import TS_RANGE, check_timestamp
from flywheel_assets.lib.tables import TRAJECTORIES


class BadLine(ValueError):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_TOOL_RESPONSE = re.compile(r"<tool_response>(.*?)</tool_response>", re.DOTALL)
_TOOLS = re.compile(r"<tools>(.*?)</tools>", re.DOTALL)
_NAME = re.compile(r'"name"\s*:\s*"([^"]*)"')
_ERROR_TEXT = re.compile(r"^\s*(error\b|traceback|exception\b)", re.IGNORECASE)

_OUR_KEYS = {
    "trajectory_id": str, "session_id": str, "user_id": str, "tenant_id": str, "task_type": str,
    "model_version": str, "model": str, "origin": str, "is_synthetic": bool, "created_at": str,
    "timestamp": str, "completed": bool, "reward": (int, float),
}


def parse_trajectory(obj: Any, ingested_at: datetime) -> dict:
    """One canonical row (the TRAJECTORIES schema, less source columns) or BadLine."""
    if not isinstance(obj, dict):
        raise BadLine("not_an_object", f"line is JSON {type(obj).__name__}, not an object")
    for key, expected in _OUR_KEYS.items():
        value = obj.get(key)
        if value is not None and (not isinstance(value, expected) or (expected is not bool and isinstance(value, bool))):
            raise BadLine("wrong_type", f"{key} must be {_type_name(expected)}, got {type(value).__name__}")
    if isinstance(obj.get("conversations"), list):
        fmt, turns, calls, tools = "hermes", *_parse_hermes(obj["conversations"])
    elif isinstance(obj.get("messages"), list):
        fmt, turns, calls, tools = "openai", *_parse_openai(obj["messages"], obj.get("tools"))
    elif "conversations" in obj or "messages" in obj:
        raise BadLine("wrong_type", "conversations/messages must be a list")
    else:
        raise BadLine("unknown_format", "neither 'conversations' (hermes/ShareGPT) nor 'messages' (OpenAI chat)")
    if not turns:
        raise BadLine("invalid_value", "the conversation has no messages")
    reward = obj.get("reward")
    if reward is not None and not -1.0 <= float(reward) <= 1.0:
        raise BadLine("invalid_value", f"reward must be within [-1, 1], got {reward}")
    is_synthetic = bool(obj.get("is_synthetic", False))
    tool_names = [t["function"]["name"] for t in tools]
    assistant_texts = [t["content"] for t in turns if t["role"] == "assistant"]
    return {
        "trajectory_id": obj.get("trajectory_id") or _content_id(turns, calls),
        "session_id": obj.get("session_id"),
        "user_id": obj.get("user_id"),
        "tenant_id": obj.get("tenant_id") or "default",
        "model_version": obj.get("model_version") or obj.get("model") or "unknown",
        "task_type": obj.get("task_type") or "unknown",
        "origin": obj.get("origin") or ("synthetic" if is_synthetic else "usage"),
        "is_synthetic": is_synthetic,
        "reward": float(reward) if reward is not None else None,
        "created_at": parse_timestamp(obj.get("created_at") or obj.get("timestamp"), ingested_at),
        "source_format": fmt,
        "system_prompt": next((t["content"] for t in turns if t["role"] == "system"), None),
        "user_prompt": next((t["content"] for t in turns if t["role"] == "user"), None),
        "turns": turns,
        "tool_calls": calls,
        "tools_offered": tool_names,
        "tools_json": json.dumps(tools, sort_keys=True),
        "final_response": assistant_texts[-1] if assistant_texts else "",
        "completed": bool(obj.get("completed", True)),
        "n_turns": len(turns),
        "n_tool_calls": len(calls),
        "ingested_at": ingested_at,
    }


def _parse_hermes(conversations: list) -> tuple[list[dict], list[dict], list[dict]]:
    turns: list[dict] = []
    calls: list[dict] = []
    tools: list[dict] = []
    pending: list[dict] = []  # calls waiting for their tool response, in order
    for position, message in enumerate(conversations):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise BadLine("wrong_type", f"conversations[{position}] must be an object with a string 'value'")
        role = _ROLES.get(str(message.get("from", "")).lower())
        if role is None:
            raise BadLine("invalid_value", f"conversations[{position}] has unknown role {message.get('from')!r}")
        text = message["value"]
        if role == "system":
            # hermes prompts mention "<tools></tools>" before the real block: use the last block that parses
            for block in reversed(_TOOLS.findall(text)):
                if tools := _tool_schemas(block):
                    break
            text = _TOOLS.sub("", text)
        elif role == "assistant":
            for body in _TOOL_CALL.findall(text):
                call = _hermes_call(len(turns), body)
                calls.append(call)
                pending.append(call)
            text = _TOOL_CALL.sub("", text)
        elif role == "tool":
            responses = _TOOL_RESPONSE.findall(text) or [text]
            for body in responses:
                if pending:
                    _attach_result(pending.pop(0), _response_content(body))
            text = "\n".join(_response_content(b) for b in responses)
        turns.append({"role": role, "content": text.strip()})
    return turns, calls, tools


def _parse_openai(messages: list, tools: Any) -> tuple[list[dict], list[dict], list[dict]]:
    if tools is not None and not isinstance(tools, list):
        raise BadLine("wrong_type", "tools must be a list of function schemas")
    turns: list[dict] = []
    calls: list[dict] = []
    by_id: dict[str, dict] = {}
    pending: list[dict] = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadLine("wrong_type", f"messages[{position}] must be an object")
        role = _ROLES.get(str(message.get("role", "")).lower())
        if role is None:
            raise BadLine("invalid_value", f"messages[{position}] has unknown role {message.get('role')!r}")
        text = _content_text(message.get("content"), position)
        if role == "assistant":
            for raw_call in message.get("tool_calls") or []:
                function = raw_call.get("function", {}) if isinstance(raw_call, dict) else {}
                call = _tool_call(len(turns), function.get("name"), function.get("arguments"))
                calls.append(call)
                pending.append(call)
                if isinstance(raw_call, dict) and raw_call.get("id"):
                    by_id[raw_call["id"]] = call
        elif role == "tool":
            call = by_id.get(message.get("tool_call_id")) if message.get("tool_call_id") else None
            call = call if call is not None and call in pending else (pending[0] if pending else None)
            if call is not None:
                pending.remove(call)
                _attach_result(call, text)
        turns.append({"role": role, "content": text.strip()})
    return turns, calls, [t for t in (tools or []) if _is_function_schema(t)]


def _hermes_call(turn_index: int, body: str) -> dict:
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        found = _NAME.search(body)
        return _tool_call(turn_index, found.group(1) if found else None, None, unparsed=body.strip())
    if not isinstance(parsed, dict):
        return _tool_call(turn_index, None, None, unparsed=body.strip())
    return _tool_call(turn_index, parsed.get("name"), parsed.get("arguments", parsed.get("parameters")))


def _tool_call(turn_index: int, name: Any, arguments: Any, unparsed: str | None = None) -> dict:
    """arguments may be a dict (hermes) or a JSON string (OpenAI); both are stored as text."""
    if isinstance(arguments, str):
        try:
            valid = isinstance(json.loads(arguments), dict)
        except json.JSONDecodeError:
            valid = False
        text = arguments
    elif isinstance(arguments, dict):
        valid, text = True, json.dumps(arguments, sort_keys=True)
    else:
        valid, text = False, unparsed if unparsed is not None else json.dumps(arguments)
    named = isinstance(name, str) and bool(name)
    return {"turn_index": turn_index, "name": name if named else None, "arguments": text,
            "arguments_valid": valid and named, "result": None, "success": False}


def _attach_result(call: dict, result: str) -> None:
    call["result"] = result
    call["success"] = not _is_error(result)


def _is_error(result: str) -> bool:
    try:
        parsed = json.loads(result)
    except (json.JSONDecodeError, TypeError):
        return bool(_ERROR_TEXT.match(result or ""))
    return isinstance(parsed, dict) and parsed.get("error") not in (None, "", False)


def _response_content(body: str) -> str:
    """hermes tool responses wrap the result as {"name": ..., "content": ...}."""
    body = body.strip()
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        return body
    if isinstance(parsed, dict) and "content" in parsed:
        content = parsed["content"]
        return content if isinstance(content, str) else json.dumps(content, sort_keys=True)
    return body


def _tool_schemas(text: str) -> list[dict]:
    try:
        declared = json.loads(text)
    except json.JSONDecodeError:
        return []
    declared = declared if isinstance(declared, list) else [declared]
    schemas = []
    for item in declared:
        if _is_function_schema(item):
            schemas.append(item)
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            schemas.append({"type": "function", "function": item})
    return schemas


def _is_function_schema(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("function"), dict) and isinstance(item["function"].get("name"), str)


def _content_text(content: Any, position: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise BadLine("wrong_type", f"messages[{position}].content must be a string or a list of parts")


def parse_timestamp(value: str | None, default: datetime, name: str = "created_at") -> datetime:
    if value is None:
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        parsed = parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)
    except ValueError as error:
        raise BadLine("invalid_value", f"{name} is not an ISO-8601 timestamp: {value!r}") from error
    except OverflowError:  # year 1 or 9999 moved past the calendar by its offset
        raise BadLine("invalid_value", f"{name} {value} is outside {TS_RANGE}") from None
    if problem := check_timestamp(parsed, name):
        raise BadLine("invalid_value", problem)
    return parsed


def _content_id(turns: list[dict], calls: list[dict]) -> str:
    canonical = json.dumps([turns, [(c["name"], c["arguments"]) for c in calls]], sort_keys=True)
    return hashlib.md5(canonical.encode()).hexdigest()


def _type_name(expected: Any) -> str:
    if expected is str:
        return "a string"
    if expected is bool:
        return "a boolean"
    return "a number"


def to_arrow(rows: list[dict]) -> pa.Table:
    schema = TRAJECTORIES.schema
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)
