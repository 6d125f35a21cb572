"""Resumable training state on disk, without pickle.

One file, `checkpoint.safetensors`, written atomically: the adapter's and the optimizer's tensors
and the RNG state as safetensors, everything else (optimizer settings, scheduler state, progress)
as JSON in the file's metadata. Loading it can only ever produce tensors and JSON values, so a
checkpoint crafted by whoever can write into a workspace (a shared volume, a restored backup)
cannot run code on the training host, as a pickled `torch.load` could.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ctloop.errors import WorkspaceError
from ctloop.fileio import atomic_path

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # pickled by ctloop 0.1.0; never loaded
METADATA_KEY = "ctloop"

log = logging.getLogger(__name__)


def save_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any, progress: dict) -> Path:
    """Write the state needed to resume; a kill mid-write leaves the previous checkpoint intact."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {f"adapter/{k}": v for k, v in get_peft_model_state_dict(model).items()}
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng"] = torch.get_rng_state()
    if torch.cuda.is_available():  # dropout on a GPU draws from its own generator
        tensors |= {f"rng_cuda/{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    metadata = {
        "param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "progress": progress,
    }
    path = folder / CHECKPOINT
    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata={METADATA_KEY: json.dumps(metadata)},
        )
    return path


def load_checkpoint(folder: Path | None, model: Any, optimizer: Any, scheduler: Any, progress: dict) -> int:
    """Restore the last checkpoint, if any; return the step it was taken at (0: none)."""
    import torch
    from peft import set_peft_model_state_dict

    if folder is None:
        return 0
    if (folder / LEGACY_CHECKPOINT).is_file():
        log.warning(
            "ignoring %s: pickled checkpoints are never loaded (they can run code); training starts over from step 0",
            folder / LEGACY_CHECKPOINT,
        )
    path = folder / CHECKPOINT
    if not path.is_file():
        return 0
    tensors, metadata = _read(path)
    set_peft_model_state_dict(
        model, {k.removeprefix("adapter/"): v for k, v in tensors.items() if k.startswith("adapter/")}
    )
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in metadata["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [
        {**group, "betas": tuple(group["betas"])} if "betas" in group else group for group in metadata["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(metadata["scheduler"])
    torch.set_rng_state(tensors["rng"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng_cuda/")), key=lambda k: int(k.split("/")[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    progress.update(metadata["progress"])
    return int(progress["step"])


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {})[METADATA_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise WorkspaceError(
            f"{path} is not a checkpoint ctloop can read ({exc.__class__.__name__}: {exc}); "
            f"delete {path.parent} to train this cycle from the start"
        ) from None
    if "rng" not in tensors or not {"param_groups", "optimizer_scalars", "scheduler", "progress"} <= set(metadata):
        raise WorkspaceError(
            f"{path} lacks parts of the training state; delete {path.parent} to train this cycle from the start"
        )
    return tensors, metadata
