"""The fused LoRA forward computes what peft's does, and steps aside where it does not apply."""

from __future__ import annotations

import pytest
import torch

from ctloop.kernels.lora import fuse_lora_layers
from lora_helpers import loss_and_grads, op_calls, tiny_lora_llama, two_adapter_llama


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


@pytest.mark.parametrize(
    "dtype, lora",
    [(torch.float32, {}), (torch.float32, {"lora_bias": True}), (torch.bfloat16, {})],
    ids=["fp32", "fp32-B-bias", "bf16-base"],
)
def test_the_routed_forward_is_bitwise_peft_in_single_and_mixed_batches(dtype, lora):
    from ctloop.kernels.lora import RowAdapters, route_lora_layers

    ids = torch.randint(1, 64, (4, 7))
    names = ["default", "other", "other", "default"]
    reference, routed = two_adapter_llama(dtype, **lora), two_adapter_llama(dtype, **lora)
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
    model, rows = two_adapter_llama(lora_dropout=0.5), RowAdapters()
    reference = two_adapter_llama(lora_dropout=0.5)
    route_lora_layers(model, rows)
    rows.set(["default", "default"])
    # training: peft's forward, dropout included (the routed forward skips dropout)
    model.train(), reference.train()
    torch.manual_seed(3)
    dropped = model(input_ids=ids).logits
    torch.manual_seed(3)
    assert torch.equal(dropped, reference(input_ids=ids).logits)
    model.eval()
    assert not torch.equal(dropped, model(input_ids=ids).logits)  # dropout really acted
    # a DoRA adapter is a peft variant: switched layers hand it to peft
    dora = LoraConfig(r=2, target_modules="all-linear", use_dora=True)
    model.add_adapter("dora", dora)
    reference.add_adapter("dora", dora)
    torch.manual_seed(4)
    for name, p in model.named_parameters():
        if "dora" in name:  # random B and magnitudes: DoRA's output then differs from plain LoRA's
            torch.nn.init.normal_(p, mean=1.0 if "magnitude" in name else 0.0, std=0.2)
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()
    route_lora_layers(model, rows)
    model.set_adapter("dora"), reference.set_adapter("dora")
    rows.set(["dora", "dora"])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        assert torch.equal(logits, reference(input_ids=ids).logits)
        with reference.disable_adapter():
            assert not torch.equal(logits, reference(input_ids=ids).logits)


def test_the_routed_forward_follows_adapter_changes_made_after_routing():
    """Adapters loaded, deleted, merged or disabled after the layers were routed: peft's forward
    runs, so the output is still peft's."""
    from peft import LoraConfig

    from ctloop.kernels.lora import RowAdapters, route_lora_layers

    ids = torch.randint(1, 64, (4, 7))
    model, reference, rows = two_adapter_llama(), two_adapter_llama(), RowAdapters()
    route_lora_layers(model, rows)

    def both(**kwargs):
        with torch.inference_mode():
            return model(input_ids=ids, **kwargs).logits, reference(input_ids=ids, **kwargs).logits

    third = LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(5)
    model.add_adapter("third", third)
    torch.manual_seed(5)
    reference.add_adapter("third", third)
    model.set_adapter("third"), reference.set_adapter("third")
    rows.set(["third"] * 4)
    routed, peft = both()
    assert torch.equal(routed, peft)  # loaded after routing: not applied as if absent
    names = ["default", "third", "third", "default"]
    rows.set(names)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids, adapter_names=names).logits)
    model.set_adapter("default"), reference.set_adapter("default")
    rows.set(["default"] * 4)
    model.delete_adapter("other"), reference.delete_adapter("other")
    model.base_model.merge_adapter(), reference.base_model.merge_adapter()
    routed, peft = both()
    assert torch.equal(routed, peft)  # merged: LoRA not added twice
    model.base_model.unmerge_adapter(), reference.base_model.unmerge_adapter()
    with model.disable_adapter(), reference.disable_adapter():
        routed, peft = both()
    assert torch.equal(routed, peft)
