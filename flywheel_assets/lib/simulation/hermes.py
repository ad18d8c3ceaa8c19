"""OpenAI chat messages written as hermes conversations: the golden file's system prompt (the tools
inside <tools>), <tool_call> and <tool_response> tags. lib/ingest/trajectories.py reads them back."""

from __future__ import annotations

import json

from flywheel_assets.lib.simulation.tools import TOOLS

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about "
    "what values to plug into functions. Here are the available tools: <tools>" + json.dumps(TOOLS) + "</tools> "
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags as follows:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-dict>}\n</tool_call>")


def _hermes_content(result: str):
    """A tool result inside a hermes <tool_response>: JSON objects embedded as objects, as golden data does."""
    try:
        parsed = json.loads(result)
    except (json.JSONDecodeError, TypeError):
        return result
    return parsed if isinstance(parsed, dict) else result


def _hermes_call(name: str, arguments) -> str:
    """One <tool_call> block; arguments that are not a JSON object stay as the text they were."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n</tool_call>'
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def to_hermes(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages as hermes conversations (the golden file's system prompt and tags)."""
    turns, names = [{"from": "system", "value": HERMES_SYSTEM}], {}
    for message in messages:
        role = message.get("role")
        if role == "user":
            turns.append({"from": "human", "value": message.get("content") or ""})
        elif role == "assistant":
            parts = [message["content"]] if message.get("content") else []
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                names[call.get("id")] = function.get("name")
                parts.append(_hermes_call(function.get("name"), function.get("arguments")))
            turns.append({"from": "gpt", "value": "\n".join(parts)})
        elif role == "tool":
            name = message.get("name") or names.get(message.get("tool_call_id"))
            body = json.dumps({"name": name, "content": _hermes_content(message.get("content"))})
            turns.append({"from": "tool", "value": f"<tool_response>\n{body}\n</tool_response>"})
    return turns
