"""Loading the base model and its tokenizer, and naming the base model's exact revision.

Used by training, evaluation, the drift embedder and the serving backends alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ctloop.config import ModelConfig
from ctloop.errors import ModelError


def load_tokenizer(config: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    with _explained_load_errors(config):
        tokenizer = AutoTokenizer.from_pretrained(config.base, revision=config.revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(config: ModelConfig, device: str | None = None) -> Any:
    """The base model on `device` (default: `model_device(config)`), with torch's CPU threads set
    for the stage about to run it (`ctloop.threads`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ctloop.kernels import attention as cpu_attention
    from ctloop.threads import use_threads

    use_threads(config.threads)
    device = device or model_device(config)
    quiet_transformers()
    if config.attn_implementation == cpu_attention.NAME:
        cpu_attention.register()
    extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    with _explained_load_errors(config):
        model = AutoModelForCausalLM.from_pretrained(
            config.base, revision=config.revision, dtype=getattr(torch, config.dtype), **extra
        )
    return model.to(device)


def model_device(config: ModelConfig) -> str:
    """`model.device` resolved: auto is the current CUDA device when torch sees one, else the CPU.
    Raises ModelError for a GPU this process cannot see."""
    import os

    import torch

    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(config.device.partition(":")[2] or 0)
        if index >= count:
            raise ModelError(
                f"model.device={config.device!r} but this process sees {count} CUDA device(s) "
                f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); set model.device: auto "
                "(the CPU when there is no GPU), cpu, or a GPU index below the count"
            )
    return config.device


CPU_BF16_MIN_HIDDEN = 512  # below this the casts cost more than AMX saves (measured: hidden 128 ran slower)


def fast_bf16_available(config: ModelConfig) -> bool:
    """bf16 matmuls that beat fp32: a CUDA device that supports bf16, or a CPU with AMX (Linux)
    and a model wide enough for its matrix units to pay off."""
    import torch
    from transformers import AutoConfig

    device = model_device(config)
    if device.startswith("cuda"):
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported()
    hidden = getattr(AutoConfig.from_pretrained(config.base, revision=config.revision), "hidden_size", 0) or 0
    if hidden < CPU_BF16_MIN_HIDDEN:
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return "amx_bf16" in handle.read()
    except OSError:
        return False


@contextmanager
def _explained_load_errors(config: ModelConfig) -> Iterator[None]:
    try:
        yield
    except OSError as exc:  # transformers raises OSError for missing folders and unreachable hub ids
        where = "local folder" if Path(config.base).is_absolute() else "local folder or hub id"
        raise ModelError(
            f"model.base={config.base!r} could not be loaded as a {where} ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}); point model.base at a folder saved with "
            f"save_pretrained, or at a hub id this machine can reach"
        ) from exc


def quiet_transformers() -> None:
    """Hide transformers' own tqdm bars and a peft/transformers deprecation warning; ctloop shows progress."""
    import warnings

    from transformers.utils import logging

    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def base_model_revision(config: ModelConfig) -> str:
    """The pinned hub revision, or for a local folder a hash of its weight files."""
    if config.revision:
        return config.revision
    folder = Path(config.base)
    if not folder.is_dir():
        return "unpinned"
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]
