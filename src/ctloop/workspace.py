"""The workspace folder every command works on: registry database, artifacts, replay buffer, cycles.

Layout (all under one root, `./ctloop-workspace` by default):
    mlflow.db          MLflow tracking + registry (SQLite), unless a tracking URI is configured
    mlartifacts/       MLflow artifact store
    replay/            the replay buffer: one Parquet file per past cycle
    cycles/<id>/       everything one cycle produced: reports, data splits, adapter, manifest
    base-models/       base models the demo builds and caches
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctloop.config import DEFAULT_WORKSPACE, CtloopConfig


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

    def create(self) -> Workspace:
        for folder in (self.root, self.replay_dir, self.cycles_dir, self.artifacts_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def resolve_workspace(cli_value: Path | None, config: CtloopConfig | None = None) -> Workspace:
    """--workspace wins, then the config's `workspace`, then ./ctloop-workspace."""
    chosen = cli_value or (config.workspace if config else None) or DEFAULT_WORKSPACE
    return Workspace(Path(chosen).expanduser().resolve())


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
