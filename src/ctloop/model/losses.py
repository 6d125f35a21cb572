"""Per-token losses of a causal LM on a batch, computed only where labels are."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ctloop.kernels.fused import cross_entropy
from ctloop.model.batching import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

HEAD_ROWS_MULTIPLE = 128  # positions given logits are rounded up to this, so the head's matmul shapes repeat


def token_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of the labelled tokens and the label mask, both shaped [rows, width - 1].

    The model computes logits only where a label is (transformers' boolean `logits_to_keep`), not at
    prompt and padding positions, a third of the tokens in typical chat data; its own head applies,
    soft-capping or scaling included. A few unlabelled positions are added so that the count is a
    multiple of HEAD_ROWS_MULTIPLE: CPU kernels (oneDNN) then plan the head's matmul for a handful
    of shapes rather than one per batch. The loss is `ctloop.kernels.fused.cross_entropy`: no fp32 copy
    of the logits."""
    import torch
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    keep = mask.clone()
    missing = -int(mask.sum()) % HEAD_ROWS_MULTIPLE
    keep.view(-1)[(~mask).view(-1).nonzero().flatten()[:missing]] = True
    logits = model(**inputs, use_cache=False, logits_to_keep=F.pad(keep, (0, 1))).logits  # [kept, vocab]
    nll = cross_entropy(logits, targets[keep], ignore_index=IGNORE_INDEX)
    return torch.zeros(targets.shape, dtype=nll.dtype, device=nll.device).masked_scatter(keep, nll), mask
