"""The embedded model's conversation format, and reading its output back.

chat_template.EMBEDDED_CHAT_TEMPLATE writes this format through apply_chat_template, the
path every model takes; `segments` is its reference (a test holds the two equal).

    <|user|> What is 663 + 859? <|assistant|> <tool_call> calculator {"expression": "663 + 859"} </tool_call>
    <|tool|> 1522 <|assistant|> 663 + 859 = 1522. <|end|>

The system prompt is left out: the embedded model serves one fixed tool set, and
every token it spends on a constant prompt is one it cannot spend on the task.
Only assistant tokens (tool calls, answers and <|end|>) carry loss.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# a Hermes tool call in a model's text, closed or cut off by the token limit
CALL_BLOCK = re.compile(r"<tool_call>.*?(</tool_call>|$)", re.DOTALL)

USER, ASSISTANT, TOOL, END = "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PAD, UNK = "[PAD]", "[UNK]"
SPECIAL_TOKENS = [PAD, UNK, USER, ASSISTANT, TOOL, END, CALL_OPEN, CALL_CLOSE]
IGNORE = -100

_QUOTE_SPACES = re.compile(r'\s*"\s*')
_SPACES = re.compile(r"\s+")
_DECIMAL = re.compile(r"(?<=\d) \. (?=\d)")
_NEGATIVE = re.compile(r"(?<=[:\[,]) ?- (?=\d)")


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


def segments(messages: list[dict]) -> list[Segment]:
    """Prompt and assistant pieces in order; system messages are dropped."""
    parts: list[Segment] = []
    for message in messages:
        role = message["role"]
        if role == "user":
            parts.append(Segment(f"{USER} {message.get('content') or ''} {ASSISTANT}", False))
        elif role == "assistant":
            calls = message.get("tool_calls") or []
            if calls:
                rendered = " ".join(render_call(c["function"]["name"], c["function"]["arguments"]) for c in calls)
                parts.append(Segment(rendered, True))
            elif message.get("content"):
                parts.append(Segment(f"{message['content']} {END}", True))
        elif role == "tool":
            parts.append(Segment(f"{TOOL} {message.get('content') or ''} {ASSISTANT}", False))
    return parts


def render_call(name: str, arguments: str | dict) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, sort_keys=True)
    return f"{CALL_OPEN} {name} {text} {CALL_CLOSE}"


def tool_text(result: str) -> str:
    return f" {TOOL} {result} {ASSISTANT}"


def parse_call(generated: str) -> tuple[str | None, dict | None]:
    """(tool name, arguments) from decoded model output `name {json}`; None parts when unparseable.

    Decoding puts spaces between tokens (`{" city ": " Lima "}`): spaces next to a
    quote are never part of a value here, so they are removed before parsing.
    """
    body = generated.replace(CALL_OPEN, " ").replace(CALL_CLOSE, " ").strip()
    if not body:
        return None, None
    name, _, rest = body.partition(" ")
    rest = _NEGATIVE.sub("-", _DECIMAL.sub(".", _QUOTE_SPACES.sub('"', rest.strip())))
    try:
        arguments = json.loads(rest)
    except json.JSONDecodeError:
        return name, None
    return name, arguments if isinstance(arguments, dict) else None


def clean_answer(generated: str) -> str:
    return _SPACES.sub(" ", generated.replace(END, " ")).strip()
