"""The fused kernels switched on for one training, and off again afterwards.

`training_kernels` is the one place that changes anything outside ctloop's own objects: it
switches the model's LoRA layers (and on CPU its RMSNorms) to fused forwards, and on CPU routes
transformers' rotary-embedding function through the fused one. On exit every switch is undone,
even after an error. The rotary switch is process-wide (it replaces a function in transformers'
modeling modules), so a second training in the same process while one runs is refused.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from ctloop.errors import ModelError
from ctloop.kernels.fused import _rms_norm_forward, fuse_rms_norms, fused_rotary
from ctloop.kernels.lora import _fused_forward, fuse_lora_layers

_one_training = threading.Lock()


@contextlib.contextmanager
def training_kernels(model: Any, *, cpu: bool, activation_dtype: Any) -> Iterator[None]:
    """Within the block, `model` trains with the fused kernels; afterwards it and transformers are as
    they were. Raises ModelError when another training in this process holds them."""
    if not _one_training.acquire(blocking=False):
        raise ModelError(
            "another training is running in this process; ctloop trains one adapter per process "
            "at a time (its CPU kernels patch transformers' modeling modules while it runs): "
            "wait for it, or train in a separate process"
        )
    try:
        fuse_lora_layers(model)
        if cpu:  # measured on CPU; GPUs keep transformers' own (or hub) kernels
            fuse_rms_norms(model, activation_dtype=activation_dtype)
        with fused_rotary(model) if cpu else contextlib.nullcontext():
            yield
    finally:
        _restore_forwards(model, {_fused_forward, _rms_norm_forward})
        _one_training.release()


def _restore_forwards(model: Any, switched_to: set[Any]) -> None:
    """Give every module whose forward was switched to one of `switched_to` its class's forward back."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) in switched_to:
            del module.forward
