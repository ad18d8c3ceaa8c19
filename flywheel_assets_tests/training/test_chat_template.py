"""Conversations through the model's own chat template, with the loss mask derived from the rendering,
on three templates: the embedded one, SmolLM2's ChatML (renders no tools), and one that renders tools."""

from __future__ import annotations

import json

import pytest

from flywheel_assets.lib.training.chat_format import IGNORE, segments
from flywheel_assets.lib.training.chat_template import (
    EMBEDDED_CHAT_TEMPLATE, TemplateError, encode_conversation, prepare, prompt_ids,
)
from flywheel_assets.lib.training.examples import encode, encode_all
from flywheel_assets.lib.training.tokenizer import train_tokenizer

TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "evaluate arithmetic",
                                           "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 663 + 859?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "663 + 859"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "1522"},
    {"role": "assistant", "content": "663 + 859 = 1522."},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "3044."},
]

# SmolLM2-135M-Instruct's template (ChatML; it ignores tools=)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# a template that renders tools and tool calls itself (the shape of Qwen2.5's)
NATIVE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0].content if messages[0].role == 'system' else 'Be helpful.' }}"
    "\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'system' %}"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}\n<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [json.dumps(CONVERSATION), json.dumps(TOOLS), "You are a helpful AI assistant named SmolLM trained by Hugging Face",
              "You may call one or more functions to assist with the user query tool_call tool_response name arguments"]
    return train_tokenizer(corpus, vocab_size=2000)


def with_template(tokenizer, template: str):
    """A copy of the tokenizer with ChatML's special tokens and another template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    copy = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()),
                                   pad_token=tokenizer.pad_token, unk_token=tokenizer.unk_token)
    copy.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    copy.chat_template = template
    return copy


def learnt(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE])


def test_the_embedded_template_gives_the_tokens_and_mask_the_embedded_model_always_had(tokenizer):
    assert tokenizer.chat_template == EMBEDDED_CHAT_TEMPLATE
    ids, labels = encode_conversation(tokenizer, CONVERSATION, TOOLS)
    expected_ids, expected_labels = [], []
    for segment in segments(CONVERSATION):
        piece = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        expected_ids += piece
        expected_labels += piece if segment.trained else [IGNORE] * len(piece)
    assert (ids, labels) == (expected_ids, expected_labels)
    taught = learnt(tokenizer, ids, labels)
    assert taught.count("<|end|>") == 2 and "calculator" in taught and "3044" in taught
    assert "What" not in taught and "doubled" not in taught and "careful" not in taught
    assert prompt_ids(tokenizer, CONVERSATION[:2]) == tokenizer("<|user|> What is 663 + 859? <|assistant|>",
                                                                add_special_tokens=False)["input_ids"]


def test_a_chatml_template_without_tools_gets_the_hermes_convention(tokenizer):
    chatml = with_template(tokenizer, CHATML)
    ids, labels = encode_conversation(chatml, CONVERSATION, TOOLS)
    messages, tools = prepare(chatml, CONVERSATION, TOOLS)
    text = chatml.apply_chat_template(messages, tools=tools, tokenize=False)
    assert tools is None and "<tools>" in text and "calculator" in text.split("<|im_end|>")[0]  # in the system prompt
    assert "You are a careful assistant" in text and "<tool_response>" in text
    taught = learnt(chatml, ids, labels)
    # exactly the three assistant turns (each ending in <|im_end|>), nothing of the prompt or the tool
    assert taught.count("<|im_end|>") == 3 and taught.count("<tool_call>") == 1
    assert "1522" in taught and "3044" in taught and "doubled" not in taught and "careful" not in taught
    assert "<tool_response>" not in taught and "<|im_start|>" not in taught
    assert chatml.decode(prompt_ids(chatml, CONVERSATION[:2], TOOLS)).endswith("<|im_start|> assistant")


def test_a_template_that_renders_tools_gets_them_itself(tokenizer):
    native = with_template(tokenizer, NATIVE)
    ids, labels = encode_conversation(native, CONVERSATION, TOOLS)
    messages, tools = prepare(native, CONVERSATION, TOOLS)
    text = native.apply_chat_template(messages, tools=tools, tokenize=False)
    assert "# Tools" in text and "You may call one or more functions" not in text  # no Hermes block added
    taught = learnt(native, ids, labels)
    assert taught.count("<|im_end|>") == 3 and "calculator" in taught and "663 + 859" in taught
    assert "<tool_response>" not in taught and "doubled" not in taught


def test_overlong_conversations_are_skipped_and_counted_never_cut(tokenizer):
    ids, _ = encode_conversation(tokenizer, CONVERSATION)
    examples, skipped = encode_all(tokenizer, [(CONVERSATION, 1.0, None), (CONVERSATION[:2], 1.0, None),
                                               (CONVERSATION, 2.0, None)], max_length=len(ids) - 1)
    assert examples == [None, None, None] and skipped == {"too_long": 2, "no_assistant_tokens": 1}
    [whole] = [e for e in encode_all(tokenizer, [(CONVERSATION, 2.0, None)], max_length=len(ids))[0] if e]
    assert len(whole.input_ids) == len(ids) and whole.weight == 2.0


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # the last user turn is marked differently from the others: the mask cannot come from the rendering
    odd = with_template(tokenizer, "{% for m in messages %}{{ ('LAST ' if loop.last else '') + m.role + ' ' + "
                                   "(m.content or '') + ' ' }}{% endfor %}")
    with pytest.raises(TemplateError, match="changes the rendering"):
        encode(odd, CONVERSATION[1:])
