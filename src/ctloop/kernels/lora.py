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


class RowAdapters:
    """Which adapter each row of the next forward pass uses, for the layers switched by
    `route_lora_layers`: either `single`, one adapter for every row, or `groups`, (adapter name,
    row-index tensor) pairs that cover the rows."""

    def __init__(self) -> None:
        self.single: str | None = None
        self.groups: list[tuple[str, Any]] | None = None
        self.adapters: list[str] = []  # the adapter names in `groups`, in order
        self.rows = 0  # the batch size `groups` covers

    def set(self, names: list[str], device: Any = None) -> None:
        if len(set(names)) == 1:
            self.single, self.groups = names[0], None
            return
        import torch

        self.single, self.rows, self.adapters = None, len(names), list(dict.fromkeys(names))
        self.groups = [
            (name, torch.tensor([i for i, n in enumerate(names) if n == name], device=device)) for name in self.adapters
        ]


def route_lora_layers(model: Any, rows: RowAdapters) -> tuple[int, list[Any]]:
    """Switch `model`'s plain peft LoRA linear layers (over an `nn.Linear`) to `_routed_forward`,
    which takes each row's adapter from `rows`; return how many were switched and the LoRA layers
    that were not (they need peft's own `adapter_names=` for mixed batches; a layer switched by an
    earlier call gets peft's forward back). Each switched layer keeps references to its adapters'
    weights: call it again after adapters are loaded or deleted (until then, a layer whose adapters
    changed computes through peft's forward)."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear

    switched, others = 0, []
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        if type(module) is Linear and type(module.base_layer) is torch.nn.Linear:
            module._ctloop_route = (rows, module.base_layer.weight, module.base_layer.bias, _adapter_weights(module))
            module.forward = types.MethodType(_routed_forward, module)
            switched += 1
        else:
            if getattr(module.__dict__.get("forward"), "__func__", None) is _routed_forward:
                del module.forward
            others.append(module)
    return switched, others


def unroute_lora_layers(model: Any) -> list[Any]:
    """Give every LoRA layer peft's own forward back; return all of the model's LoRA layers."""
    from peft.tuners.lora import LoraLayer

    layers = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            if getattr(module.__dict__.get("forward"), "__func__", None) is _routed_forward:
                del module.forward
            layers.append(module)
    return layers


def _adapter_weights(layer: Any) -> dict[str, Any]:
    """Per adapter (A weight, A bias, B weight, B bias, scaling), or None for a variant (DoRA...)."""
    return {
        name: None
        if name in layer.lora_variant
        else (a.weight, a.bias, layer.lora_B[name].weight, layer.lora_B[name].bias, layer.scaling[name])
        for name, a in layer.lora_A.items()
    }


def _routed_forward(self, x, *args: Any, **kwargs: Any):
    """peft's LoRA forward for inference, operation for operation (so its outputs are bitwise peft's
    own), without its per-call work: no module calls for the base layer, A, B and dropout (identity
    in eval mode), no attribute look-ups through nn.Module, no per-layer sorting of rows by adapter
    (`RowAdapters` does that once per step). peft's forward runs instead whenever this one could
    differ from it: training (dropout), merged or disabled adapters, extra arguments, adapter
    variants, adapters loaded or deleted since the layer was routed, a single-adapter batch whose
    adapter is not peft's one active adapter, input-dtype casting switched off, or a batch of
    another size than the one the rows were grouped for."""
    import torch.nn.functional as F

    rows, weight, bias, adapters = self._ctloop_route
    if rows.groups is not None and x.shape[0] != rows.rows:  # a forward outside the routed batch
        return type(self).forward(self, x, *args, **kwargs)  # peft's, on its active adapter
    if rows.groups is None:
        active = self._active_adapter
        chosen = [rows.single] if active == rows.single or active == [rows.single] else None
    else:
        chosen = rows.adapters
    if (
        chosen is None
        or self.training
        or args
        or kwargs
        or self.merged_adapters
        or self._disable_adapters
        or not _routable(self, adapters, chosen)
    ):
        if rows.groups is not None:
            kwargs.setdefault("adapter_names", _row_names(rows.groups, x.shape[0]))
        return type(self).forward(self, x, *args, **kwargs)
    result = F.linear(x, weight, bias)
    dtype = result.dtype
    if rows.groups is None:
        lora = adapters.get(rows.single)
        if lora is None:  # an adapter this layer does not have: peft skips it too
            return result
        a, a_bias, b, b_bias, scaling = lora
        x = x if x.dtype == a.dtype else x.to(a.dtype)
        return (result + F.linear(F.linear(x, a, a_bias), b, b_bias) * scaling).to(dtype)
    for name, index in rows.groups:
        lora = adapters.get(name)
        if lora is None:
            continue
        a, a_bias, b, b_bias, scaling = lora
        sub = x[index].to(a.dtype)
        result[index] += (F.linear(F.linear(sub, a, a_bias), b, b_bias) * scaling).to(dtype)
    return result


def _routable(layer: Any, adapters: dict[str, Any], names: list[str]) -> bool:
    """The layer's adapters `names` are those routed (same A weights, none added or deleted since),
    none is a variant, and peft would cast the input as the routed forward does."""
    present = layer._modules["lora_A"]._modules
    for name in names:
        module, routed = present.get(name), adapters.get(name)
        if module is None and routed is None:
            continue  # neither has it: peft skips it, and so does the routed forward
        if module is None or routed is None or module._parameters["weight"] is not routed[0]:
            return False
    return getattr(layer, "cast_input_dtype_enabled", True)


def _row_names(groups: list[tuple[str, Any]], rows: int) -> list[str]:
    names = [""] * rows
    for name, index in groups:
        for i in index.tolist():
            names[i] = name
    return names
