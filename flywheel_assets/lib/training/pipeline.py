"""Base model and per-cycle adapters, end to end: data in, saved model and training card out."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.domains import Domain, load_domain
from flywheel_assets.lib.training.examples import encode_all
from flywheel_assets.lib.training.model import (
    build_model, count_parameters, load_pretrained, pick_device, weights_sha256,
)
from flywheel_assets.lib.training.tokenizer import train_tokenizer
from flywheel_assets.lib.training.trainer import attach_lora, pretrain, train_lora

Log = Callable[[dict], None]
VOCABULARY_SEED = 5


def fingerprint(config: FlywheelConfig, trajectory_ids: list[str]) -> str:
    """Same settings and same cold-start rows → same base: retraining is skipped."""
    payload = json.dumps([config.base_model.model_dump(), sorted(trajectory_ids)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def domain_corpus(messages: list[list[dict]], domain: Domain, seed: int = VOCABULARY_SEED) -> list[str]:
    """The tokenizer's corpus: the cold-start conversations plus the domain's own wording
    (its tools' words, entities and phrasings, never eval prompts: Domain.vocabulary), so a
    user's new phrasing is made of known tokens even before any model saw it."""
    texts = []
    for conversation in messages + domain.vocabulary(seed):
        for message in conversation:
            texts.append(message.get("content") or "")
            texts += [call["function"]["arguments"] for call in message.get("tool_calls") or []]
            texts += [call["function"]["name"] for call in message.get("tool_calls") or []]
    return texts


def train_base(config: FlywheelConfig, messages: list[list[dict]], out_dir: Path, log: Log | None = None) -> dict:
    """Train the tokenizer and pretrain the embedded model on cold-start conversations."""
    settings = config.base_model
    device = pick_device()
    domain = load_domain(config.domain)
    tokenizer = train_tokenizer(domain_corpus(messages, domain), whole_numbers=domain.whole_numbers)
    encoded, skipped = encode_all(tokenizer, [(m, 1.0, None) for m in messages], settings.max_length)
    examples = [e for e in encoded if e]
    if not examples:
        raise ValueError("no cold-start conversation has an assistant turn to learn from")
    model = build_model(len(tokenizer), settings, tokenizer.pad_token_id, tokenizer.eos_token_id).to(device)
    result = pretrain(model, examples, steps=settings.pretrain_steps, batch_size=settings.batch_size,
                      learning_rate=settings.learning_rate, pad_id=tokenizer.pad_token_id, seed=settings.seed, log=log)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    card = {
        "kind": "base", "parameters": count_parameters(model), "vocab_size": len(tokenizer),
        "examples": len(examples), "examples_skipped": dict(skipped), "max_length": settings.max_length,
        "settings": settings.model_dump(), "device": str(device),
        "tokens_per_second": round(result.tokens_per_second), "seconds": round(result.seconds, 1),
        "loss_curve": _curve(result.losses), "weights_sha256": weights_sha256(out_dir),
    }
    (out_dir / "training_card.json").write_text(json.dumps(card, indent=2))
    return card


def preference_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(chosen, rejected) within a session: the best non-bronze row over each bronze row."""
    by_session: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("session_id"):
            by_session.setdefault(row["session_id"], []).append(row)
    pairs = []
    for session_rows in by_session.values():
        good = [r for r in session_rows if r["tier"] != "bronze"]
        if not good:
            continue
        chosen = max(good, key=lambda r: (r["combined_score"], r["trajectory_id"]))
        pairs += [(chosen, r) for r in session_rows if r["tier"] == "bronze"]
    return pairs


def train_adapter(config: FlywheelConfig, base_dir: Path, rows: list[dict], out_dir: Path,
                  log: Log | None = None) -> dict:
    """LoRA on one cycle's dataset rows (TRAINING_DATASET columns) over the model in base_dir."""
    settings = config.lora
    model, tokenizer = load_pretrained(base_dir)
    max_length = model_max_length(config, model)
    positives = [r for r in rows if r["tier"] != "bronze"]
    pairs_rows = preference_pairs(rows)
    encoded, skipped = encode_all(tokenizer, [(r["messages_json"], r["weight"], r.get("tools_json")) for r in positives],
                                  max_length)
    examples = [e for e in encoded if e]
    sides, pair_skipped = encode_all(tokenizer, [(row["messages_json"], 1.0, row.get("tools_json"))
                                                 for pair in pairs_rows for row in pair], max_length)
    pairs = [(c, r) for c, r in zip(sides[::2], sides[1::2]) if c and r]
    if not examples:
        raise ValueError("the dataset has no non-bronze conversation to learn from")
    torch.manual_seed(settings.seed)  # the adapter's initial weights, not whatever ran before
    peft_model = attach_lora(model, settings)
    result = train_lora(peft_model, examples, pairs, settings, pad_id=tokenizer.pad_token_id, log=log)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    card = {
        "kind": "lora", "base_path": str(base_dir), "base_weights_sha256": weights_sha256(base_dir),
        "examples": len(examples), "examples_skipped": dict(skipped), "max_length": max_length,
        "preference_pairs": len(pairs), "preference_sides_skipped": dict(pair_skipped), "bronze_rows_unpaired":
            sum(1 for r in rows if r["tier"] == "bronze") - len(pairs_rows),
        "trainable_parameters": count_parameters(peft_model, trainable_only=True),
        "settings": settings.model_dump(), "device": str(next(peft_model.parameters()).device),
        "tokens_per_second": round(result.tokens_per_second), "seconds": round(result.seconds, 1),
        "loss_curve": _curve(result.losses),
        "tier_weights_seen": sorted({e.weight for e in examples}),
    }
    return card


def model_max_length(config: FlywheelConfig, model) -> int:
    """The longest example trained on: base_model.max_length, and never past what the model's
    positions allow."""
    positions = getattr(model.config, "max_position_embeddings", None) or config.base_model.max_length
    return min(config.base_model.max_length, positions)


def load_for_inference(base_dir: Path, adapter_dir: Path | None = None, merged: bool = False):
    """(model, tokenizer) of a version: the base, or base + adapter (optionally merged)."""
    model, tokenizer = load_pretrained(base_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if merged:
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


def _curve(losses: list[float], points: int = 50) -> list[list[float]]:
    """[step, loss] at most `points` times, for the card and the UI."""
    stride = max(1, len(losses) // points)
    return [[step + 1, round(loss, 4)] for step, loss in enumerate(losses) if step % stride == 0 or step == len(losses) - 1]


def set_threads() -> None:
    """Two cores here: more threads than cores only adds contention."""
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))


