"""Conversations become tokens through the model's own chat template, for every model.

`tokenizer.apply_chat_template` renders the conversation (tools passed where the template
renders them); the assistant-only loss mask is derived from the rendering itself: the
tokens an assistant message adds are those of the conversation up to and including it,
past those of the conversation before it with the generation prompt. So the mask follows
whatever the template writes around a turn (ChatML's `<|im_start|>assistant\n` is prompt,
its `<|im_end|>` is learnt: the model learns to stop).

Where a template renders no tools, or no tool calls (SmolLM2's ChatML ignores `tools=`),
the Hermes convention is written into the messages instead: a `<tools>[…]</tools>` block
in the system prompt, each call as `<tool_call>{"name", "arguments"}</tool_call>` in the
assistant's text, each result as `<tool_response>…</tool_response>`.

The embedded model's tokenizer carries EMBEDDED_CHAT_TEMPLATE, which writes the format it
was always trained on (chat_format.py), so one path serves both: for it, the tokens and
the mask are exactly those of chat_format.segments.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from flywheel_assets.lib.training.chat_format import (
    ASSISTANT, CALL_CLOSE, CALL_OPEN, END, IGNORE, TOOL, USER,
)

# System messages are left out (the embedded model serves one fixed tool set); arguments are
# rendered as sorted JSON, as render_call does; spacing is free (the tokenizer splits on it).
EMBEDDED_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}" + USER + " {{ message.content or '' }} " + ASSISTANT + " "
    "{%- elif message.role == 'tool' -%}" + TOOL + " {{ message.content or '' }} " + ASSISTANT + " "
    "{%- elif message.role == 'assistant' -%}"
    "{%- if message.tool_calls -%}{%- for call in message.tool_calls -%}"
    + CALL_OPEN + " {{ call.function.name }} "
    "{%- if call.function.arguments is mapping %} {{ call.function.arguments | tojson(sort_keys=true) }}"
    "{%- else %} {{ call.function.arguments }}{%- endif %} " + CALL_CLOSE + " "
    "{%- endfor -%}"
    "{%- elif message.content -%}{{ message.content }} " + END + " "
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

HERMES_SYSTEM = (
    "You may call one or more functions to assist with the user query. The functions are given "
    "inside <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\nFor each function call, return a JSON "
    "object with the function name and arguments inside <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


class TemplateError(ValueError):
    """The template cannot be used to derive a loss mask (a turn changes what came before it)."""


def ensure_template(tokenizer) -> None:
    """Give the embedded tokenizer its template (a base saved before templates existed has none);
    any other tokenizer must bring its own."""
    if tokenizer.chat_template:
        return
    if USER in tokenizer.get_vocab():
        tokenizer.chat_template = EMBEDDED_CHAT_TEMPLATE
        return
    raise TemplateError("the tokenizer has no chat template: use a model with one (an -Instruct model), "
                        "or set tokenizer.chat_template in the saved base model")


def _render(tokenizer, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=generation_prompt)


@lru_cache(maxsize=32)
def _capabilities(template: str) -> tuple[bool, bool]:
    """(renders tools, renders assistant tool_calls) of a template, by rendering a probe."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    probe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, unk_token="x")))
    probe.chat_template = template
    tool = {"type": "function", "function": {"name": "zq_probe_tool", "description": "", "parameters":
                                             {"type": "object", "properties": {}}}}
    call = {"id": "c1", "type": "function", "function": {"name": "zq_probe_call", "arguments": {}}}
    user = {"role": "user", "content": "hi"}
    try:
        tools_shown = "zq_probe_tool" in _render(probe, [user], [tool], False)
    except Exception:  # a template that refuses tools= renders none
        tools_shown = False
    try:
        calls_shown = "zq_probe_call" in _render(
            probe, [user, {"role": "assistant", "content": "", "tool_calls": [call]}], None, False)
    except Exception:
        calls_shown = False
    return tools_shown, calls_shown


def prepare(tokenizer, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
    """The messages and tools to render: arguments as objects, and the Hermes convention written in
    where the template does not render tools or tool calls itself."""
    ensure_template(tokenizer)
    tools_shown, calls_shown = _capabilities(tokenizer.chat_template)
    messages = [_arguments_as_objects(m) for m in messages]
    if tools and not tools_shown:
        messages = _with_tools_in_system(messages, tools)
        tools = None
    if not calls_shown:
        messages = [_calls_as_text(m) for m in messages]
    return messages, (tools if tools_shown else None)


def encode_conversation(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels hold the ids of the tokens assistant messages add, IGNORE elsewhere."""
    messages, tools = prepare(tokenizer, messages, tools)
    full = _ids(tokenizer, _render(tokenizer, messages, tools, False))
    labels = [IGNORE] * len(full)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _ids(tokenizer, _render(tokenizer, messages[:index], tools, True)) if index else []
        through = _ids(tokenizer, _render(tokenizer, messages[:index + 1], tools, False))
        if full[:len(before)] != before or full[:len(through)] != through:
            raise TemplateError(f"message {index} changes the rendering of the turns before it: "
                                "the loss mask cannot be derived from this template")
        labels[len(before):len(through)] = full[len(before):len(through)]
    return full, labels


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The tokens a model continues from to write the next assistant message."""
    messages, tools = prepare(tokenizer, messages, tools)
    return _ids(tokenizer, _render(tokenizer, messages, tools, True))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _arguments_as_objects(message: dict) -> dict:
    calls = message.get("tool_calls")
    if not calls:
        return dict(message)
    parsed = []
    for call in calls:
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                value = json.loads(arguments)
                function["arguments"] = value if isinstance(value, dict) else arguments
            except json.JSONDecodeError:
                pass
        parsed.append({**call, "function": function})
    return {**message, "tool_calls": parsed}


def _with_tools_in_system(messages: list[dict], tools: list[dict]) -> list[dict]:
    block = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{block}".strip()}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def _calls_as_text(message: dict) -> dict:
    if message["role"] == "tool":
        return {"role": "tool", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
    if message["role"] != "assistant" or not message.get("tool_calls"):
        return message
    calls = "\n".join(
        f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': c['function'].get('arguments')}, ensure_ascii=False)}\n</tool_call>"
        for c in message["tool_calls"])
    text = f"{message.get('content') or ''}\n{calls}".strip()
    return {"role": "assistant", "content": text}


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> list[dict]:
    """The Hermes `<tool_call>{"name", "arguments"}</tool_call>` blocks of a generated text, as OpenAI
    tool calls ({"type": "function", "function": {"name", "arguments" (a JSON string)}}); a block that
    is not such an object is left out."""
    calls = []
    for body in _HERMES_CALL.findall(text):
        try:
            parsed = json.loads(body)
        except json.JSONDecodeError:
            continue
        if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
            continue
        arguments = parsed.get("arguments", parsed.get("parameters", {}))
        calls.append({"type": "function", "function": {
            "name": parsed["name"],
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)}})
    return calls
