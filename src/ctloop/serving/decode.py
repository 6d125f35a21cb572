"""A lean decoding step for Llama-architecture models in the continuous batcher.

One decoding step through transformers' model forward spends more time in Python than in
kernels on a small model: output capturing and keyword decorators, a cache object rebuilt
around the batch's tensors, the attention mask built again, and torch's module-call machinery
around every layer. `LeanLlamaStep` runs the same step from the model's own parts, in the same
order (its embedding, rotary-embedding module, norms, projections, rotary function, transformers'
SDPA attention function and MLP), calling their `forward`s directly, with the KV cache as plain
tensors. It is used only where it reproduces the model's own step: `lean_step(network)` checks the
architecture (LlamaForCausalLM on SDPA attention, with no forward hooks), then decodes probe
batches both ways (with and without padding) and keeps the lean step only if the logits and
caches are bitwise equal. Anything else decodes through the model's forward. The batcher builds
it again whenever adapters are loaded or deleted.
"""

from __future__ import annotations

import sys
from typing import Any


class LeanLlamaStep:
    """`step(input_ids, position_ids, mask, layers)`: one token for every row, as the model's
    forward would compute it. `mask` is the [rows, width + 1] padding mask including the new token;
    `layers` the per-layer (keys, values) of the width cached tokens. Returns the last position's
    logits [rows, vocab] and the grown per-layer (keys, values)."""

    def __init__(self, causal_lm: Any):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.model = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.layers = list(self.model.layers)
        self.rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.attention = sdpa_attention_forward

    def step(self, input_ids, position_ids, mask, layers: list[tuple[Any, Any]]):
        import torch

        model = self.model
        rows = input_ids.shape[0]
        hidden = model.embed_tokens.forward(input_ids)
        cos, sin = model.rotary_emb.forward(hidden, position_ids)
        # transformers' SDPA mask for one query token: none without padding, else the padding mask
        attention_mask = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        grown = []
        for layer, (cached_keys, cached_values) in zip(self.layers, layers, strict=True):
            attn = layer.self_attn
            residual = hidden
            hidden = layer.input_layernorm.forward(hidden)
            shape = (rows, 1, -1, attn.head_dim)
            query = attn.q_proj.forward(hidden).view(shape).transpose(1, 2)
            key = attn.k_proj.forward(hidden).view(shape).transpose(1, 2)
            value = attn.v_proj.forward(hidden).view(shape).transpose(1, 2)
            query, key = self.rotary(query, key, cos, sin)
            key = torch.cat([cached_keys, key], dim=-2)
            value = torch.cat([cached_values, value], dim=-2)
            grown.append((key, value))
            output, _ = self.attention(attn, query, key, value, attention_mask, dropout=0.0, scaling=attn.scaling)
            output = output.reshape(rows, 1, -1).contiguous()
            hidden = residual + attn.o_proj.forward(output)
            residual = hidden
            hidden = residual + layer.mlp.forward(layer.post_attention_layernorm.forward(hidden))
        hidden = model.norm.forward(hidden)
        return self.lm_head.forward(hidden)[:, -1, :], grown


def lean_step(network: Any) -> LeanLlamaStep | None:
    """A LeanLlamaStep for `network` (a PeftModel or a causal LM) when it is a Llama model on SDPA
    attention without hooks and the probe agrees bit for bit; else None."""
    causal_lm = network.get_base_model() if hasattr(network, "get_base_model") else network
    if not _plain_llama(causal_lm):
        return None
    lean = LeanLlamaStep(causal_lm)
    return lean if _agrees(network, lean) else None


def _plain_llama(causal_lm: Any) -> bool:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM

    config = causal_lm.config
    if type(causal_lm) is not LlamaForCausalLM or config._attn_implementation != "sdpa":
        return False
    if any(type(layer) is not LlamaDecoderLayer for layer in causal_lm.model.layers):
        return False
    # a hook would run in the model's forward and not in the lean one (LoRA layers' own forwards are
    # called, so peft's plain and ctloop's routed LoRA forwards are both fine)
    return not any(
        module._forward_hooks or module._forward_pre_hooks for module in causal_lm.modules() if module is not causal_lm
    )


def _agrees(network: Any, lean: LeanLlamaStep) -> bool:
    """Prefill two probe prompts through the model, then decode one token both ways; once with a
    left-padded row and once without padding (where transformers passes SDPA no mask)."""
    return all(_agrees_on(network, lean, padding) for padding in (2, 0))


def _agrees_on(network: Any, lean: LeanLlamaStep, padding: int) -> bool:
    import torch
    from transformers import DynamicCache

    device = network.device
    config = lean.model.config
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 6), generator=generator).to(device)
    mask = torch.ones(2, 6, dtype=torch.long, device=device)
    mask[1, :padding] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        cache = DynamicCache()
        network(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        step_ids = torch.randint(0, config.vocab_size, (2, 1), generator=generator).to(device)
        step_positions = positions[:, -1:] + 1
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype, device=device)], dim=1)
        reference_cache = DynamicCache(ddp_cache_data=layers)
        reference = network(
            input_ids=step_ids,
            attention_mask=step_mask,
            position_ids=step_positions,
            cache=reference_cache,
            use_cache=True,
        ).logits[:, -1, :]
        logits, grown = lean.step(step_ids, step_positions, step_mask, layers)
    same_caches = all(
        torch.equal(keys, layer.keys) and torch.equal(values, layer.values)
        for (keys, values), layer in zip(grown, reference_cache.layers, strict=True)
    )
    return same_caches and torch.equal(logits, reference)
