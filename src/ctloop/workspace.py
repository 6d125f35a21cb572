"""The workspace folder every command works on: registry database, artifacts, replay buffer, cycles.

Layout (all under one root, `./ctloop-workspace` by default):
    mlflow.db          MLflow tracking + registry (SQLite), unless a tracking URI is configured
    mlartifacts/       MLflow artifact store
    replay/            the replay buffer: one Parquet file per past cycle
    cycles/<id>/       everything one cycle produced: reports, data splits, adapter, manifest
    base-models/       base models the demo builds and caches
    shadow.db          the shadow log (SQLite), unless shadow.store_url is configured
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ctloop.config import (
    DEFAULT_WORKSPACE,
    CtloopConfig,
    JudgeConfig,
    ModelConfig,
    PublishConfig,
    RegistryConfig,
    ShadowConfig,
)
from ctloop.fileio import read_json, utc_now, write_json


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def replay_dir(self) -> Path:
        return self.root / "replay"

    @property
    def cycles_dir(self) -> Path:
        return self.root / "cycles"

    @property
    def base_models_dir(self) -> Path:
        return self.root / "base-models"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "mlartifacts"

    def cycle_dir(self, cycle_id: str) -> Path:
        return self.cycles_dir / cycle_id

    def tracking_uri(self, configured: str | None = None) -> str:
        """Configured URI, else MLFLOW_TRACKING_URI, else the SQLite file in this workspace."""
        return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    def shadow_store_url(self, configured: str | None = None) -> str:
        """Configured SQLAlchemy URL of the shadow log, else SQLite in this workspace."""
        return configured or f"sqlite:///{self.root / 'shadow.db'}"

    def create(self) -> Workspace:
        for folder in (self.root, self.replay_dir, self.cycles_dir, self.artifacts_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self


SETTINGS_FILE = "ctloop.json"


def save_settings(workspace: Workspace, config: CtloopConfig) -> None:
    """Keep the registry, shadow and publish settings of the last cycle, so later commands need no --config."""
    write_json(
        workspace.root / SETTINGS_FILE,
        {
            "registry": config.registry.model_dump(mode="json"),
            "shadow": config.shadow.model_dump(mode="json"),
            "publish": config.publish.model_dump(mode="json"),
            "judge": config.judge.model_dump(mode="json"),
            "model": config.model.model_dump(mode="json"),
        },
    )


def saved_registry_settings(workspace: Workspace) -> RegistryConfig:
    """The registry settings the workspace's last cycle used."""
    return RegistryConfig(**_saved_settings(workspace).get("registry", {}))


def saved_shadow_settings(workspace: Workspace) -> ShadowConfig:
    """The shadow settings of the workspace's last cycle."""
    return ShadowConfig(**_saved_settings(workspace).get("shadow", {}))


def saved_judging_settings(workspace: Workspace) -> tuple[JudgeConfig, ModelConfig | None]:
    """The judge settings and the model (for the likelihood judge) of the workspace's last cycle."""
    saved = _saved_settings(workspace)
    return JudgeConfig(**saved.get("judge", {})), ModelConfig(**saved["model"]) if "model" in saved else None


def saved_publish_settings(workspace: Workspace) -> PublishConfig:
    """The publish targets of the workspace's last cycle."""
    return PublishConfig(**_saved_settings(workspace).get("publish", {}))


def _saved_settings(workspace: Workspace) -> dict:
    from ctloop.errors import WorkspaceError

    if not workspace.root.is_dir():
        raise WorkspaceError(
            f"no workspace at {workspace.root}; run `ctloop demo` or `ctloop run` first, or pass --workspace"
        )
    path = workspace.root / SETTINGS_FILE
    return read_json(path) if path.is_file() else {}


def resolve_workspace(cli_value: Path | None, config: CtloopConfig | None = None) -> Workspace:
    """--workspace wins, then the config's `workspace`, then ./ctloop-workspace."""
    chosen = cli_value or (config.workspace if config else None) or DEFAULT_WORKSPACE
    return Workspace(Path(chosen).expanduser().resolve())


_held_locks: dict[Path, int] = {}  # lock path -> nesting depth in this process


@contextmanager
def workspace_lock(workspace: Workspace, purpose: str, wait_seconds: float = 0.0) -> Iterator[None]:
    """Hold the workspace's lock (an OS file lock, so a crashed holder releases it by dying).

    A second cycle on the same workspace waits up to `wait_seconds`, then fails with a message
    naming the holder. Re-entrant within one process (run_cycle holds it across its stages)."""
    import fcntl
    import socket
    import time

    from ctloop.errors import WorkspaceError

    workspace.root.mkdir(parents=True, exist_ok=True)
    path = workspace.root / ".lock"
    if _held_locks.get(path):
        _held_locks[path] += 1
        try:
            yield
        finally:
            _held_locks[path] -= 1
        return
    handle = path.open("a+")
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise WorkspaceError(
                    f"workspace {workspace.root} is busy: {holder}; wait for it to finish, or use another --workspace"
                ) from None
            time.sleep(0.5)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {utc_now()}: {purpose}\n")
    handle.flush()
    _held_locks[path] = 1
    try:
        yield
    finally:
        _held_locks.pop(path, None)
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
