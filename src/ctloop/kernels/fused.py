"""Fewer passes over activations: a chunked cross-entropy, and, while training on CPU, fused versions
of two of transformers' per-layer helpers.

- Cross-entropy. `F.cross_entropy(logits.float(), ...)` keeps an fp32 copy of all logits and, in
  backward, a zero-filled fp32 gradient the same size (with a 128k vocabulary and 4k labelled
  positions: 2 GiB each). `cross_entropy` works through the rows in chunks: the forward keeps only
  each row's log-sum-exp, the backward rebuilds each chunk's softmax from the logits themselves.
  Used by `ctloop.model.losses.token_losses`, for training and evaluation, on every device.
- RMSNorm. transformers' `weight * (x.float() * rsqrt(mean(x²) + eps)).to(dtype)` leaves autograd a
  chain of eight tensor-wide backward ops (two casts, pow, mean, rsqrt, three products). Here one
  autograd function computes the same forward and the closed-form gradient,
  `r * (g - x̂ * mean(g * x̂))` with `r = rsqrt(mean(x²) + eps)` and `x̂ = x * r`, saving only the
  input and `r`.
- Rotary embeddings. `x * cos + rotate_half(x) * sin` builds `rotate_half(x)` (a copy), two products
  and a sum for the query and for the key, and accumulates two gradient paths backward. Here each
  half of the output is one product and one fused multiply-add, forward and backward (the forward
  measured 3x faster than transformers' on the benchmark's shapes).

A norm is switched (per module instance, like `ctloop.kernels.lora`) only if its weight is frozen and
its own forward agrees with the fused one on probe inputs in the weight's and the activations'
dtype: values (within rounding), output dtype and gradients. Norms with other maths (Gemma's
`1 + weight`) or another output dtype (an fp32 norm that casts its product back) keep their
forward. The rotary function is looked up by transformers' convention, `apply_rotary_pos_emb` in
the model's modeling module, checked the same way, replaced for the duration of training and
restored after, so it is process-global: one training at a time per process. Calls it does not
cover (partial rotary dimensions, mixed dtypes, a differentiable cos/sin, extra arguments) go to
the original.

Measured (30M-parameter Llama shape, bf16, one CPU thread): the norm and rotary functions together
14% more training tokens/s and 0.1 GB less peak memory; the chunked cross-entropy 4% shorter
steps (by the fastest step) and 0.06 GB less.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections.abc import Iterator
from typing import Any

ROTARY = "apply_rotary_pos_emb"  # transformers' name for it, in each model family's modeling module
CHUNK_ELEMENTS = {"cpu": 2**20, "cuda": 2**26}  # fp32 logits per cross-entropy chunk: 4 MiB on CPUs, 256 MiB on GPUs


def cross_entropy(logits, targets, ignore_index: int = -100):
    """Per-row negative log-likelihood of `targets` under `logits` [rows, vocab], in fp32; 0 where the
    target is `ignore_index`. The same values and gradient as `F.cross_entropy(logits.float(),
    targets, reduction="none")`, without an fp32 copy of the logits."""
    chunk_rows = max(1, CHUNK_ELEMENTS.get(logits.device.type, 2**26) // logits.shape[-1])
    return _cross_entropy_function().apply(logits, targets, ignore_index, chunk_rows)


def fuse_rms_norms(model: Any, activation_dtype: Any) -> int:
    """Switch every RMSNorm in `model` that the fused forward reproduces, for inputs of its weight's
    dtype and of `activation_dtype` (what the layers compute in); return how many."""
    import torch

    count = 0
    for module in model.modules():
        weight, eps = getattr(module, "weight", None), _epsilon(module)
        if not (
            type(module).__name__.endswith("RMSNorm")
            and isinstance(weight, torch.nn.Parameter)
            and weight.ndim == 1
            and not weight.requires_grad
            and isinstance(eps, float)
        ):
            continue
        fused = types.MethodType(_rms_norm_forward, module)
        if all(
            _agrees(lambda x, m=module: type(m).forward(m, x), fused, (2, 5, weight.shape[0]), dtype, weight.device)
            for dtype in {weight.dtype, activation_dtype}
        ):
            module.forward = fused
            count += 1
    return count


@contextlib.contextmanager
def fused_rotary(model: Any) -> Iterator[int]:
    """Within the block, `model`'s modeling modules apply rotary embeddings through the fused function
    (those whose own function it reproduces); yields how many modules were switched."""
    switched = []
    names = {type(module).__module__ for module in model.modules()}
    try:
        for module in (sys.modules[name] for name in sorted(names) if name in sys.modules):
            original = getattr(module, ROTARY, None)
            if callable(original) and not isinstance(original, _FusedRotary) and _rotary_agrees(original):
                setattr(module, ROTARY, _FusedRotary(original))
                switched.append((module, original))
        yield len(switched)
    finally:
        for module, original in switched:
            setattr(module, ROTARY, original)


def _epsilon(norm: Any):
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", None))  # Llama's name, and others'


def _rms_norm_forward(self, x):
    return _rms_norm_function().apply(x, self.weight, _epsilon(self))


class _FusedRotary:
    """Drop-in for `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`."""

    def __init__(self, original):
        self.original = original

    def __call__(self, q, k, cos, sin, *args: Any, **kwargs: Any):
        import torch

        if (
            args
            or set(kwargs) - {"unsqueeze_dim"}
            or cos.requires_grad
            or sin.requires_grad
            or not (q.dtype == k.dtype == cos.dtype == sin.dtype)
            or q.shape[-1] % 2
        ):
            return self.original(q, k, cos, sin, *args, **kwargs)
        unsqueeze_dim = kwargs.get("unsqueeze_dim", 1)
        cos_wide, sin_wide = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        if not (
            cos_wide.shape == sin_wide.shape
            and cos.shape[-1] == q.shape[-1] == k.shape[-1]
            and torch.broadcast_shapes(q.shape, cos_wide.shape) == q.shape
            and torch.broadcast_shapes(k.shape, cos_wide.shape) == k.shape
        ):
            return self.original(q, k, cos, sin, *args, **kwargs)
        rotate = _rotary_function()
        return rotate.apply(q, cos_wide, sin_wide), rotate.apply(k, cos_wide, sin_wide)


def _rotary_agrees(function) -> bool:
    import torch

    generator = torch.Generator().manual_seed(0)
    cos, sin = (torch.randn(2, 5, 8, generator=generator) for _ in range(2))
    key = torch.randn(2, 1, 5, 8, generator=generator)
    fused = _FusedRotary(function)
    return _agrees(
        lambda q: sum(function(q, key, cos, sin)),
        lambda q: sum(fused(q, key, cos, sin)),
        (2, 3, 5, 8),
        torch.float32,
        torch.device("cpu"),
    )


def _agrees(reference, candidate, shape: tuple[int, ...], dtype, device) -> bool:
    """Whether `candidate` gives `reference`'s values (within `dtype`'s rounding), output dtype and
    input gradients on a random probe input; any error in either counts as no."""
    import torch

    probe = 3 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=device, dtype=dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    results = []
    for function in (reference, candidate):
        x = probe.clone().requires_grad_(True)
        try:
            with torch.enable_grad():
                out = function(x)
                out.backward(torch.linspace(-1, 1, out.numel(), device=device).view(out.shape).to(out.dtype))
        except Exception:  # noqa: BLE001 - a probe that fails, whatever the reason, rules the fusion out
            return False
        if x.grad is None:
            return False
        results.append((out.dtype, out.detach().float(), x.grad.float()))
    (dtype_a, *tensors_a), (dtype_b, *tensors_b) = results
    return dtype_a == dtype_b and all(
        a.shape == b.shape and bool(((a - b).abs() <= tolerance * (1 + b.abs())).all())
        for a, b in zip(tensors_a, tensors_b)
    )


@functools.cache
def _cross_entropy_function():
    import torch
    from torch.autograd.function import once_differentiable

    class ChunkedCrossEntropyFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, targets, ignore_index: int, chunk_rows: int):
            valid = targets != ignore_index
            safe_targets = targets.where(valid, 0)
            log_normalizer = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
            target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1).float()
            for start in range(0, logits.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                torch.logsumexp(logits[rows].float(), -1, out=log_normalizer[rows])
            ctx.save_for_backward(logits, log_normalizer, safe_targets, valid)
            ctx.chunk_rows = chunk_rows
            return (log_normalizer - target_logits).masked_fill_(~valid, 0.0)

        @staticmethod
        @once_differentiable
        def backward(ctx, grad):
            logits, log_normalizer, safe_targets, valid = ctx.saved_tensors
            grad = grad.float().masked_fill(~valid, 0.0)
            grad_logits = torch.empty_like(logits)
            for start in range(0, logits.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                # (softmax - one_hot(target)) * grad, with the softmax rebuilt from the log-sum-exp
                chunk = logits[rows].to(torch.float32, copy=True).sub_(log_normalizer[rows, None]).exp_()
                chunk.scatter_add_(1, safe_targets[rows, None], chunk.new_full((chunk.shape[0], 1), -1.0))
                grad_logits[rows] = chunk.mul_(grad[rows, None])
            return grad_logits, None, None, None

    return ChunkedCrossEntropyFunction


@functools.cache
def _rms_norm_function():
    import torch
    from torch.autograd.function import once_differentiable

    class FusedRMSNormFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            x32 = x.float()  # x itself when x is fp32: not modified in place
            inverse_rms = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
            ctx.save_for_backward(x, weight, inverse_rms)
            return (x32 * inverse_rms).to(x.dtype) * weight

        @staticmethod
        @once_differentiable
        def backward(ctx, grad):
            x, weight, inverse_rms = ctx.saved_tensors
            grad = (grad * weight).float()
            normed = x.float() * inverse_rms
            projection = (grad * normed).mean(-1, keepdim=True)
            return grad.sub_(normed.mul_(projection)).mul_(inverse_rms).to(x.dtype), None, None

    return FusedRMSNormFunction


@functools.cache
def _rotary_function():
    import torch
    from torch.autograd.function import once_differentiable

    def rotate(x, cos, sin, sign: float):
        """[x1 * cos1 - sign * x2 * sin1, x2 * cos2 + sign * x1 * sin2] over the two halves of the last dim."""
        half = x.shape[-1] // 2
        out = torch.empty(torch.broadcast_shapes(x.shape, cos.shape), dtype=x.dtype, device=x.device)
        x1, x2, out1, out2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
        torch.mul(x1, cos[..., :half], out=out1).addcmul_(x2, sin[..., :half], value=-sign)
        torch.mul(x2, cos[..., half:], out=out2).addcmul_(x1, sin[..., half:], value=sign)
        return out

    class FusedRotaryFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, cos, sin):
            ctx.save_for_backward(cos, sin)
            return rotate(x, cos, sin, 1.0)

        @staticmethod
        @once_differentiable
        def backward(ctx, grad):
            cos, sin = ctx.saved_tensors
            half = grad.shape[-1] // 2
            # d/dx1 = g1 * cos1 + g2 * sin2, d/dx2 = g2 * cos2 - g1 * sin1: the rotation by -sin,
            # with the sine halves swapped
            swapped = torch.cat([sin[..., half:], sin[..., :half]], dim=-1)
            return rotate(grad, cos, swapped, -1.0), None, None

    return FusedRotaryFunction
