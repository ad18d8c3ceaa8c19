"""Training on the embedded model: the loss mask, tier weights, adapter round trip, the gate."""

from __future__ import annotations

import random

import pytest
import torch

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.evaluation.offline import evaluate_versions
from flywheel_assets.lib.simulation.tasks import COLD_START_PHRASINGS, expert_messages, generate_tasks
from flywheel_assets.lib.training.chat_format import IGNORE, parse_call
from flywheel_assets.lib.training.examples import collate, encode, label_logprobs, weighted_nll
from flywheel_assets.lib.training.pipeline import load_for_inference, preference_pairs, train_base
from flywheel_assets.lib.training.trainer import attach_lora, train_lora

CALC = [
    {"role": "system", "content": "You are a function calling AI model."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2 + 2"}'}}]},
    {"role": "tool", "tool_call_id": "c0", "content": "4"},
    {"role": "assistant", "content": "2 + 2 = 4."},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small base trained for real on cold-start phrasings (~20 s on 2 cores)."""
    config = FlywheelConfig(home=tmp_path_factory.mktemp("home"))
    config.base_model = config.base_model.model_copy(update={"hidden_size": 96, "layers": 3, "pretrain_steps": 220})
    rng = random.Random(0)
    messages = [expert_messages(t, rng) for t in generate_tasks(600, seed=3, phrasings=range(COLD_START_PHRASINGS))]
    out = config.models / "base"
    card = train_base(config, messages, out)
    return config, out, card


def test_loss_mask_covers_assistant_tokens_only(tiny):
    _, base_dir, _ = tiny
    _, tokenizer = load_for_inference(base_dir)
    example = encode(tokenizer, CALC)
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    trained = [t for t, label in zip(tokens, example.labels) if label != IGNORE]
    ignored = [t for t, label in zip(tokens, example.labels) if label == IGNORE]
    assert trained == ["<tool_call>", "calculator", '{"', "expression", '":', '"', "2", "+", "2", '"}',
                       "</tool_call>", "2", "+", "2", "=", "4", ".", "<|end|>"]
    assert ignored == ["<|user|>", "What", "is", "2", "+", "2", "?", "<|assistant|>", "<|tool|>", "4", "<|assistant|>"]
    assert "system" not in " ".join(tokens)  # the constant system prompt is not fed to the embedded model
    assert parse_call(tokenizer.decode(example.input_ids[8:19])) == ("calculator", {"expression": "2 + 2"})


def test_tier_weights_reach_the_loss():
    torch.manual_seed(0)
    vocab = 7
    logits = torch.randn(2, 4, vocab)
    labels = torch.tensor([[IGNORE, 1, 2, IGNORE], [IGNORE, 3, IGNORE, IGNORE]])
    logprobs = torch.log_softmax(logits, dim=-1)
    nll_a = -(logprobs[0, 0, 1] + logprobs[0, 1, 2])  # position t predicts label t+1
    nll_b = -logprobs[1, 0, 3]
    weights = torch.tensor([5.0, 0.3])
    expected = (5.0 * nll_a + 0.3 * nll_b) / (5.0 * 2 + 0.3 * 1)
    picked, rows = label_logprobs(logits, torch.nn.Identity(), labels)  # the logits stand in for hidden states
    assert rows.tolist() == [0, 0, 1]
    assert weighted_nll(picked, rows, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    # the same batch with equal weights is a plain token mean: the weights changed the loss
    assert weighted_nll(picked, rows, torch.ones(2)).item() == pytest.approx(((nll_a + nll_b) / 3).item(), rel=1e-6)


def test_dataset_weights_travel_into_the_batch(tiny):
    _, base_dir, _ = tiny
    _, tokenizer = load_for_inference(base_dir)
    batch = collate([encode(tokenizer, CALC, 5.0), encode(tokenizer, CALC, 2.0)], tokenizer.pad_token_id)
    assert batch["weights"].tolist() == [5.0, 2.0]


def test_preference_pairs_match_a_retried_trajectory_with_the_accepted_one():
    rows = [
        {"trajectory_id": "a", "session_id": "s1", "tier": "gold", "combined_score": 0.7},
        {"trajectory_id": "b", "session_id": "s1", "tier": "bronze", "combined_score": 0.1},
        {"trajectory_id": "c", "session_id": "s2", "tier": "bronze", "combined_score": 0.1},
        {"trajectory_id": "d", "session_id": "s1", "tier": "silver", "combined_score": 0.4},
    ]
    assert [(c["trajectory_id"], r["trajectory_id"]) for c, r in preference_pairs(rows)] == [("a", "b")]


def test_adapter_save_and_load_give_identical_logits(tiny, tmp_path):
    config, base_dir, _ = tiny
    model, tokenizer = load_for_inference(base_dir)
    peft_model = attach_lora(model, config.lora)
    example = encode(tokenizer, CALC)
    settings = config.lora.model_copy(update={"steps": 3, "batch_size": 2})
    train_lora(peft_model, [example, example], [], settings, pad_id=tokenizer.pad_token_id)
    batch = collate([example], tokenizer.pad_token_id)
    with torch.no_grad():
        before = peft_model(input_ids=batch["input_ids"]).logits
        peft_model.save_pretrained(tmp_path / "adapter")
        loaded, _ = load_for_inference(base_dir, tmp_path / "adapter")
        after = loaded(input_ids=batch["input_ids"]).logits
        merged, _ = load_for_inference(base_dir, tmp_path / "adapter", merged=True)
        merged_logits = merged(input_ids=batch["input_ids"]).logits
        base_logits = load_for_inference(base_dir)[0](input_ids=batch["input_ids"]).logits
    assert torch.equal(before, after)
    assert torch.allclose(before, merged_logits, atol=1e-4)
    assert not torch.allclose(before, base_logits, atol=1e-3)  # the adapter did change the model


def test_promotion_gate_blocks_a_broken_adapter(tiny, tmp_path):
    config, base_dir, card = tiny
    config.evaluation.tasks = 150
    model, tokenizer = load_for_inference(base_dir)
    broken = attach_lora(model, config.lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in broken.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.normal_(0, 0.5)
    broken.save_pretrained(config.home / "models" / "broken")
    base = {"version": "base", "base_path": str(base_dir.relative_to(config.home)), "adapter_path": None}
    candidate = {"version": "broken", "base_path": base["base_path"], "adapter_path": "models/broken"}
    report = evaluate_versions(config, candidate, base, log=lambda _: None)
    assert report["champion"]["overall"]["success"] > 0.05  # the base really solves some tasks
    assert report["candidate"]["overall"]["success"] < report["champion"]["overall"]["success"]
    assert report["gate_passed"] is False and "worse than the champion" in report["gate_reason"]
    same = evaluate_versions(config, base, base, log=lambda _: None)
    assert same["gate_passed"] is True and same["difference"]["difference"] == 0.0
    rows = {(r["role"], r["scope"]): r for r in report["rows"]}
    assert rows[("candidate", "overall")]["n"] == rows[("champion", "overall")]["n"] == 150
    assert rows[("candidate", "overall")]["gate_passed"] is False and rows[("champion", "overall")]["gate_passed"] is None


def test_the_same_cold_start_builds_the_same_base_in_every_process(tmp_path):
    """tokenizers' WordPiece trainer numbers pieces in hash-map order (tokenizers#1794): two
    processes built different vocabularies and so different weights from the same data.
    Two fresh processes, with different Python hash seeds, must agree to the byte."""
    import json
    import os
    import subprocess
    import sys

    script = ("import sys; from pathlib import Path; from flywheel_assets_tests.helpers import train_tiny_base; "
              "train_tiny_base(Path(sys.argv[1]))")
    built = []
    for n, hash_seed in enumerate(("1", "2")):
        home = tmp_path / f"build{n}"
        subprocess.run([sys.executable, "-c", script, str(home)], check=True, timeout=300,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed})
        base = home / "models" / "base"
        built.append(((base / "tokenizer.json").read_bytes(),
                      json.loads((base / "training_card.json").read_text())["weights_sha256"]))
    assert built[0][0] == built[1][0], "the tokenizer differs between two builds"
    assert built[0][1] == built[1][1], "the weights differ between two builds"
