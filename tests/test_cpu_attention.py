"""ctloop's CPU attention gives transformers' eager results, packed samples included."""

from __future__ import annotations

import pytest
import torch

from ctloop.kernels import attention as cpu_attention
from ctloop.model.batching import Example, collate, collate_packed
from ctloop.model.losses import token_losses


def _model(attn: str, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config)


def _rows():
    gen = torch.Generator().manual_seed(1)
    examples = [Example(torch.randint(3, 64, (n,), generator=gen).tolist(), 2) for n in (7, 5, 9, 4, 6)]
    return [[examples[0], examples[1]], [examples[2], examples[3]], [examples[4]]], examples


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["multi-head", "grouped-query"])
def test_matches_transformers_eager_in_losses_and_gradients(kv_heads):
    rows, examples = _rows()
    results = []
    for attn in ("eager", cpu_attention.register()):
        model = _model(attn, kv_heads)
        for batch in (collate_packed(rows, 0, width=16), collate(examples, 0)):
            nll, _ = token_losses(model, batch)
            nll.sum().backward()
            results.append((nll.detach(), [p.grad.clone() for p in model.parameters()]))
            model.zero_grad()
    for (nll_eager, grads_eager), (nll_ours, grads_ours) in zip(results[:2], results[2:], strict=True):
        torch.testing.assert_close(nll_ours, nll_eager, atol=1e-5, rtol=1e-4)
        for ours, eager in zip(grads_ours, grads_eager, strict=True):
            torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_stays_close_to_eager():
    rows, _ = _rows()
    losses = []
    for attn in ("eager", cpu_attention.register()):
        model = _model(attn).to(torch.bfloat16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(token_losses(model, collate_packed(rows, 0, width=16))[0])
    torch.testing.assert_close(losses[1], losses[0], atol=2e-2, rtol=2e-2)


def test_packed_samples_stay_isolated():
    rows, _ = _rows()
    model = _model(cpu_attention.register()).eval()
    perturbed = [[Example([1, 40, 41, 42, 43, 44, 2], 2), rows[0][1]], *rows[1:]]
    with torch.no_grad():
        packed, _ = token_losses(model, collate_packed(rows, 0, width=16))
        changed, _ = token_losses(model, collate_packed(perturbed, 0, width=16))
        alone, _ = token_losses(model, collate([rows[0][1]], 0))
    second = slice(7, 7 + 4)  # row 0's second sample: positions 7..11, its losses at 7..10
    torch.testing.assert_close(packed[0, second], changed[0, second], atol=1e-6, rtol=0)
    torch.testing.assert_close(packed[0, second], alone[0, :4], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(packed[0, :6], changed[0, :6])


def test_soft_capped_attention_goes_to_the_models_own_eager_attention():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    rows, _ = _rows()
    losses = []
    for attn in ("eager", cpu_attention.register()):
        torch.manual_seed(0)
        model = Gemma2ForCausalLM(
            Gemma2Config(
                vocab_size=64,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                attn_logit_softcapping=0.5,
                pad_token_id=0,
                attn_implementation=attn,
            )
        ).eval()
        with torch.no_grad():
            losses.append(token_losses(model, collate_packed(rows, 0, width=16))[0])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
