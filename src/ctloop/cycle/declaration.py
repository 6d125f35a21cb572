"""The cycle, declared once: its stages in order, what each reads and writes in the cycle folder,
its function, and whether it needs the registry.

`run_cycle`, both Airflow DAGs and the tests are derived from `CYCLE`; none writes the order out
again. Adding a stage is one entry here and one function in `stages.py`.

Roles: the first stage *opens* the cycle (validate names it after the data it accepts), one
stage *decides* whether the cycle goes on (trigger: drift, schedule, force; its "no" skips the
rest, it is not a failure), and the others *work*. With `orchestration.source: production` a
*sources* stage (harvest) comes first and hands validate the records it harvested.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from ctloop.config import CtloopConfig
from ctloop.cycle.folder import StageContext

Role = Literal["sources", "opens", "decides", "works"]


@dataclass(frozen=True)
class Stage:
    name: str
    function: str  # its function in `ctloop.cycle.stages`, imported when the stage runs
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    uses_registry: bool
    role: Role = "works"
    summary: str = ""

    def run(self, context: StageContext) -> object:
        # Imported here, not at the top: an Airflow scheduler parses the DAG file (which reads this
        # declaration) often, and the stage functions' imports are not cheap.
        return getattr(importlib.import_module("ctloop.cycle.stages"), self.function)(context)


CYCLE: tuple[Stage, ...] = (
    Stage(
        "validate",
        "validate_stage",
        reads=("the run's data file",),
        writes=("validation.json", "quarantine.jsonl", "new.parquet", "cycle.json", "traffic_sample.jsonl"),
        uses_registry=False,
        role="opens",
        summary="schema, lengths, duplicates; bad rows quarantined; names the cycle",
    ),
    Stage(
        "trigger",
        "trigger_stage",
        reads=("new.parquet", "the champion's training data"),
        writes=("drift.json", "drift.html", "cycle.json"),
        uses_registry=True,
        role="decides",
        summary="embedding drift vs the champion's data, schedule or force: train or skip",
    ),
    Stage(
        "prepare",
        "prepare_stage",
        reads=("new.parquet", "the replay buffer"),
        writes=(
            "train.parquet",
            "preference_train.parquet",
            "preference_holdout.parquet",
            "new_holdout.parquet",
            "replay_holdout.parquet",
            "replay_manifest.json",
            "cycle.json",
        ),
        uses_registry=True,
        summary="holdout split, replay mix, feedback kinds routed to the objective; opens the MLflow run",
    ),
    Stage(
        "train",
        "train_stage",
        reads=("train.parquet", "preference_train.parquet", "the champion's adapter (warm start, reference)"),
        writes=("adapter/", "training.json", "checkpoints/"),
        uses_registry=True,
        summary="LoRA training, resumable from checkpoints",
    ),
    Stage(
        "evaluate",
        "evaluate_stage",
        reads=(
            "adapter/",
            "new_holdout.parquet",
            "replay_holdout.parquet",
            "preference_holdout.parquet",
            "traffic_sample.jsonl",
        ),
        writes=("eval.json", "contamination.json"),
        uses_registry=True,
        summary="candidate vs champion per example on new and old data",
    ),
    Stage(
        "gate",
        "gate_stage",
        reads=("eval.json",),
        writes=("gate.json",),
        uses_registry=False,
        summary="paired statistics against the configured thresholds: pass or fail",
    ),
    Stage(
        "register",
        "register_stage",
        reads=("everything above",),
        writes=("report.html", "cycle.json"),
        uses_registry=True,
        summary="MLflow run, model version and challenger alias; the data joins the replay buffer",
    ),
)


HARVEST = Stage(
    "harvest",
    "harvest_stage",
    reads=("the request log and feedback of orchestration.production_window",),
    writes=("<workspace>/harvest/harvest-<time>.jsonl and its manifest and decisions",),
    uses_registry=False,
    role="sources",
    summary="production answers and their feedback -> the cycle's records",
)


def stages_for(config: CtloopConfig) -> tuple[Stage, ...]:
    """The stages a config runs: the harvest first when `orchestration.source` is production."""
    return (HARVEST, *CYCLE) if config.orchestration.source == "production" else CYCLE


def stage(name: str) -> Stage:
    """The stage called `name`."""
    for candidate in (HARVEST, *CYCLE):
        if candidate.name == name:
            return candidate
    raise KeyError(f"no stage {name!r}; the stages are {', '.join(s.name for s in CYCLE)}")


def up_to_decision() -> tuple[Stage, ...]:
    """The stages up to and including the one that decides whether the cycle goes on (the drift watch)."""
    index = next(i for i, s in enumerate(CYCLE) if s.role == "decides")
    return CYCLE[: index + 1]
