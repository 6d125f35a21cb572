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


def _two_adapter_llama(dtype=torch.float32, **lora):
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


@pytest.mark.parametrize(
    "dtype, lora",
    [(torch.float32, {}), (torch.float32, {"lora_bias": True}), (torch.bfloat16, {})],
    ids=["fp32", "fp32-B-bias", "bf16-base"],
)
def test_the_routed_forward_is_bitwise_peft_in_single_and_mixed_batches(dtype, lora):
    from ctloop.kernels.lora import RowAdapters, route_lora_layers

    ids = torch.randint(1, 64, (4, 7))
    names = ["default", "other", "other", "default"]
    reference, routed = _two_adapter_llama(dtype, **lora), _two_adapter_llama(dtype, **lora)
    rows = RowAdapters()
    assert route_lora_layers(routed, rows) == (2 * 7, [])
    with torch.inference_mode():
        for name in ("default", "other"):
            reference.set_adapter(name), routed.set_adapter(name)
            rows.set([name] * 4)
            assert torch.equal(routed(input_ids=ids).logits, reference(input_ids=ids).logits), name
        rows.set(names)
        mixed = routed(input_ids=ids).logits
        assert torch.equal(mixed, reference(input_ids=ids, adapter_names=names).logits)
        assert not torch.equal(mixed[0], mixed[1])  # the rows really used different adapters
        if dtype == torch.float32:  # peft adds a mixed batch's LoRA output in the base's dtype, a single
            reference.set_adapter("other")  # adapter's in fp32: in bf16 the two differ by rounding
            assert torch.equal(mixed[1:3], reference(input_ids=ids[1:3]).logits)


def test_the_routed_forward_steps_aside_for_training_and_variants():
    from peft import LoraConfig

    from ctloop.kernels.lora import RowAdapters, route_lora_layers

    ids = torch.randint(1, 64, (2, 9))
    model, rows = _two_adapter_llama(), RowAdapters()
    route_lora_layers(model, rows)
    rows.set(["default", "default"])
    model.train()  # training: peft's own forward (no `aten::linear` saved from module calls)
    assert op_calls(model, ids, "aten::linear") == op_calls(_two_adapter_llama().train(), ids, "aten::linear")
    model.eval()
    # a DoRA adapter is a peft variant: switched layers hand it to peft, whose output it keeps
    model.add_adapter("dora", LoraConfig(r=2, target_modules="all-linear", use_dora=True))
    reference = _two_adapter_llama()
    reference.add_adapter("dora", LoraConfig(r=2, target_modules="all-linear", use_dora=True))
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()
    route_lora_layers(model, rows)
    model.set_adapter("dora"), reference.set_adapter("dora")
    rows.set(["dora", "dora"])
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
