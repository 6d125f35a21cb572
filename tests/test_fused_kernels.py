"""The fused RMSNorm and rotary functions compute what transformers' do, and step aside elsewhere."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

from ctloop.kernels.fused import ROTARY, _FusedRotary, cross_entropy, fuse_rms_norms, fused_rotary
from lora_helpers import loss_and_grads, op_calls, tiny_lora_llama


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_model_matches_transformers_in_loss_and_adapter_gradients(dtype):
    ids = torch.randint(1, 64, (3, 13))
    reference, fused = tiny_lora_llama().to(dtype), tiny_lora_llama().to(dtype)
    for model in (reference, fused):  # the adapter trains in fp32 under autocast, as in ctloop's bf16
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    assert fuse_rms_norms(fused, activation_dtype=dtype) == 2 * 2 + 1  # two per block and the final norm
    loss_ref, grads_ref = loss_and_grads(reference, ids, autocast=dtype == torch.bfloat16)
    with fused_rotary(fused) as switched:
        assert switched == 1 and isinstance(getattr(modeling_llama, ROTARY), _FusedRotary)
        loss_fused, grads_fused = loss_and_grads(fused, ids, autocast=dtype == torch.bfloat16)
    assert not isinstance(getattr(modeling_llama, ROTARY), _FusedRotary)  # restored after the block
    tolerance = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(loss_fused, loss_ref, **tolerance)
    assert grads_ref.keys() == grads_fused.keys() and len(grads_ref) == 2 * 2 * 7
    for name in grads_ref:
        torch.testing.assert_close(grads_fused[name], grads_ref[name], **tolerance, msg=name)


def test_the_fused_paths_run():
    ids = torch.randint(1, 64, (2, 9))
    reference, fused = tiny_lora_llama(), tiny_lora_llama()
    assert op_calls(reference, ids, "FusedRMSNormFunction", backward=True) == 0
    fuse_rms_norms(fused, activation_dtype=torch.float32)
    assert op_calls(fused, ids, "FusedRMSNormFunction", backward=True) == 2 * 2 + 1
    assert op_calls(fused, ids, "FusedRotaryFunction", backward=True) == 0
    with fused_rotary(fused):  # the query and the key of each block
        assert op_calls(fused, ids, "FusedRotaryFunction", backward=True) == 2 * 2
    assert op_calls(fused, ids, "FusedRotaryFunction", backward=True) == 0


def test_rotary_matches_transformers_for_any_cos_and_sin():
    q, k = torch.randn(2, 4, 7, 16, requires_grad=True), torch.randn(2, 2, 7, 16, requires_grad=True)
    cos, sin = torch.randn(2, 7, 16), torch.randn(2, 7, 16)  # halves differ, unlike RoPE's own
    fused = _FusedRotary(modeling_llama.apply_rotary_pos_emb)
    outputs = []
    for function in (modeling_llama.apply_rotary_pos_emb, fused):
        q_out, k_out = function(q, k, cos, sin)
        (q_out.pow(2).sum() + (k_out * torch.arange(16.0)).sum()).backward()
        outputs.append((q_out.detach(), k_out.detach(), q.grad.clone(), k.grad.clone()))
        q.grad, k.grad = None, None
    for got, want in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(got, want)


def test_rotary_calls_it_does_not_cover_go_to_the_original():
    calls = []

    def original(q, k, cos, sin, unsqueeze_dim=1):
        calls.append(cos.shape)
        return q, k

    fused = _FusedRotary(original)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    fused(q, k, torch.randn(1, 5, 4), torch.randn(1, 5, 4))  # partial rotary: cos narrower than q
    fused(q, k, torch.randn(1, 5, 8).bfloat16(), torch.randn(1, 5, 8).bfloat16())  # mixed dtypes
    fused(q, k, torch.randn(1, 5, 8, requires_grad=True), torch.randn(1, 5, 8))  # learned cos/sin
    fused(q, k, torch.randn(1, 5, 8), torch.randn(1, 5, 8), None)  # an older signature's position_ids
    assert len(calls) == 4
    fused(q, k, torch.randn(1, 5, 8), torch.randn(1, 5, 8))
    assert len(calls) == 4


def test_rotary_matches_transformers_for_heads_last_layouts():
    q, k = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 2, 16)  # [batch, seq, heads, dim]
    cos, sin = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    got = _FusedRotary(modeling_llama.apply_rotary_pos_emb)(q, k, cos, sin, unsqueeze_dim=2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_a_norm_whose_output_dtype_differs_keeps_its_forward():
    class Fp32RMSNorm(torch.nn.Module):  # fp32 weight applied before the cast back (GPT-OSS style)
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(8) + 0.5, requires_grad=False)
            self.variance_epsilon = 1e-6

        def forward(self, x):
            normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (self.weight * normed).to(x.dtype)

    # in fp32 the two are the same maths; with bf16 activations the fused one would return fp32
    assert fuse_rms_norms(Fp32RMSNorm(), activation_dtype=torch.float32) == 1
    assert fuse_rms_norms(Fp32RMSNorm(), activation_dtype=torch.bfloat16) == 0


def test_a_failing_probe_leaves_no_module_patched(monkeypatch):
    import sys

    from ctloop.kernels import fused as fused_kernels

    model = tiny_lora_llama()
    modules = sorted({type(m).__module__ for m in model.modules()})
    checked = []

    def probe(function):
        checked.append(function)
        if len(checked) > 1:
            raise KeyboardInterrupt  # an interruption mid-way through the modules
        return True

    monkeypatch.setattr(fused_kernels, "_rotary_agrees", probe)
    # a second modeling module with a rotary function, probed (and switched) before Llama's
    monkeypatch.setattr(sys.modules["peft.tuners.lora.layer"], ROTARY, lambda *a: None, raising=False)
    with pytest.raises(KeyboardInterrupt), fused_rotary(model):
        pass
    assert not any(isinstance(getattr(sys.modules[name], ROTARY, None), _FusedRotary) for name in modules)


def test_norms_with_other_maths_or_a_trainable_weight_keep_their_forward():
    class GemmaStyleRMSNorm(torch.nn.Module):  # scales by 1 + weight, in fp32
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(8), requires_grad=False)
            self.eps = 1e-6

        def forward(self, x):
            normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            return (normed * (1.0 + self.weight.float())).type_as(x)

    trainable = modeling_llama.LlamaRMSNorm(8)
    frozen = modeling_llama.LlamaRMSNorm(8).requires_grad_(False)
    model = torch.nn.Sequential(GemmaStyleRMSNorm(), trainable, frozen)
    assert fuse_rms_norms(model, activation_dtype=torch.float32) == 1
    assert "forward" in vars(frozen) and "forward" not in vars(trainable) and "forward" not in vars(model[0])


def test_rotary_functions_with_other_maths_are_left_alone(monkeypatch):
    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J style: rotates pairs, not halves
        def rotate(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    monkeypatch.setattr(modeling_llama, ROTARY, interleaved)
    with fused_rotary(tiny_lora_llama()) as switched:
        assert switched == 0 and getattr(modeling_llama, ROTARY) is interleaved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_cross_entropy_matches_torch_in_values_and_gradients(dtype, monkeypatch):
    import torch.nn.functional as F

    from ctloop.kernels import fused as fused_kernels

    monkeypatch.setitem(fused_kernels.CHUNK_ELEMENTS, "cpu", 3 * 50)  # 3 rows a chunk: 7 chunks, one short
    logits = (4 * torch.randn(20, 50)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 50, (20,))
    targets[[2, 11, 19]] = -100
    upstream = torch.rand(20)
    before = logits.detach().clone()
    results = []
    for loss in (lambda x: F.cross_entropy(x.float(), targets, reduction="none"), lambda x: cross_entropy(x, targets)):
        values = loss(logits)
        values.backward(upstream)
        results.append((values.detach(), logits.grad.clone()))
        logits.grad = None
    (want, want_grad), (got, got_grad) = results
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    assert torch.equal(got[[2, 11, 19]], torch.zeros(3)) and torch.equal(
        got_grad[[2, 11, 19]], torch.zeros(3, 50, dtype=dtype)
    )
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    assert torch.equal(logits.detach(), before)  # fp32 logits are not a copy: they must stay untouched


def test_training_kernels_undo_every_switch_and_refuse_a_second_training(monkeypatch):
    from transformers.models.llama import modeling_llama

    from ctloop.errors import ModelError
    from ctloop.kernels.session import training_kernels

    model = tiny_lora_llama()
    original_rotary = getattr(modeling_llama, ROTARY)
    with training_kernels(model, cpu=True, activation_dtype=torch.float32):
        switched = [m for m in model.modules() if "forward" in m.__dict__]
        assert len(switched) > 0 and isinstance(getattr(modeling_llama, ROTARY), _FusedRotary)
        with (
            pytest.raises(ModelError, match="another training is running in this process"),
            training_kernels(tiny_lora_llama(), cpu=True, activation_dtype=torch.float32),
        ):
            pass
    assert [m for m in model.modules() if "forward" in m.__dict__] == []
    assert getattr(modeling_llama, ROTARY) is original_rotary
    with pytest.raises(RuntimeError, match="boom"), training_kernels(model, cpu=True, activation_dtype=torch.float32):
        raise RuntimeError("boom")
    assert [m for m in model.modules() if "forward" in m.__dict__] == []
    with training_kernels(model, cpu=True, activation_dtype=torch.float32):  # released after the error
        pass
