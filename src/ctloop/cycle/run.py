"""Running a cycle: every stage of `declaration.CYCLE` in order (`run_cycle`, for `ctloop run`),
or one stage by itself (`run_stage`, for an orchestrator's task). Both share the same rules:

- A stage gets the artifacts its function takes, loaded from the cycle folder (a missing one
  names the stage to run first), and what it returns is saved there.
- A stage declared `reused_when_saved` (train, evaluate) whose artifacts are all in the folder
  already is not run again: a resumed cycle re-uses its adapter and its evaluation. The others
  run again (they are cheap, and their inputs may have changed).
- A finished cycle is never redone: the same data and config find their folder and stop.
- The deciding stage's "no" ends the cycle as skipped, not failed; the closing stage's record
  marks it finished.
- A stage that fails marks the cycle's MLflow run FAILED and records the stage and the error in
  `cycle.json`; running the cycle again resumes from the finished stages.

The cycle id is a hash of the validated data's fingerprint, the config and the base model
revision. The workspace lock keeps two cycles apart.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ctloop.config import CtloopConfig
from ctloop.console import console
from ctloop.cycle.artifacts import (
    Artifact,
    Decides,
    Evaluation,
    GateResult,
    Opens,
    Registration,
    Validated,
    require,
)
from ctloop.cycle.declaration import CYCLE, HARVEST, Stage, check_cycle, writer_of
from ctloop.cycle.folder import FINISHED, CycleFolder, StageContext
from ctloop.fileio import read_json, utc_now
from ctloop.registry.client import open_registry
from ctloop.training.trainer import is_main_process
from ctloop.workspace import Workspace, workspace_lock

log = logging.getLogger(__name__)


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

    @classmethod
    def finished(cls, folder: CycleFolder, artifacts: dict[type, Artifact]) -> CycleResult:
        """The result of a cycle its closing stage has just recorded, from the artifacts the stage
        read and wrote (its Registration; the evaluation, gate and validation when it read them)."""
        state = folder.state()
        registration = typing.cast(Registration, artifacts[Registration])
        evaluation = typing.cast(Evaluation | None, artifacts.get(Evaluation))
        gate = typing.cast(GateResult | None, artifacts.get(GateResult))
        validated = typing.cast(Validated | None, artifacts.get(Validated))
        return cls(
            folder.cycle_id,
            registration.status,
            str(folder.dir),
            registration.run_id,
            registration.version,
            state.get("champion_before"),
            means=evaluation.report.means if evaluation else {},
            gate=gate.decision.to_dict() if gate else {},
            validation=validated.report.to_dict() if validated else {},
            trigger=state.get("trigger", ""),
        )


@dataclass(frozen=True)
class StageStep:
    """What running one stage left: the cycle's id, and whether the cycle goes on."""

    cycle_id: str
    proceed: bool
    stopped_because: str = ""  # "already_done" or "skipped" when proceed is False
    data: str = ""  # what a sources stage (harvest) produced: the records file validate takes


def run_cycle(
    config: CtloopConfig,
    data_path: Path | None,
    workspace: Workspace,
    force: bool = False,
    wait_seconds: float = 0.0,
    from_production: bool = False,
    cycle: tuple[Stage, ...] | None = None,
) -> CycleResult:
    """Run one cycle on the records in `data_path`, or (`from_production`) on what the harvest of
    `orchestration.production_window` yields. `force` trains even when the trigger (drift,
    schedule) sees no need; `wait_seconds` is how long to wait for a busy workspace. `cycle`: the
    stages to run, `declaration.CYCLE` unless given (a checked declaration of your own)."""
    if cycle is not None:
        check_cycle(cycle)
    declared = cycle or CYCLE
    stages = (HARVEST, *declared) if from_production else declared
    context = StageContext(config, workspace, data=data_path, force=force, stages=declared)
    where = "production's feedback" if from_production else data_path
    with workspace_lock(workspace, f"ctloop run on {where}", wait_seconds):
        for stage in stages:
            step = run_stage(stage, context)
            data = Path(step.data) if step.data else context.data
            context = StageContext(config, workspace, step.cycle_id, data, force, declared)
            if not step.proceed:
                break
        return cycle_result(config, workspace, context.cycle_id, already_done=step.stopped_because == "already_done")


def run_stage(stage: Stage, context: StageContext) -> StageStep:
    """Run one stage of the cycle with the cycle's rules (see the module docstring). The caller
    holds the workspace lock. The declaration the stage belongs to (`context.stages`, `CYCLE` when
    empty) names the stage to run first when an artifact is missing."""
    if stage.role == "sources":
        return StageStep("", True, data=str(stage.run(context, {})))
    if stage.role != "opens" and _already_finished(stage, context):
        return StageStep(context.cycle_id, False, "already_done")
    log.info("stage %s of cycle %s", stage.name, context.cycle_id or "(new)")
    try:
        if stage.reused_when_saved and all(a.present(context.folder.dir) for a in stage.writes):
            console.print(f"stage {stage.name}: re-using what an earlier attempt of cycle {context.cycle_id} saved")
            return StageStep(context.cycle_id, True)
        inputs = _load_inputs(stage, context)
        returned = stage.run(context, inputs)
        outputs = typing.cast(tuple[Artifact, ...], returned if isinstance(returned, tuple) else (returned,))
        cycle_id = typing.cast(Opens, outputs[0]).cycle_id if stage.role == "opens" else context.cycle_id
        folder = CycleFolder(context.workspace, cycle_id)
        if is_main_process():  # under torchrun, one process writes
            for artifact in outputs:
                artifact.save(folder.dir)
            if stage.role == "closes":
                _finish(folder, outputs, inputs)
    except BaseException as exc:
        _record_failure(context, stage, exc)
        raise
    if stage.role == "opens":
        if finished_result(context.config, context.workspace, cycle_id):
            console.print(f"cycle {cycle_id} already ran on this data and config: nothing to do")
            return StageStep(cycle_id, False, "already_done")
        return StageStep(cycle_id, True)
    if stage.role == "decides" and not typing.cast(Decides, outputs[0]).proceed:
        return StageStep(context.cycle_id, False, "skipped")
    return StageStep(context.cycle_id, True)


def _load_inputs(stage: Stage, context: StageContext) -> dict[str, Artifact]:
    """The artifacts the stage's function takes, from the cycle folder."""
    if not stage.reads:
        return {}
    folder = context.folder.dir
    for artifact in stage.reads.values():
        require(artifact, folder, writer_of(artifact, context.stages or CYCLE))
    return {name: artifact.load(folder) for name, artifact in stage.reads.items()}


def _finish(folder: CycleFolder, outputs: tuple[Artifact, ...], inputs: dict[str, Artifact]) -> None:
    """Mark the cycle finished with its result, once the closing stage's record is saved."""
    result = CycleResult.finished(folder, {type(a): a for a in (*inputs.values(), *outputs)})
    folder.update_state(status=result.status, finished=utc_now(), result=result.to_dict())


def run_stage_task(
    config_path: str | Path,
    stage_name: str,
    cycle_id: str = "",
    data: str | None = None,
    force: bool = False,
    purpose: str = "orchestrated task",
    task_tags: dict[str, str] | None = None,
) -> StageStep:
    """One stage as an orchestrator's task runs it (the Airflow DAGs): load the config, take the
    workspace lock (waiting up to `orchestration.lock_wait_seconds`), run the stage with the
    cycle's rules. `data` defaults to `orchestration.data`.

    Once the cycle has its MLflow run (from the prepare stage on), each task names the run in its
    log, and `task_tags` (the orchestrator's ids: DAG, DAG run) go on the run, so each side links
    to the other."""
    from ctloop.config import load_config
    from ctloop.console import print_to_stdout
    from ctloop.cycle.declaration import stage
    from ctloop.errors import ConfigError
    from ctloop.logs import apply_process_defaults
    from ctloop.workspace import resolve_workspace

    apply_process_defaults()  # a task process is ctloop's, as the CLI's is
    print_to_stdout()  # the task log's INFO lines, not its ERROR lines
    config = load_config(config_path)
    chosen = stage(stage_name)
    if not data and config.orchestration.source != "production" and config.orchestration.data:
        data = str(config.orchestration.data)
    if chosen.role == "opens" and not data:
        raise ConfigError(
            str(config_path),
            ['orchestration.data: no data file; set it, or trigger the run with conf {"data": "/path/to/new.jsonl"}'],
        )
    workspace = resolve_workspace(None, config)
    context = StageContext(config, workspace, cycle_id, Path(data) if data else None, force)
    with workspace_lock(workspace, f"{purpose}: {stage_name}", config.orchestration.lock_wait_seconds):
        step = run_stage(chosen, context)
    run_id = CycleFolder(workspace, step.cycle_id).state().get("run_id") if step.cycle_id else None
    if run_id:
        _link_task_and_run(config, workspace, run_id, stage_name, task_tags or {})
    return step


def _link_task_and_run(
    config: CtloopConfig, workspace: Workspace, run_id: str, stage_name: str, tags: dict[str, str]
) -> None:
    """The task log names the cycle's MLflow run; the run carries the orchestrator's ids. Best
    effort: the stage's work is done, and a registry that does not answer now must not fail it."""
    from ctloop.errors import CtloopError

    try:
        registry = open_registry(config.registry, workspace)
        if tags:
            registry.set_run_tags(run_id, tags)
        console.print(f"stage {stage_name}: MLflow run {registry.run_link(run_id)}")
    except CtloopError as exc:
        log.warning("stage %s: could not link the task to MLflow run %s (%s)", stage_name, run_id, exc)


def _already_finished(stage: Stage, context: StageContext) -> bool:
    """Working stages look at the cycle's folder; the deciding stage also asks the registry, since
    the same cycle may have been registered from another workspace."""
    if stage.role in ("works", "closes"):
        return context.folder.state().get("status") in FINISHED
    return finished_result(context.config, context.workspace, context.cycle_id) is not None


def cycle_result(config: CtloopConfig, workspace: Workspace, cycle_id: str, already_done: bool = False) -> CycleResult:
    """The result of a cycle that has stopped: finished by this run, finished before it
    (`already_done`), or skipped by the trigger."""
    cycle = CycleFolder(workspace, cycle_id)
    state = cycle.state()
    done = finished_result(config, workspace, cycle_id) if already_done else None
    if done is not None:
        return done
    if state.get("status") in FINISHED and "result" in state:
        return CycleResult(**state["result"])
    return CycleResult(
        cycle_id,
        "skipped",
        str(cycle.dir),
        "",
        None,
        None,
        validation=read_json(cycle.path(Validated.REPORT)),
        trigger=state.get("trigger", ""),
    )


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


def _record_failure(context: StageContext, stage: Stage, exc: BaseException) -> None:
    """Mark the cycle's MLflow run FAILED (a retry resumes it) and add the failure to cycle.json's
    `failures`. Best effort: the stage's own error is the one the caller sees."""
    if not context.cycle_id:
        return
    cycle = context.folder
    log.error("stage %s of cycle %s failed: %s: %s", stage.name, context.cycle_id, exc.__class__.__name__, exc)
    try:
        state = cycle.state()
        if not cycle.dir.is_dir() or state.get("status") in FINISHED:
            return
        failure = {"stage": stage.name, "at": utc_now(), "error": f"{exc.__class__.__name__}: {exc}"[:2000]}
        cycle.update_state(failures=[*state.get("failures", []), failure])
        if "run_id" in state:
            open_registry(context.config.registry, context.workspace).end_run(state["run_id"], "FAILED")
    except Exception as recording_error:  # noqa: BLE001 - never hide the stage's error behind this one
        log.warning("could not record the failure of cycle %s: %s", context.cycle_id, recording_error)
