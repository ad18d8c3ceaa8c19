"""Conversations → padded tensors with an assistant-only loss mask and per-example weights."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from flywheel_assets.lib.training.chat_format import IGNORE, segments


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    weight: float = 1.0


def encode(tokenizer, messages: list[dict] | str, weight: float = 1.0, max_length: int = 128) -> Example | None:
    """None when the conversation has no assistant token to learn from."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments(messages):
        ids = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if segment.trained else [IGNORE] * len(ids)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return Example(input_ids, labels, weight)


def collate(batch: list[Example], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded batch; the shift for next-token prediction happens in the loss."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    weights = torch.tensor([e.weight for e in batch], dtype=torch.float32)
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights}.items()}


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each next label token, mask of tokens that carry loss), both [batch, len-1]."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def weighted_nll(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i Σ_t −log p_it / Σ_i w_i n_i: a platinum token counts 5× a silver one."""
    picked, mask = token_logprobs(logits, labels)
    per_example = -picked.sum(dim=1)
    tokens = mask.sum(dim=1).float()
    return (weights * per_example).sum() / (weights * tokens).sum().clamp(min=1.0)
