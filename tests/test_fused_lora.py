"""The fused LoRA forward computes what peft's does, and steps aside where it does not apply."""

from __future__ import annotations

import pytest
import torch

from ctloop.kernels.lora import fuse_lora_layers
from lora_helpers import loss_and_grads, op_calls, tiny_lora_llama


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_forward_matches_peft_in_outputs_and_gradients(autocast):
    ids = torch.randint(1, 64, (3, 11))
    reference, fused = tiny_lora_llama(), tiny_lora_llama()
    assert fuse_lora_layers(fused) == 2 * 7  # every linear layer of both blocks
    loss_ref, grads_ref = loss_and_grads(reference, ids, autocast)
    loss_fused, grads_fused = loss_and_grads(fused, ids, autocast)
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if autocast else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(loss_fused, loss_ref, **tolerance)
    assert grads_ref.keys() == grads_fused.keys() and len(grads_ref) == 2 * 2 * 7
    for name in grads_ref:
        torch.testing.assert_close(grads_fused[name], grads_ref[name], **tolerance, msg=name)


def test_the_fused_path_runs_and_steps_aside_for_disabled_adapters():
    ids = torch.randint(1, 64, (2, 9))
    reference, fused = tiny_lora_llama(), tiny_lora_llama()
    fuse_lora_layers(fused)
    assert op_calls(reference, ids, "aten::addmm") == 0
    assert op_calls(fused, ids, "aten::addmm") == 14  # one per adapted layer
    with torch.no_grad(), fused.disable_adapter(), reference.disable_adapter():
        assert op_calls(fused, ids, "aten::addmm") == 0
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert not torch.allclose(fused(input_ids=ids).logits, tiny_lora_llama()(input_ids=ids).logits)


def test_fused_layers_apply_the_same_dropout_as_peft():
    ids = torch.randint(1, 64, (2, 9))
    reference, fused = tiny_lora_llama(lora_dropout=0.5), tiny_lora_llama(lora_dropout=0.5)
    fuse_lora_layers(fused)
    outputs = []
    for model in (reference, fused):
        torch.manual_seed(7)  # the same dropout masks, drawn in the same order
        outputs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    torch.manual_seed(8)
    assert not torch.allclose(fused(input_ids=ids).logits, outputs[1])  # dropout does apply
