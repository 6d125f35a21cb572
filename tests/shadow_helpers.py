"""Helpers for the server tests: real LoRA adapters on the tiny model, a real MLflow registry, and a
real uvicorn server on a loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctloop.config import config_from_dict
from ctloop.registry import CHALLENGER, Registry
from ctloop.workspace import Workspace


def make_adapter(base: Path, out_dir: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights, so each version answers differently."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    lora = LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(out_dir))
    return out_dir


def serving_config(base: Path, workspace: Path, **sections) -> object:
    raw = {"workspace": str(workspace), "model": {"base": str(base)},
           "registry": {"model_name": "srv", "experiment": "srv"},
           "serve": {"poll_seconds": 0.2, "default_max_tokens": 6, "max_tokens": 32, "drain_seconds": 5},
           "shadow": {"min_pairs": 5, "embedding_similarity": False}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_dict(raw)


def register_versions(config, adapters: list[Path]) -> Registry:
    """v1 = champion, v2 = challenger, ... one MLflow run per adapter."""
    from ctloop.pipeline import open_registry

    workspace = Workspace(config.workspace).create()
    registry = open_registry(config.registry, workspace)
    for number, adapter in enumerate(adapters, start=1):
        run_id = registry.start_run(f"cycle-{number}", {"ctloop.cycle_id": f"c{number}"})
        registry.log_artifact(run_id, adapter, "adapter")
        registry.end_run(run_id)
        registry.register(run_id, f"key-{number}", {"ctloop.gate": "PASS"}, f"version {number}")
    registry.make_champion(1, by="test", note="first")
    if len(adapters) > 1:
        registry.set_alias(CHALLENGER, 2)
    return registry


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(app) -> Iterator[str]:
    """Run the app with uvicorn in a thread; yield its base URL; shut it down (lifespan included)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start (see the log above)")
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not start within 120 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
