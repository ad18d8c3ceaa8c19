"""Training through the effective weight gives peft's outputs, loss and LoRA gradients."""

from __future__ import annotations

import torch
from peft.tuners.lora import Embedding as LoraEmbedding
from peft.tuners.lora import Linear as LoraLinear

from flywheel_assets.lib.config import LoraConfigModel
from flywheel_assets.lib.training.effective_weight import effective_weight_forward
from flywheel_assets.lib.training.examples import collate, weighted_nll
from flywheel_assets.lib.training.trainer import attach_lora, dpo_loss, forward_logprobs
from flywheel_assets_tests.training.test_label_logprobs import PAD, examples, gradients, small_model

ATOL = 1e-5


def loss_and_gradients(model, batch, pairs):
    loss = weighted_nll(*forward_logprobs(model, batch), batch["weights"])
    loss = loss + 0.3 * dpo_loss(model, *pairs, PAD, torch.device("cpu"), 0.1)[0]
    return loss.detach(), gradients(model, loss)


def test_same_loss_and_lora_gradients_as_peft():
    model = small_model(peft=True)
    rows = examples(12, seed=3)
    batch, pairs = collate(rows, PAD), (rows[:3], rows[3:6])
    expected_loss, expected = loss_and_gradients(model, batch, pairs)
    with effective_weight_forward(model) as switched:
        loss, got = loss_and_gradients(model, batch, pairs)
    # 2 layers × 7 projections, the input embeddings and the output layer
    assert switched == 16
    assert torch.allclose(loss, expected_loss, atol=ATOL)
    assert set(got) == set(expected) and all("lora_" in name for name in got)  # the frozen weights get nothing
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=ATOL, rtol=1e-4), name
    assert any(g.abs().max() > 1e-3 for g in got.values())  # a real signal was compared


def test_peft_forward_is_back_after_the_block_and_on_error():
    model = small_model(peft=True)
    lora_layers = [m for m in model.modules() if isinstance(m, (LoraLinear, LoraEmbedding))]
    try:
        with effective_weight_forward(model):
            assert all("forward" in vars(m) for m in lora_layers)
            raise RuntimeError("a failing step")
    except RuntimeError:
        pass
    assert not any("forward" in vars(m) for m in lora_layers)


def test_falls_back_to_peft_where_the_rewrite_is_not_exact():
    """With adapter dropout the adapter sees dropped-out inputs, which no single weight can
    express: the result must then be peft's own (same seed, same dropout mask)."""
    torch.manual_seed(0)
    model = attach_lora(small_model(peft=False), LoraConfigModel(rank=4, alpha=8, dropout=0.5))
    with torch.no_grad():  # a non-zero B, so that the adapter's path shows in the logits
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.normal_(0, 0.1)
    model.train()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.manual_seed(1)
    expected = model(input_ids=ids).logits
    with effective_weight_forward(model):
        torch.manual_seed(1)
        got = model(input_ids=ids).logits
        with model.disable_adapter():  # disabled adapters: the base model, as peft gives it
            base = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    with model.disable_adapter():
        assert torch.equal(base, model(input_ids=ids).logits)
