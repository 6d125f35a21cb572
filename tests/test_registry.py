"""The MLflow registry wrapper against a real MLflow with a SQLite backend in a temp folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctloop.registry.client import Registry


@pytest.fixture()
def registry(tmp_path) -> Registry:
    return Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", "adapter", "exp", tmp_path / "artifacts")


def run_with_adapter(registry: Registry, tmp_path: Path, name: str) -> str:
    adapter = tmp_path / f"adapter-{name}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"name": name}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights-" + name.encode())
    run_id = registry.start_run(f"cycle-{name}", {"ctloop.cycle_id": name})
    registry.log_artifact(run_id, adapter, "adapter")
    registry.end_run(run_id)
    return run_id


def test_register_is_idempotent_on_the_cycle_key(registry, tmp_path):
    run_id = run_with_adapter(registry, tmp_path, "a")
    first = registry.register(run_id, "key-a", {"ctloop.data_fingerprint": "f1"}, "first")
    again = registry.register(run_id, "key-a", {"ctloop.data_fingerprint": "f1"}, "first")
    assert first.version == again.version == 1
    assert [v.version for v in registry.versions()] == [1]
    assert registry.versions()[0].tags["ctloop.data_fingerprint"] == "f1"


def test_artifacts_go_to_the_configured_location_not_the_cwd(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_with_adapter(registry, tmp_path, "a")
    assert not (tmp_path / "mlruns").exists()
    assert list((tmp_path / "artifacts").rglob("adapter_config.json"))


def test_download_adapter_fetches_the_registered_files(registry, tmp_path):
    registry.register(run_with_adapter(registry, tmp_path, "a"), "key-a", {}, "a")
    local = registry.download_adapter(1, tmp_path / "cache")
    assert (local / "adapter_model.safetensors").read_bytes() == b"weights-a"
    assert registry.download_adapter(1, tmp_path / "cache") == local  # cached
