"""LoRA trained through the effective weight: the same adapter, fewer flops.

peft runs an adapter beside its frozen layer: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ, two more matmuls
over every token, forward and backward. At the embedded model's width (128) a rank-64
adapter is half as wide as the layer, so those matmuls cost more than the layer itself.
The same y is x·(W + s·B·A)ᵀ: the effective weight costs d_out·r·d_in once per call,
whatever the number of tokens, and the layer then runs as a plain one. Autograd takes the
effective weight's gradient (the full-layer gradient that full fine-tuning computes) back
to A and B, which stay the only trainable parameters; the frozen W gets none.

Only the training loop uses it (`effective_weight_forward` around the steps): the adapter,
its saved files and peft's own forward elsewhere are unchanged, and the loss and gradients
equal peft's up to float rounding (flywheel_assets_tests/training/test_effective_weight.py).
A layer falls back to peft's forward whenever the rewrite would not be exact: adapters
disabled (the DPO reference pass) or merged, several active adapters, a LoRA variant
(DoRA…), dropout on the adapter's input, a scaled embedding, or a base layer that is not a
plain `nn.Linear` / `nn.Embedding`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch.nn.functional as F
from peft.tuners.lora import Embedding as LoraEmbedding
from peft.tuners.lora import Linear as LoraLinear
from torch import nn


def _single_adapter(module, adapters) -> str | None:
    """The one active adapter of `module` when the rewrite is exact, else None."""
    if module.disable_adapters or module.merged:
        return None
    active = [name for name in module.active_adapters if name in adapters]
    if len(active) != 1 or active[0] in module.lora_variant:
        return None
    return active[0]


def _linear_forward(self: LoraLinear, x, *args, **kwargs):
    adapter = _single_adapter(self, self.lora_A)
    base = self.get_base_layer()
    if (adapter is None or args or kwargs or self.fan_in_fan_out or type(base) is not nn.Linear
            or not isinstance(self.lora_dropout[adapter], nn.Identity)):
        return type(self).forward(self, x, *args, **kwargs)
    delta = (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]
    return F.linear(x, base.weight + delta.to(base.weight.dtype), base.bias)


def _embedding_forward(self: LoraEmbedding, x, *args, **kwargs):
    adapter = _single_adapter(self, self.lora_embedding_A)
    base = self.get_base_layer()
    if adapter is None or args or kwargs or type(base) is not nn.Embedding or self._get_embed_scale() is not None:
        return type(self).forward(self, x, *args, **kwargs)
    # peft: embedding(x, Aᵀ)·Bᵀ·s, so the table gains (B·A)ᵀ·s
    delta = (self.lora_embedding_B[adapter] @ self.lora_embedding_A[adapter]).T * self.scaling[adapter]
    return F.embedding(x, base.weight + delta.to(base.weight.dtype), base.padding_idx, base.max_norm,
                       base.norm_type, base.scale_grad_by_freq, base.sparse)


@contextmanager
def effective_weight_forward(model: nn.Module) -> Iterator[int]:
    """Within the block, the model's LoRA linear and embedding layers compute through their
    effective weight; yields how many layers were switched. peft's forward is restored on exit."""
    switched = []
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.forward = MethodType(_linear_forward, module)
        elif isinstance(module, LoraEmbedding):
            module.forward = MethodType(_embedding_forward, module)
        else:
            continue
        switched.append(module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            del module.forward  # the instance attribute; the class's forward shows again
