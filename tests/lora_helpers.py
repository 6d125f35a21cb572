"""Helpers for the fused-kernel tests: a tiny Llama with a LoRA adapter that matters, its loss and
adapter gradients, and how often an operator ran."""

from __future__ import annotations

import torch


def tiny_lora_llama(seed: int = 0, **lora):
    """Two blocks, grouped-query attention, LoRA on every linear layer; norm weights and lora_B drawn at
    random (they start at one and zero, which would hide mistakes)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        )
    )
    for name, p in base.named_parameters():
        if "norm" in name:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def loss_and_grads(model, ids, autocast: bool = False):
    """A loss over all logits (bf16 autocast if asked) and the trainable parameters' gradients."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids).logits.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


def op_calls(model, ids, op: str, backward: bool = False) -> int:
    """How many times the profiler saw `op` in a forward pass (without autograd), or in a forward
    and backward pass."""
    from torch.profiler import ProfilerActivity, profile

    with torch.set_grad_enabled(backward), profile(activities=[ProfilerActivity.CPU]) as prof:
        logits = model(input_ids=ids).logits
        if backward:
            logits.sum().backward()
    model.zero_grad()
    return sum(event.count for event in prof.key_averages() if event.key == op)


def two_adapter_llama(dtype=torch.float32, **lora):
    """tiny_lora_llama's model with a second adapter of other random weights, in eval mode."""
    from peft import LoraConfig

    model = tiny_lora_llama(**lora)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=5, target_modules="all-linear", **lora))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name and "other" in name:
            torch.nn.init.normal_(p, std=0.1)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(dtype)  # the frozen base in `dtype`, the adapters fp32 (peft's layout)
    return model.eval()
