"""Conversations → padded tensors with an assistant-only loss mask and per-example weights."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flywheel_assets.lib.training.chat_format import IGNORE
from flywheel_assets.lib.training.chat_template import encode_conversation


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    weight: float = 1.0


class TooLong(ValueError):
    """The rendered conversation is longer than the model may take: it is skipped (and counted), never cut."""


def encode(tokenizer, messages: list[dict] | str, weight: float = 1.0, max_length: int = 128,
           tools: list[dict] | str | None = None) -> Example | None:
    """The conversation through the model's chat template (chat_template.encode_conversation); None when
    it has no assistant token to learn from; TooLong when it has more than max_length tokens."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    if isinstance(tools, str):
        tools = json.loads(tools) or None
    input_ids, labels = encode_conversation(tokenizer, messages, tools)
    if all(label == IGNORE for label in labels):
        return None
    if len(input_ids) > max_length:
        raise TooLong(f"{len(input_ids)} tokens, over the maximum length {max_length}")
    return Example(input_ids, labels, weight)


def encode_all(tokenizer, conversations, max_length: int) -> tuple[list[Example | None], Counter]:
    """encode() over (messages, weight, tools) items: the examples (None where skipped, in order) and
    the skipped counted by reason (too_long, no_assistant_tokens)."""
    examples: list[Example | None] = []
    skipped: Counter = Counter()
    for messages, weight, tools in conversations:
        try:
            example = encode(tokenizer, messages, weight, max_length, tools)
        except TooLong:
            example = None
            skipped["too_long"] += 1
        else:
            if example is None:
                skipped["no_assistant_tokens"] += 1
        examples.append(example)
    return examples, skipped


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


def label_logprobs(hidden: torch.Tensor, output_layer: Callable[[torch.Tensor], torch.Tensor],
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each next label token that carries loss, the batch row it belongs to), both [n].

    `hidden` is the decoder's last hidden state [batch, len, dim]; position t predicts label
    t+1. The output layer runs at those n positions only, not at every position: assistant
    tokens are a fraction of a padded batch, and at the embedded size the vocabulary
    projection (with its LoRA) is the largest matmul of the step."""
    targets = labels[:, 1:]
    carries = targets != IGNORE
    logits = output_layer(hidden[:, :-1][carries])
    logprobs = -F.cross_entropy(logits.float(), targets[carries], reduction="none")
    return logprobs, carries.nonzero()[:, 0]


def weighted_nll(logprobs: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i Σ_t −log p_it / Σ_i w_i n_i: a platinum token counts 5× a silver one."""
    token_weights = weights[rows]
    return -(token_weights * logprobs).sum() / token_weights.sum().clamp(min=1.0)


def sequence_logprobs(logprobs: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Σ_t log p_it per example [batch_size]: a trajectory's log-likelihood under the model."""
    return logprobs.new_zeros(batch_size).index_add(0, rows, logprobs)
