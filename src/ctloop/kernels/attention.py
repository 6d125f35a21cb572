"""Eager attention for CPU training, with fewer passes over the [rows, heads, width, width] scores.

transformers' eager attention scales the scores, adds the mask, takes the softmax in fp32 and
casts it back: four passes over the score tensor, two of them dtype casts, and as many again
backward. Here the query is scaled before the product (a tensor width / head_dim times smaller),
and the softmax runs in the scores' own dtype: PyTorch's CPU softmax accumulates bf16 in fp32, so
its bf16 output equals the eager path's fp32 softmax cast to bf16 (checked bit for bit on 256-wide
rows). The mask is transformers' own eager mask, packed samples included. Measured 3-6% faster
training in bf16 and 6% less peak memory (30M-parameter model, 256-token packed rows).

Attention that needs more than a mask, a scaling and dropout (logit soft-capping, attention sinks,
position biases) goes to the model's own eager attention, which takes the same mask.
"""

from __future__ import annotations

from typing import Any

NAME = "ctloop_cpu_eager"
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")


def register() -> str:
    """Make `NAME` a transformers attention implementation (idempotent); return it, for
    `attn_implementation=`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME


def _attention(
    module: Any, query, key, value, attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any
):
    import sys

    import torch

    if any(kwargs.get(name) is not None for name in _UNSUPPORTED):
        own = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if own is None:
            raise NotImplementedError(
                f"{type(module).__name__} passes {sorted(kwargs)} to its attention, which "
                f"{NAME} does not implement; set model.attn_implementation: eager"
            )
        return own(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scale, key.transpose(2, 3))
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1)
    if dropout and module.training:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None
