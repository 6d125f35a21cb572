"""Train on one host, serve on another: a real `mlflow server` on a real PostgreSQL, with its
proxied artifact store on loopback. Workspace A trains (two models at once) and is deleted;
workspace B, which shares nothing with A but the tracking URI, shows status and lineage, serves the
champion, promotes and rolls back. Needs PostgreSQL (`make test` starts one; CI requires it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import free_port, postgres_database, quickstart_rows

pytestmark = pytest.mark.slow


@pytest.fixture()
def mlflow_server(tmp_path):
    with postgres_database("mlflow") as backend:
        yield from _mlflow_server(tmp_path, backend)


def _mlflow_server(tmp_path, backend: str):
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            (tmp_path / "server-artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "mlflow-server.log").read_text()
        time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(30)


def _config(tiny_base: Path, workspace: Path, uri: str, model: str) -> Path:
    raw = {
        "workspace": str(workspace),
        "model": {"base": str(tiny_base), "max_seq_tokens": 96},
        "data": {"min_rows": 20, "holdout_fraction": 0.15},
        "train": {"epochs": 1, "learning_rate": 0.01, "batch_tokens": 512},
        "gate": {"first_cycle": "accept"},
        "registry": {"model_name": model, "experiment": "multi-host", "tracking_uri": uri},
        "serve": {"default_max_tokens": 4, "poll_seconds": 0.5},
        "shadow": {"enabled": False},
    }
    path = workspace.parent / f"{workspace.name}-{model}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _ctloop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctloop", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_train_on_one_host_serve_promote_and_roll_back_from_another(mlflow_server, tiny_base, tmp_path):
    data = tmp_path / "old.jsonl"
    data.write_bytes(b"\n".join(quickstart_rows("old_domain.jsonl", 150)) + b"\n")
    host_a = tmp_path / "host-a"
    configs = [_config(tiny_base, host_a, mlflow_server, model) for model in ("alpha", "beta")]
    cycles = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ctloop",
                "run",
                "--config",
                str(c),
                "--data",
                str(data),
                "--workspace",
                str(host_a / c.stem),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for c in configs
    ]  # two models, two workspaces, one server, at the same time
    for cycle in cycles:
        _, stderr = cycle.communicate(timeout=900)
        assert cycle.returncode == 0, stderr[-3000:]
    shutil.rmtree(host_a)  # the training host is gone

    from ctloop.config import load_config
    from ctloop.registry.client import open_registry
    from ctloop.registry.promotion import champion_history
    from ctloop.serving.server import create_app, serve_in_background
    from ctloop.training.tinymodel import random_adapter
    from ctloop.workspace import Workspace

    host_b = tmp_path / "host-b"
    config_b = _config(tiny_base, host_b, mlflow_server, "alpha")
    config = load_config(config_b)
    registry = open_registry(config.registry, Workspace(host_b))
    experiment = registry.client.get_experiment_by_name("multi-host")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    for model in ("alpha", "beta"):
        other = open_registry(config.registry.model_copy(update={"model_name": model}), Workspace(host_b))
        assert [v.version for v in other.versions()] == [1] and other.alias("champion") == 1

    status = json.loads(_ctloop("status", "--json", "--config", str(config_b)).stdout)
    assert status["aliases"]["champion"] == 1 and status["tracking_uri"] == mlflow_server
    lineage = _ctloop("lineage", "1", "--config", str(config_b))
    assert lineage.returncode == 0 and "data_fingerprint" in lineage.stdout

    with serve_in_background(create_app(config, Workspace(host_b))) as url:  # downloads v1 through the server
        answer = httpx.post(
            f"{url}/v1/completions", json={"model": "alpha", "prompt": "Describe the Debian package"}, timeout=60
        )
        assert answer.status_code == 200 and answer.json()["model"] == "alpha-v1"
        adapter = random_adapter(tiny_base, tmp_path / "adapter-2", 2)
        second = registry.register_adapter_dir(adapter, "from-host-b", {"ctloop.gate": "PASS"}, "trained on B")
        promoted = _ctloop("promote", "--version", str(second.version), "--config", str(config_b))
        assert promoted.returncode == 0, promoted.stderr
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/healthz").json()["champion"] != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        answer = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": "x"}, timeout=60)
        assert answer.json()["model"] == "alpha-v2"
    rolled = _ctloop("rollback", "--config", str(config_b))
    assert rolled.returncode == 0 and registry.alias("champion") == 1 and champion_history(registry) == [1]
    assert not list(host_b.rglob("mlartifacts/*"))  # nothing went to a path on this host
