"""vLLM's runtime LoRA API on `ctloop serve`: POST /v1/load_lora_adapter and
/v1/unload_lora_adapter, behind the admin token, with vLLM's request shape, so a ctloop server is a
publish target like a vLLM replica.

A `lora_name` is always `<name>-v<N>`, and that name always means registry version N's weights:
the server loads them from the registry. A `lora_path` (what a vLLM client sends) must lie inside
one of `serve.adapter_roots` once resolved (symlinks and `..` included) and hold the same adapter
files as version N, or the request gets 400; a version the registry does not hold (yet) gets 404,
so no folder can squat on the name of a version that is still to come.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from ctloop.fileio import adapter_digest


class LoadAdapterBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM clients may send load_inplace and the like

    lora_name: StrictStr = Field(min_length=1, max_length=200)
    lora_path: StrictStr | None = Field(None, max_length=4096)


class UnloadAdapterBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: StrictStr = Field(min_length=1, max_length=200)


class AdapterRequestError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def version_of(lora_name: str, model_name: str) -> int:
    match = re.fullmatch(rf"{re.escape(model_name)}-v(\d{{1,9}})", lora_name)
    if match is None:
        raise AdapterRequestError(
            f"lora_name {lora_name[:80]!r} is not '{model_name}-v<N>'; ctloop serves registry versions under "
            f"their immutable names",
            "lora_name",
        )
    return int(match.group(1))


def confined_path(lora_path: str, roots: list[Path]) -> Path:
    """The adapter folder, if it lies inside an allowed root; else AdapterRequestError."""
    if not roots:
        raise AdapterRequestError(
            "this server loads adapters from its registry only: omit lora_path, or list the folders it may "
            "read in serve.adapter_roots",
            "lora_path",
        )
    if "\x00" in lora_path:
        raise AdapterRequestError("lora_path holds a NUL character", "lora_path")
    try:
        resolved = Path(lora_path).resolve()
        inside = any(resolved.is_relative_to(root.resolve()) for root in roots)
        has_adapter = inside and (resolved / "adapter_config.json").is_file()
    except (OSError, ValueError) as exc:
        raise AdapterRequestError(f"lora_path cannot be read ({exc.__class__.__name__})", "lora_path") from None
    if not inside:
        raise AdapterRequestError(
            f"lora_path {lora_path[:200]!r} is outside serve.adapter_roots ({', '.join(str(r) for r in roots)})",
            "lora_path",
        )
    if not has_adapter:
        raise AdapterRequestError(f"lora_path {lora_path[:200]!r} holds no adapter_config.json", "lora_path")
    escaping = [
        p.name
        for p in resolved.iterdir()
        if p.is_symlink() and not any(p.resolve().is_relative_to(root.resolve()) for root in roots)
    ]
    if escaping:
        raise AdapterRequestError(
            f"lora_path {lora_path[:200]!r} holds symlinks that leave serve.adapter_roots ({', '.join(escaping[:3])})",
            "lora_path",
        )
    return resolved


def require_same_adapter(folder: Path, registered: Path, version: int) -> None:
    """AdapterRequestError unless `folder` holds exactly registry version `version`'s adapter files."""
    theirs, ours = adapter_digest(folder), adapter_digest(registered)
    if theirs != ours:
        differing = sorted(n for n in set(theirs) | set(ours) if theirs.get(n) != ours.get(n))
        raise AdapterRequestError(
            f"lora_path holds other adapter files than registry version {version} ({', '.join(differing)} "
            f"differ): a <name>-v<N> name always means the registry's weights; omit lora_path to load them",
            "lora_path",
        )
