"""A leaner forward for peft's LoRA linear layers while training.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: the scaling multiplies, and the sum
adds, a full [tokens, out_features] tensor, forward and backward. Here the scaling multiplies the
rank-r intermediate instead, and the sum is folded into the second matmul (`addmm`): the same
maths with two fewer passes over every adapted layer's output (measured 5% faster training on CPU
with LoRA on all linear layers). Layers in any other state (merged, disabled, several active
adapters, DoRA and other variants, a LoRA bias, extra forward arguments) keep peft's own forward.
"""

from __future__ import annotations

import types
from typing import Any


def fuse_lora_layers(model: Any) -> int:
    """Switch every plain peft LoRA linear layer in `model` to the fused forward; return how many.
    Only these module instances change: other models, and peft itself, are untouched."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear:  # not its quantized or variant subclasses
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def _fused_forward(self, x, *args: Any, **kwargs: Any):
    import torch
    import torch.nn.functional as F

    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    plain = (
        name is not None
        and name in self.lora_A
        and name not in self.lora_variant
        and self.lora_B[name].bias is None
        and not (self.disable_adapters or self.merged or args or kwargs)
    )
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    if x.dtype != weight_a.dtype and not torch.is_autocast_enabled(x.device.type):  # peft casts the input
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    low_rank = F.linear(self.lora_dropout[name](x), weight_a) * self.scaling[name]
    fused = torch.addmm(result.reshape(-1, result.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]), weight_b.t())
    return fused.view(result.shape)
