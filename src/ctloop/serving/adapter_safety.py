"""Loading an adapter must never change the base model every other adapter is served from.

peft runs some LoRA initialisations against the base weights themselves: PiSSA, OLoRA, LoftQ and
CorDA subtract their initial low-rank part from the base layer, layer replication rebuilds the
base model's layer stack, and `modules_to_save` swaps whole base modules for trained copies. An
adapter folder whose `adapter_config.json` asks for any of these, loaded next to the champion,
changes the champion's answers for every user. So, for every adapter the in-process backend loads
(from the registry or from a folder):

1. `checked_lora_config` refuses, before anything is allocated, any config that would touch the
   base (naming the field) or whose rank is over `serve.max_lora_rank`;
2. the adapter is created with `init_lora_weights=False` on the meta device and only its saved
   LoRA weights are loaded into it (no initialisation runs at all, and copies of base layers in the
   file are ignored); a LoRA weight missing from the file is an error, never a random matrix;
3. `BaseFingerprint`, taken when the server starts, is compared after every load and unload: a
   base that changed anyway is reloaded from disk and the server reports the incident.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctloop.errors import ModelError

SAFE_INIT = (True, False, "gaussian")  # these initialise the adapter's own A and B only
_CHUNK = 1 << 22  # elements per float64 partial sum: bounded extra memory whatever the tensor


class UnsafeAdapter(ModelError):
    """An adapter config that would modify the shared base model, or that is over a configured cap."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def checked_lora_config(adapter_dir: Path, max_rank: int) -> Any:
    """The adapter's LoraConfig, made safe to load next to others: every field that would modify the
    base is refused (UnsafeAdapter naming it), and `init_lora_weights` is set to False (the saved
    weights replace the initial ones anyway)."""
    from peft import LoraConfig

    path = adapter_dir / "adapter_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsafeAdapter(f"{path} is not readable JSON ({exc.__class__.__name__})", "adapter_config.json") from None
    if not isinstance(raw, dict):
        raise UnsafeAdapter(f"{path} must hold a JSON object", "adapter_config.json")
    problems = _problems(raw, max_rank)
    if problems:
        field, why = problems[0]
        more = f" (and {len(problems) - 1} more: {', '.join(f for f, _ in problems[1:])})" if len(problems) > 1 else ""
        raise UnsafeAdapter(f"adapter_config.json: {field} {why}{more}", field)
    known = {k: v for k, v in raw.items() if k in LoraConfig.__dataclass_fields__}
    try:
        config = LoraConfig(**known)
    except (TypeError, ValueError) as exc:
        raise UnsafeAdapter(
            f"adapter_config.json is not a valid LoRA config: {exc}"[:400], "adapter_config.json"
        ) from None
    config.init_lora_weights = False
    config.inference_mode = True
    return config


def _problems(raw: dict[str, Any], max_rank: int) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if raw.get("peft_type", "LORA") != "LORA":
        problems.append(("peft_type", f"is {raw.get('peft_type')!r}; only LORA adapters are served"))
    init = raw.get("init_lora_weights", True)
    if init not in SAFE_INIT:
        problems.append(
            (
                "init_lora_weights",
                f"is {str(init)[:40]!r}, an initialisation that rewrites the base model's weights; "
                f"save the adapter with init_lora_weights true, false or 'gaussian'",
            )
        )
    for field, why in (
        ("layer_replication", "rebuilds the base model's layer stack"),
        ("modules_to_save", "replaces whole base modules with trained copies"),
        ("trainable_token_indices", "replaces rows of the base model's embeddings"),
    ):
        if raw.get(field):
            problems.append((field, f"is set: it {why}, which every other adapter would see; remove it"))
    ranks = [raw.get("r", 8), *dict(raw.get("rank_pattern") or {}).values()]
    if any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in ranks):
        problems.append(("r", "must be a positive integer (so must every rank_pattern value)"))
    elif max(ranks) > max_rank:
        problems.append(
            (
                "r",
                f"is {max(ranks)}, over serve.max_lora_rank={max_rank}; raise serve.max_lora_rank or use a lower rank",
            )
        )
    return problems


def add_empty_adapter(network: Any, base: Any, name: str, config: Any) -> Any:
    """Add adapter `name` from `config` to `network` (a PeftModel; None wraps `base` in one), its
    weights on the meta device: no initialisation runs. Returns the PeftModel."""
    from peft import PeftModel

    if network is None:
        return PeftModel(base, config, adapter_name=name, low_cpu_mem_usage=True).eval()
    network.add_adapter(name, config, low_cpu_mem_usage=True)
    return network


def fill_adapter(network: Any, adapter_dir: Path, name: str) -> None:
    """Load adapter `name`'s saved LoRA weights, and nothing else: a file may also hold copies of
    base layers (peft saves the embeddings when they carry LoRA), and loading those would overwrite
    (and untie) the shared base's weights. Every LoRA weight must come from the file: one still on
    the meta device means the file lacked it, which is an error, never a random matrix."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    device = next((p.device for p in network.parameters() if not p.is_meta), None)
    weights = load_peft_weights(str(adapter_dir), device=str(device) if device is not None else None)
    lora_only = {key: value for key, value in weights.items() if "lora_" in key}
    set_peft_model_state_dict(network, lora_only, adapter_name=name, low_cpu_mem_usage=True)
    missing = [key for key, p in network.named_parameters() if f".{name}." in f"{key}." and p.is_meta]
    if missing:
        raise ModelError(
            f"the adapter files in {adapter_dir} lack {len(missing)} of the weights their config declares "
            f"(first: {missing[0]}); re-save the adapter"
        )


@dataclass(frozen=True)
class BaseFingerprint:
    """Per base parameter (LoRA parameters left out, peft's `.base_layer` folded away): its shape,
    dtype, and float64 sums of its values and of their squares. Any change peft could make to the
    base (an initialisation subtracted, layers added or removed, a module swapped) changes it."""

    tensors: dict[str, tuple[tuple[int, ...], str, float, float]]

    @classmethod
    def of(cls, model: Any) -> BaseFingerprint:
        import torch

        tensors = {}
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "lora_" in key:
                    continue
                flat = parameter.detach().reshape(-1)
                total = squares = 0.0
                for start in range(0, flat.numel(), _CHUNK):
                    chunk = flat[start : start + _CHUNK].to(torch.float64)
                    total += float(chunk.sum())
                    squares += float(chunk.square().sum())
                tensors[key.replace(".base_layer", "")] = (tuple(parameter.shape), str(parameter.dtype), total, squares)
        return cls(tensors)

    def differences(self, other: BaseFingerprint) -> list[str]:
        """The parameters that differ (added, removed, reshaped or changed), at most a few named."""
        changed = sorted(set(self.tensors) ^ set(other.tensors))
        changed += sorted(k for k in set(self.tensors) & set(other.tensors) if self.tensors[k] != other.tensors[k])
        return changed
