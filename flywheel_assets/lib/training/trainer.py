"""Training loops: full pretraining of the base, LoRA fine-tuning per cycle.

LoRA loss = weighted SFT on accepted trajectories (tier weights reach every token)
+ a DPO term on preference pairs: within one session, the trajectory the user
accepted is preferred over the one they asked to retry. Bronze rows that have no
partner in their session are left out: a lone negative says what not to do but not
what to do, and unlikelihood on a whole trajectory also punishes its correct steps.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from flywheel_assets.lib.config import LoraConfigModel
from flywheel_assets.lib.training.effective_weight import effective_weight_forward
from flywheel_assets.lib.training.examples import (
    Example, collate, label_logprobs, sequence_logprobs, weighted_nll,
)

Log = Callable[[dict], None]
# Architectures whose logits are `lm_head(last hidden state)` with nothing after it
BARE_OUTPUT_LAYER = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3"})


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def pretrain(model, examples: list[Example], *, steps: int, batch_size: int, learning_rate: float, pad_id: int,
             seed: int = 0, log: Log | None = None) -> TrainResult:
    """Full-parameter training with a cosine schedule (the base model's cold start)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    return _loop(model, optimizer, examples, [], steps=steps, batch_size=batch_size, pad_id=pad_id, seed=seed,
                 log=log)


def attach_lora(model, settings: LoraConfigModel):
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def train_lora(peft_model, examples: list[Example], pairs: list[tuple[Example, Example]], settings: LoraConfigModel,
               *, pad_id: int, log: Log | None = None) -> TrainResult:
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    with effective_weight_forward(peft_model):
        return _loop(peft_model, optimizer, examples, pairs, steps=settings.steps, batch_size=settings.batch_size,
                     pad_id=pad_id, seed=settings.seed, log=log, dpo_beta=settings.dpo_beta,
                     dpo_weight=settings.dpo_weight)


def _loop(model, optimizer, examples, pairs, *, steps, batch_size, pad_id, seed, log, dpo_beta=0.1, dpo_weight=0.0):
    device = next(model.parameters()).device
    rng = random.Random(seed)
    torch.manual_seed(seed)
    # linear warm-up over 20 steps, then cosine decay to zero
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    result = TrainResult()
    started = time.perf_counter()
    logged_at = 0.0
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch = collate([examples[i] for i in order[:batch_size]], pad_id, device)
        order = order[batch_size:]
        loss = weighted_nll(*forward_logprobs(model, batch), batch["weights"])
        result.tokens += int(batch["attention_mask"].sum())
        if pairs and dpo_weight:
            chosen, rejected = zip(*rng.sample(pairs, min(len(pairs), max(1, batch_size // 4))))
            dpo, tokens = dpo_loss(model, list(chosen), list(rejected), pad_id, device, dpo_beta)
            loss = loss + dpo_weight * dpo
            result.tokens += tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        result.losses.append(loss.item())
        elapsed = time.perf_counter() - started
        # every 25 steps, and at least every 30 s (a real model's step takes many seconds on a CPU)
        if log and (step % 25 == 0 or step == steps - 1 or elapsed - logged_at >= 30):
            logged_at = elapsed
            log({"step": step + 1, "steps": steps, "loss": round(result.losses[-1], 4),
                 "tokens_per_s": round(result.tokens / max(elapsed, 1e-9))})
    result.seconds = time.perf_counter() - started
    model.eval()
    return result


def forward_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`label_logprobs` of a causal LM, plain or peft (adapters on, or off under
    `disable_adapter`): the decoder runs over the batch, the output layer only where a
    label carries loss. No KV cache: nothing is generated."""
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if causal_lm.config.model_type not in BARE_OUTPUT_LAYER:
        # softcapping or a logit scale lives in the model's own forward: take its logits
        return label_logprobs(model(**inputs).logits, torch.nn.Identity(), batch["labels"])
    hidden = causal_lm.get_decoder()(**inputs).last_hidden_state
    return label_logprobs(hidden, causal_lm.get_output_embeddings(), batch["labels"])


def dpo_loss(model, chosen: list[Example], rejected: list[Example], pad_id: int, device, beta: float):
    """−log σ(β[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]); π_ref = the base (adapter off).
    Chosen and rejected share one batch: right padding leaves each row's log-probs as alone."""
    batch = collate(chosen + rejected, pad_id, device)
    policy = sequence_logprobs(*forward_logprobs(model, batch), len(batch["weights"]))
    with torch.no_grad(), model.disable_adapter():
        reference = sequence_logprobs(*forward_logprobs(model, batch), len(batch["weights"]))
    policy_c, policy_r = policy.split([len(chosen), len(rejected)])
    reference_c, reference_r = reference.split([len(chosen), len(rejected)])
    margin = beta * ((policy_c - reference_c) - (policy_r - reference_r))
    tokens = sum(len(e.input_ids) for e in chosen + rejected) * 2
    return -F.logsigmoid(margin).mean(), tokens
