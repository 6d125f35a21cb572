"""Shared fixtures: a tiny base model built once per session from the shipped sample text."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
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


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def postgres_database(prefix: str = "t") -> Iterator[str]:
    """A fresh, empty database on the PostgreSQL that `make test` starts (scripts/with_postgres.sh),
    dropped afterwards; the test skips (CI: fails, see the script) without one."""
    url = os.environ.get("CTLOOP_TEST_POSTGRES_URL")
    if url is None:
        pytest.skip("no PostgreSQL: run the tests through `make test` (scripts/with_postgres.sh starts one)")
    import uuid

    from sqlalchemy import create_engine, text

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)  # survives a restarted server
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def log_store_url(request, tmp_path) -> Iterator[str]:
    """A fresh, empty log store of each kind: SQLite in a temp folder, and PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'logs.db'}"
        return
    with postgres_database() as url:
        yield url
