"""The output layer at loss positions only gives the loss, DPO term and gradients of full logits."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from flywheel_assets.lib.config import LoraConfigModel
from flywheel_assets.lib.training.chat_format import IGNORE
from flywheel_assets.lib.training.examples import Example, collate, label_logprobs, weighted_nll
from flywheel_assets.lib.training.trainer import attach_lora, dpo_loss, forward_logprobs

VOCAB, PAD = 50, 0
CHECKED = ("q_proj.lora_A", "down_proj.lora_B", "embed_tokens.lora_embedding_A", "lm_head.lora_A", "lm_head.lora_B")


def small_model(peft: bool):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=PAD))
    if not peft:
        return model
    model = attach_lora(model, LoraConfigModel(rank=8, alpha=16))
    with torch.no_grad():  # B starts at zero, which would leave every A's gradient zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.normal_(0, 0.1)
    return model


def examples(n: int, seed: int) -> list[Example]:
    """Prompt tokens without loss, then an answer with loss; a tool turn without loss in some."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, answer = rng.randint(2, 9), rng.randint(1, 9)
        ids = [rng.randrange(1, VOCAB) for _ in range(prompt + answer)]
        labels = [IGNORE] * prompt + ids[prompt:]
        if rng.random() < 0.5:
            tool = [rng.randrange(1, VOCAB) for _ in range(3)]
            ids, labels = ids + tool + ids[:2], labels + [IGNORE] * 3 + ids[:2]
        rows.append(Example(ids, labels, rng.choice([0.3, 1.0, 2.0, 5.0])))
    return rows


def full_logits_logprobs(model, batch) -> torch.Tensor:
    """The straightforward reference: logits at every position, log p of each next label, 0 where none."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    picked = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
    return picked.squeeze(-1) * (targets != IGNORE)


def reference_nll(model, batch) -> torch.Tensor:
    picked = full_logits_logprobs(model, batch)
    tokens = (batch["labels"][:, 1:] != IGNORE).sum(dim=1)
    return (batch["weights"] * -picked.sum(dim=1)).sum() / (batch["weights"] * tokens).sum()


def reference_dpo(model, chosen, rejected, beta: float) -> torch.Tensor:
    """The former implementation: chosen and rejected batched apart, full logits."""
    def sums(rows):
        return full_logits_logprobs(model, collate(rows, PAD)).sum(dim=1)

    policy_c, policy_r = sums(chosen), sums(rejected)
    with torch.no_grad(), model.disable_adapter():
        reference_c, reference_r = sums(chosen), sums(rejected)
    return -F.logsigmoid(beta * ((policy_c - reference_c) - (policy_r - reference_r))).mean()


def gradients(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def checked(grads: dict[str, torch.Tensor], peft: bool) -> dict[str, torch.Tensor]:
    if not peft:
        return grads
    picked = {name: g for name, g in grads.items() if any(part in name for part in CHECKED)}
    assert {part for part in CHECKED if any(part in name for name in picked)} == set(CHECKED)
    return picked


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "plain"])
def test_weighted_loss_and_gradients_match_full_logits(peft):
    model = small_model(peft)
    batch = collate(examples(8, seed=1), PAD)
    assert (batch["attention_mask"] == 0).any()  # padding is part of the case
    logprobs, rows = forward_logprobs(model, batch)
    assert len(logprobs) == int((batch["labels"][:, 1:] != IGNORE).sum())
    loss = weighted_nll(logprobs, rows, batch["weights"])
    expected = reference_nll(model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    ours, reference = checked(gradients(model, loss), peft), checked(gradients(model, expected), peft)
    assert ours.keys() == reference.keys() and ours
    for name, grad in reference.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the tier weights still matter: equal weights give another loss
    unweighted = weighted_nll(logprobs, rows, torch.ones_like(batch["weights"]))
    assert abs(unweighted.item() - loss.item()) > 1e-3


def test_dpo_loss_and_gradients_match_full_logits():
    model = small_model(peft=True)
    chosen, rejected = examples(4, seed=2), examples(4, seed=3)
    loss, tokens = dpo_loss(model, chosen, rejected, PAD, "cpu", beta=0.5)
    expected = reference_dpo(model, chosen, rejected, beta=0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - F.logsigmoid(torch.tensor(0.0)).neg().item()) > 1e-3  # the adapter moved it off log 2
    assert tokens == 2 * sum(len(e.input_ids) for e in chosen + rejected)
    ours, reference = checked(gradients(model, loss), True), checked(gradients(model, expected), True)
    for name, grad in reference.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_that_rescales_its_logits_keeps_its_own_forward():
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        head_dim=8, intermediate_size=64, max_position_embeddings=64, pad_token_id=PAD,
        final_logit_softcapping=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits well beyond the cap, where tanh bends them
    batch = collate(examples(6, seed=4), PAD)
    loss = weighted_nll(*forward_logprobs(model, batch), batch["weights"])
    assert loss.item() == pytest.approx(reference_nll(model, batch).item(), rel=1e-5)
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    bare_head = weighted_nll(*label_logprobs(hidden, model.lm_head, batch["labels"]), batch["weights"])
    assert abs(bare_head.item() - loss.item()) > 1e-2  # softcapping changes the loss: skipping it would be wrong
