"""One continuous-training cycle, top to bottom:

    validate -> drift trigger -> split + replay mix -> train -> evaluate -> gate -> register

Each step is a stage function in `stages.py` that reads and writes the cycle's folder
(`cycles/<id>/`), so the Airflow DAG runs the same code task by task. The cycle id is a hash of
the validated data's fingerprint, the config and the base model revision: a repeated cycle finds
its folder and does nothing; an interrupted one resumes (a trained adapter is not trained again,
the registry gains no duplicate version). The workspace lock keeps two cycles apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ctloop.config import CtloopConfig, RegistryConfig, ShadowConfig
from ctloop.console import console
from ctloop.errors import WorkspaceError
from ctloop.stages import (FINISHED, SETTINGS_FILE, CycleFolder, evaluate_stage, gate_stage, open_registry,
                           prepare_stage, register_stage, train_stage, trigger_stage, validate_stage)
from ctloop.workspace import Workspace, read_json, workspace_lock

__all__ = ["CycleResult", "run_cycle", "finished_result", "open_registry", "registry_settings"]


@dataclass(frozen=True)
class CycleResult:
    cycle_id: str
    status: str  # "registered", "rejected", "inconclusive", "skipped" or "already_done"
    cycle_dir: str
    run_id: str
    version: int | None
    champion_before: int | None
    means: dict[str, dict[str, float]] = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    trigger: str = ""

    @property
    def trained(self) -> bool:
        return self.status in FINISHED

    @property
    def passed(self) -> bool:
        return bool(self.gate.get("passed"))

    def summary(self) -> str:
        if self.status == "skipped":
            return f"cycle {self.cycle_id}: skipped, not trained - {self.trigger}"
        where = f"version {self.version}" if self.version else "not registered"
        return f"cycle {self.cycle_id}: {self.status} ({where}); gate {self.gate.get('outcome', '?')}"

    def to_dict(self) -> dict:
        return asdict(self)


def run_cycle(config: CtloopConfig, data_path: Path, workspace: Workspace, force: bool = False,
              wait_seconds: float = 0.0) -> CycleResult:
    """Run one cycle on the records in `data_path`. `force` trains even when the trigger (drift,
    schedule) sees no need; `wait_seconds` is how long to wait for a busy workspace."""
    with workspace_lock(workspace, f"ctloop run on {data_path}", wait_seconds):
        cycle_id = validate_stage(config, data_path, workspace)
        done = finished_result(config, workspace, cycle_id)
        if done is not None:
            console.print(f"cycle {cycle_id} already ran on this data and config: nothing to do")
            return done
        decision = trigger_stage(config, workspace, cycle_id, force=force)
        cycle = CycleFolder(workspace, cycle_id)
        if not decision.train:
            return CycleResult(cycle_id, "skipped", str(cycle.dir), "", None, None,
                               validation=read_json(cycle.path("validation.json")), trigger=decision.reason)
        prepare_stage(config, workspace, cycle_id)
        registry = open_registry(config.registry, workspace)
        try:
            train_stage(config, workspace, cycle_id)
            evaluate_stage(config, workspace, cycle_id)
            gate_stage(config, workspace, cycle_id)
            return CycleResult(**register_stage(config, workspace, cycle_id))
        except BaseException:
            registry.end_run(cycle.state()["run_id"], "FAILED")  # a retry resumes this run
            raise


def finished_result(config: CtloopConfig, workspace: Workspace, cycle_id: str) -> CycleResult | None:
    """The cycle's result when it already finished here, or registered from elsewhere; else None."""
    cycle = CycleFolder(workspace, cycle_id)
    state = cycle.state()
    if state.get("status") in FINISHED:
        return CycleResult(**{**state["result"], "status": "already_done"})
    if "run_id" not in state:
        done = open_registry(config.registry, workspace).find_by_cycle_key(cycle_id)
        if done is not None:  # registered from another workspace, or this one was lost and recreated
            return CycleResult(cycle_id, "already_done", str(cycle.dir), done.run_id, done.version, None)
    return None


def registry_settings(workspace: Workspace) -> RegistryConfig:
    """The registry settings the workspace's last cycle used, so commands need no --config."""
    return RegistryConfig(**_saved_settings(workspace).get("registry", {}))


def shadow_settings(workspace: Workspace) -> ShadowConfig:
    """The shadow settings of the workspace's last cycle, so `ctloop shadow report` needs no --config."""
    return ShadowConfig(**_saved_settings(workspace).get("shadow", {}))


def _saved_settings(workspace: Workspace) -> dict:
    if not workspace.root.is_dir():
        raise WorkspaceError(f"no workspace at {workspace.root}; run `ctloop demo` or `ctloop run` first, "
                             f"or pass --workspace")
    path = workspace.root / SETTINGS_FILE
    return read_json(path) if path.is_file() else {}
