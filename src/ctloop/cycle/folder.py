"""The cycle folder (`cycles/<id>/`) and what every stage is handed.

`cycle.json` in the folder records the cycle's state: its data, the trigger's reason, the MLflow
run, the champion it is compared against, a failure if one happened, and finally its status and
result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctloop.config import CtloopConfig
from ctloop.errors import WorkspaceError
from ctloop.fileio import read_json, write_json
from ctloop.workspace import Workspace

FINISHED = ("registered", "rejected", "inconclusive")  # a cycle in one of these states is never redone


@dataclass(frozen=True)
class CycleFolder:
    workspace: Workspace
    cycle_id: str

    @property
    def dir(self) -> Path:
        return self.workspace.cycle_dir(self.cycle_id)

    def path(self, name: str) -> Path:
        return self.dir / name

    def state(self) -> dict[str, Any]:
        path = self.path("cycle.json")
        return read_json(path) if path.is_file() else {}

    def update_state(self, **fields: Any) -> dict[str, Any]:
        state = self.state() | fields
        write_json(self.path("cycle.json"), state)
        return state


@dataclass(frozen=True)
class StageContext:
    """Everything a stage function gets. `cycle_id` is empty for the stage that opens the cycle
    (validate: the id is a hash of the data it validates); `data` and `force` are the run's inputs."""

    config: CtloopConfig
    workspace: Workspace
    cycle_id: str = ""
    data: Path | None = None
    force: bool = False
    stages: tuple = ()  # the declaration being run (`declaration.Stage`s); empty: `declaration.CYCLE`

    @property
    def folder(self) -> CycleFolder:
        if not self.cycle_id:
            raise WorkspaceError("this stage needs a cycle id; run the validate stage first")
        return CycleFolder(self.workspace, self.cycle_id)
