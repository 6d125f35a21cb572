"""The cycle, declared once: its stages in order, each with its function, its role, and whether it
needs the registry.

What a stage reads and writes is its function's signature (`cycle/artifacts.py`): the artifacts it
takes after the context, and the ones it returns. `run_cycle`, both Airflow DAGs, the README's stage
table and the tests are derived from `CYCLE`; none writes the order out again. Importing this module
checks the declaration: a stage that reads an artifact no earlier stage writes fails here, not in a
run. Adding a stage is one function in `stages.py` and one entry here.

Roles: the first stage *opens* the cycle (validate names it after the data it accepts), one
stage *decides* whether the cycle goes on (trigger: drift, schedule, force; its "no" skips the
rest, it is not a failure), the last *closes* it (register: the cycle is finished once its record
is saved), and the others *work*. With `orchestration.source: production` a *sources* stage
(harvest) comes first and hands validate the records it harvested.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from ctloop.config import CtloopConfig
from ctloop.cycle import stages
from ctloop.cycle.artifacts import Artifact
from ctloop.cycle.folder import StageContext

Role = Literal["sources", "opens", "decides", "works", "closes"]


class DeclarationError(TypeError):
    """The cycle's declaration contradicts its stage functions (raised when this module is imported)."""


@dataclass(frozen=True)
class Stage:
    name: str
    function: Callable[..., object]
    uses_registry: bool
    role: Role = "works"
    summary: str = ""
    # Its saved artifacts stand for a rerun of the cycle (the expensive stages: a resumed cycle is
    # not trained or evaluated twice); the others always run again.
    reused_when_saved: bool = False
    elsewhere: str = ""  # what it reads or writes outside the cycle's artifacts (for the stage table)

    @cached_property
    def _hints(self) -> dict[str, object]:
        return typing.get_type_hints(self.function)

    @cached_property
    def reads(self) -> dict[str, type[Artifact]]:
        """The artifacts the function takes, by parameter name (after the context)."""
        names = list(inspect.signature(self.function).parameters)
        if not names or names[0] != "ctx":
            raise DeclarationError(f"stage {self.name}: {self.function.__name__} must take the context (ctx) first")
        taken = {name: self._hints.get(name) for name in names[1:]}
        for name, hint in taken.items():
            if not (isinstance(hint, type) and issubclass(hint, Artifact)):
                raise DeclarationError(
                    f"stage {self.name}: parameter {name!r} of {self.function.__name__} is {hint!r}; "
                    "a stage takes only artifacts (types from ctloop.cycle.artifacts) after ctx"
                )
        return typing.cast(dict[str, type[Artifact]], taken)

    @cached_property
    def writes(self) -> tuple[type[Artifact], ...]:
        """The artifacts the function returns (one, or a tuple of them); none for a sources stage."""
        returned = self._hints.get("return")
        parts = typing.get_args(returned) if typing.get_origin(returned) is tuple else (returned,)
        return tuple(p for p in parts if isinstance(p, type) and issubclass(p, Artifact))

    def run(self, context: StageContext, inputs: dict[str, Artifact]) -> object:
        return self.function(context, **inputs)


CYCLE: tuple[Stage, ...] = (
    Stage(
        "validate",
        stages.validate_stage,
        uses_registry=False,
        role="opens",
        summary="schema, lengths, duplicates; bad rows quarantined; names the cycle",
    ),
    Stage(
        "trigger",
        stages.trigger_stage,
        uses_registry=True,
        role="decides",
        summary="embedding drift vs the champion's data, schedule or force: train or skip",
        elsewhere="reads the champion's training data",
    ),
    Stage(
        "prepare",
        stages.prepare_stage,
        uses_registry=True,
        summary="holdout split, replay mix, feedback kinds routed to the objective; opens the MLflow run",
        elsewhere="reads the replay buffer; fixes the champion and the MLflow run in `cycle.json`",
    ),
    Stage(
        "train",
        stages.train_stage,
        uses_registry=True,
        summary="LoRA training (warm start from the champion when set), resumable from checkpoints",
        reused_when_saved=True,
        elsewhere="reads the champion's adapter; writes `checkpoints/`",
    ),
    Stage(
        "evaluate",
        stages.evaluate_stage,
        uses_registry=True,
        summary="candidate vs champion per example on new and old data",
        reused_when_saved=True,
        elsewhere="reads the champion's and the first champion's adapters, golden sets, rejected answers",
    ),
    Stage(
        "gate",
        stages.gate_stage,
        uses_registry=False,
        summary="paired statistics against the configured thresholds: pass or fail",
    ),
    Stage(
        "register",
        stages.register_stage,
        uses_registry=True,
        role="closes",
        summary="MLflow run, model version and challenger alias; the data joins the replay buffer",
        elsewhere="writes the replay buffer; marks the cycle finished in `cycle.json`",
    ),
)


HARVEST = Stage(
    "harvest",
    stages.harvest_stage,
    uses_registry=False,
    role="sources",
    summary="with orchestration.source: production, the answers served and their feedback -> the cycle's records",
    elsewhere="reads the request log; writes `<workspace>/harvest/`",
)


def check_cycle(cycle: tuple[Stage, ...]) -> None:
    """Raise DeclarationError unless one stage opens the cycle first and one closes it last, one
    decides, each artifact has one writer, and every artifact a stage reads is written before it."""
    roles = [s.role for s in cycle]
    if not cycle or roles[0] != "opens" or roles.count("opens") != 1:
        raise DeclarationError("the cycle's first stage, and only it, opens the cycle (role 'opens')")
    if roles[-1] != "closes" or roles.count("closes") != 1 or roles.count("decides") != 1 or "sources" in roles:
        raise DeclarationError("a cycle has one deciding stage, and its last stage, only it, closes it")
    if len({s.name for s in cycle}) != len(cycle):
        raise DeclarationError("two stages of the cycle share a name")
    written: dict[type[Artifact], str] = {}
    for current in cycle:
        for name, artifact in current.reads.items():
            if artifact not in written:
                raise DeclarationError(
                    f"stage {current.name} reads {artifact.__name__} ({name}), which no earlier stage writes; "
                    "move it after the stage that returns it, or add that stage before it"
                )
        for artifact in current.writes:
            if artifact in written:
                raise DeclarationError(f"{artifact.__name__} is written by both {written[artifact]} and {current.name}")
            written[artifact] = current.name
    opened = cycle[0].writes
    if not opened or "cycle_id" not in {f.name for f in dataclasses.fields(opened[0])}:  # type: ignore[arg-type]
        raise DeclarationError(f"the opening stage {cycle[0].name} must return first an artifact with a cycle_id")
    decides = next(s for s in cycle if s.role == "decides")
    if not decides.writes or not isinstance(getattr(decides.writes[0], "proceed", None), property):
        raise DeclarationError(
            f"the deciding stage {decides.name} must return first an artifact with a proceed property"
        )


def writer_of(artifact: type[Artifact], cycle: tuple[Stage, ...] | None = None) -> str:
    """The name of the stage that writes `artifact` (for "run X first")."""
    return next(s.name for s in cycle or CYCLE if artifact in s.writes)


def logged_files(cycle: tuple[Stage, ...] | None = None) -> list[tuple[str, str]]:
    """(file in the cycle folder, MLflow artifact folder) of every artifact the stages before the
    closing one write: what a finished cycle logs on its run."""
    return [
        (name, folder)
        for current in (cycle or CYCLE)
        if current.role != "closes"
        for artifact in current.writes
        for name, folder in artifact.LOGGED.items()
    ]


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


def stage_table(cycle: tuple[Stage, ...] | None = None) -> str:
    """The stages as a Markdown table (the README's), from the declaration and the signatures."""

    def files(artifacts) -> str:
        return "; ".join(f"{a.__name__} ({', '.join(f'`{n}`' for n in a.FILES)})" for a in artifacts) or "-"

    rows = [
        "| stage | reads | writes in the cycle folder | also | registry | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for current in (HARVEST, *(cycle or CYCLE)):
        reads = ", ".join(a.__name__ for a in current.reads.values()) or "-"
        writes = files(current.writes) if current.role != "sources" else "the records file validate takes"
        registry = "yes" if current.uses_registry else "-"
        also = current.elsewhere or "-"
        rows.append(f"| {current.name} | {reads} | {writes} | {also} | {registry} | {current.summary} |")
    return "\n".join(rows) + "\n"


check_cycle(CYCLE)
