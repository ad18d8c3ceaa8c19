"""The embedded base model: a tiny Llama built from a config, saved in HF format."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from flywheel_assets.lib.config import BaseModelConfig


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(vocab_size: int, config: BaseModelConfig, pad_id: int, eos_id: int) -> LlamaForCausalLM:
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, num_key_value_heads=config.heads,
        intermediate_size=config.intermediate_size, max_position_embeddings=config.max_length * 2,
        tie_word_embeddings=False, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
    ))


def load_pretrained(path_or_id: str | Path, device: torch.device | None = None):
    """(model, tokenizer) from save_pretrained output or a hub id (the hub is unreachable offline)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path_or_id))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(path_or_id))
    return model.to(device or pick_device()), tokenizer


def weights_sha256(path: Path) -> str:
    """Hash of the saved weights: the training card names the exact base."""
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
