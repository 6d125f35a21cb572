"""Shared fixtures: a tiny base model built once per session from the shipped sample text."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests always use their own SQLite registry

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "src" / "ctloop" / "quickstart"


def quickstart_rows(name: str, limit: int | None = None) -> list[bytes]:
    lines = (QUICKSTART / name).read_bytes().splitlines()
    return lines[:limit] if limit else lines


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Llama + BPE tokenizer pre-trained for a few steps (seconds, no download)."""
    import torch

    from ctloop.training.tinymodel import TinyModelSpec, build_tiny_model

    torch.set_num_threads(1)
    texts = [
        json.loads(line)["prompt"] + json.loads(line)["completion"] for line in quickstart_rows("pretrain.jsonl", 1500)
    ]
    spec = TinyModelSpec(
        vocab_size=512,
        hidden_size=32,
        layers=2,
        heads=2,
        intermediate_size=64,
        max_positions=128,
        pretrain_steps=40,
        batch_rows=32,
    )
    return build_tiny_model(texts, tmp_path_factory.mktemp("tiny-base"), spec)
