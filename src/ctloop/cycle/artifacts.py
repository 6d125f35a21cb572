"""What a cycle's stages hand each other: one small frozen type per artifact, with its files in the
cycle folder named here and nowhere else, and `save`/`load`.

A stage function's signature says what it reads and writes: `def gate_stage(ctx, evaluation:
Evaluation) -> GateResult`. The runner loads the artifacts a stage takes, calls it and saves what
it returns; `declaration.py` derives each stage's reads and writes from the same signatures, checks
at import that every artifact a stage reads is written by an earlier one, and names the stage to
run first when one is missing.

`LOGGED` says which files go on the cycle's MLflow run, and under which artifact folder. Some
files of `FILES` are not written by `save` but by the stage itself, in place, because they stream
from elsewhere or must exist even when the stage fails: the adapter's weights and its
`ctloop_manifest.json`, the quarantine, the copy of the harvest's traffic sample, the HTML
reports, and `contamination.json`. The cycle's state (`cycle.json`) is the folder's (`folder.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

from ctloop.data.records import Record, read_parquet, write_parquet
from ctloop.data.validation import ValidationReport
from ctloop.drift.trigger import TriggerDecision
from ctloop.errors import WorkspaceError
from ctloop.evaluation.evaluate import EvalReport
from ctloop.evaluation.gate import GateDecision
from ctloop.fileio import read_json, write_json
from ctloop.training.trainer import TrainResult


class Artifact:
    """A frozen dataclass a stage writes to the cycle folder. `REQUIRED`: the files `load` needs
    (all of `FILES` unless a subclass says fewer)."""

    FILES: ClassVar[tuple[str, ...]]
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    LOGGED: ClassVar[dict[str, str]] = {}  # file -> the MLflow artifact folder it goes to

    @classmethod
    def required(cls) -> tuple[str, ...]:
        return cls.REQUIRED or cls.FILES

    @classmethod
    def present(cls, folder: Path) -> bool:
        return all((folder / name).exists() for name in cls.required())

    @classmethod
    def missing(cls, folder: Path) -> list[str]:
        return [name for name in cls.required() if not (folder / name).exists()]

    @classmethod
    def logged_as(cls, name: str) -> str:
        """Where `name` lies on the cycle's MLflow run (for reading it back from there)."""
        return f"{cls.LOGGED[name]}/{name}"

    def save(self, folder: Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path) -> Self:
        raise NotImplementedError


class Opens(Protocol):
    """What the opening stage returns: an artifact that names the cycle."""

    cycle_id: str


class Decides(Protocol):
    """What the deciding stage returns: an artifact that says whether the cycle goes on."""

    @property
    def proceed(self) -> bool: ...


@dataclass(frozen=True)
class Validated(Artifact):
    """The records that passed validation, their token counts, the report; the harvest's traffic
    sample when the records came from production."""

    REPORT: ClassVar = "validation.json"
    RECORDS: ClassVar = "new.parquet"
    QUARANTINE: ClassVar = "quarantine.jsonl"
    TRAFFIC_SAMPLE: ClassVar = "traffic_sample.jsonl"
    FILES: ClassVar = (RECORDS, REPORT, QUARANTINE, TRAFFIC_SAMPLE)
    REQUIRED: ClassVar = (RECORDS, REPORT)
    LOGGED: ClassVar = {REPORT: "reports", QUARANTINE: "reports"}

    report: ValidationReport
    records: list[Record]
    tokens: list[int]
    traffic_sample: Path | None = None  # a copy in the cycle folder
    cycle_id: str = ""  # the folder's name: a hash of the data, the config and the base model

    @property
    def tokens_by_id(self) -> dict[str, int]:
        return dict(zip((r.id for r in self.records), self.tokens, strict=True))

    def save(self, folder: Path) -> None:
        write_parquet(folder / self.RECORDS, self.records, extra={"n_tokens": self.tokens})
        write_json(folder / self.REPORT, self.report.to_dict())

    @classmethod
    def load(cls, folder: Path) -> Self:
        records, extra = read_parquet(folder / cls.RECORDS)
        sample = folder / cls.TRAFFIC_SAMPLE
        return cls(
            ValidationReport.from_dict(read_json(folder / cls.REPORT)),
            records,
            list(extra["n_tokens"]),
            sample if sample.is_file() else None,
            folder.name,
        )


@dataclass(frozen=True)
class Triggered(Artifact):
    """Whether the cycle trains, and why; the drift report it rests on, when drift was tested."""

    DECISION: ClassVar = "trigger.json"
    DRIFT: ClassVar = "drift.json"
    DRIFT_REPORT: ClassVar = "drift.html"
    FILES: ClassVar = (DECISION, DRIFT, DRIFT_REPORT)
    REQUIRED: ClassVar = (DECISION,)
    LOGGED: ClassVar = {DRIFT: "reports", DRIFT_REPORT: "reports"}

    decision: TriggerDecision
    drift: dict[str, Any] | None = None

    @property
    def proceed(self) -> bool:
        return self.decision.train

    def save(self, folder: Path) -> None:
        if self.drift is not None:
            write_json(folder / self.DRIFT, self.drift)
        write_json(folder / self.DECISION, {"train": self.decision.train, "reason": self.decision.reason})

    @classmethod
    def load(cls, folder: Path) -> Self:
        stored = read_json(folder / cls.DECISION)
        drift = folder / cls.DRIFT
        return cls(
            TriggerDecision(bool(stored["train"]), stored["reason"]), read_json(drift) if drift.is_file() else None
        )


@dataclass(frozen=True)
class TrainingSet(Artifact):
    """The supervised rows (new + replayed), the rows a preference term learns from, and the replay manifest."""

    TRAIN: ClassVar = "train.parquet"
    PREFERENCE: ClassVar = "preference_train.parquet"
    MANIFEST: ClassVar = "replay_manifest.json"
    FILES: ClassVar = (TRAIN, PREFERENCE, MANIFEST)
    # train.parquet: the next drift check's reference; preference_train: a preference champion's own rows
    LOGGED: ClassVar = {TRAIN: "data", PREFERENCE: "data", MANIFEST: "reports"}

    records: list[Record]
    preference: list[Record]
    manifest: dict[str, Any]

    def save(self, folder: Path) -> None:
        write_parquet(folder / self.TRAIN, self.records)
        write_parquet(folder / self.PREFERENCE, self.preference)
        write_json(folder / self.MANIFEST, self.manifest)

    @classmethod
    def load(cls, folder: Path) -> Self:
        train, preference = read_parquet(folder / cls.TRAIN)[0], read_parquet(folder / cls.PREFERENCE)[0]
        return cls(train, preference, read_json(folder / cls.MANIFEST))


@dataclass(frozen=True)
class Holdouts(Artifact):
    """Rows held out of training: the new data's (answers to score against), the replay buffer's,
    and the new data's held-out feedback (for a preference objective's rules)."""

    NEW: ClassVar = "new_holdout.parquet"
    REPLAY: ClassVar = "replay_holdout.parquet"
    PREFERENCE: ClassVar = "preference_holdout.parquet"
    FILES: ClassVar = (NEW, REPLAY, PREFERENCE)
    LOGGED: ClassVar = {NEW: "data"}  # this era's holdout: the cumulative budget's, as anchor

    new: list[Record]
    replay: list[Record]
    preference: list[Record]

    def save(self, folder: Path) -> None:
        write_parquet(folder / self.NEW, self.new)
        write_parquet(folder / self.REPLAY, self.replay)
        write_parquet(folder / self.PREFERENCE, self.preference)

    @classmethod
    def load(cls, folder: Path) -> Self:
        return cls(
            read_parquet(folder / cls.NEW)[0],
            read_parquet(folder / cls.REPLAY)[0],
            read_parquet(folder / cls.PREFERENCE)[0],
        )


@dataclass(frozen=True)
class TrainedAdapter(Artifact):
    """The LoRA adapter (written in place by the trainer) and what its training did."""

    ADAPTER: ClassVar = "adapter"
    MANIFEST: ClassVar = "adapter/ctloop_manifest.json"  # its lineage and resolved config, beside the weights
    RESULT: ClassVar = "training.json"
    CHECKPOINTS: ClassVar = "checkpoints"  # the trainer's, to resume from; not an artifact
    FILES: ClassVar = (ADAPTER, RESULT)
    REQUIRED: ClassVar = (f"{ADAPTER}/adapter_config.json", RESULT)
    LOGGED: ClassVar = {RESULT: "reports", ADAPTER: "adapter"}

    result: TrainResult
    path: Path = field(default=Path(), compare=False)

    def save(self, folder: Path) -> None:
        write_json(folder / self.RESULT, self.result.to_dict())

    @classmethod
    def load(cls, folder: Path) -> Self:
        return cls(TrainResult.from_dict(read_json(folder / cls.RESULT)), folder / cls.ADAPTER)


@dataclass(frozen=True)
class Evaluation(Artifact):
    """Candidate and references per example, with what the gate needs beside the losses."""

    SCORES: ClassVar = "eval.json"
    CONTAMINATION: ClassVar = "contamination.json"
    FILES: ClassVar = (SCORES, CONTAMINATION)
    REQUIRED: ClassVar = (SCORES,)
    LOGGED: ClassVar = {SCORES: "reports", CONTAMINATION: "reports"}

    report: EvalReport
    slices: dict[str, Any] = field(default_factory=dict)
    clusters: dict[str, list[str]] = field(default_factory=dict)
    slice_means: dict[str, Any] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    anchor_version: int | None = None
    seed_spread: dict[str, Any] | None = None
    traffic: dict[str, Any] | None = None
    traffic_note: str = ""

    def save(self, folder: Path) -> None:
        extras = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "report"}
        write_json(folder / self.SCORES, self.report.to_dict() | extras)

    @classmethod
    def load(cls, folder: Path) -> Self:
        stored = read_json(folder / cls.SCORES)
        extras = {f.name: stored[f.name] for f in fields(cls) if f.name != "report" and stored.get(f.name) is not None}
        return cls(EvalReport.from_dict(stored), **extras)


@dataclass(frozen=True)
class GateResult(Artifact):
    """The gate's decision: outcome, reasons, each rule's estimate and bound."""

    DECISION: ClassVar = "gate.json"
    FILES: ClassVar = (DECISION,)
    LOGGED: ClassVar = {DECISION: "reports"}

    decision: GateDecision

    def save(self, folder: Path) -> None:
        write_json(folder / self.DECISION, self.decision.to_dict())

    @classmethod
    def load(cls, folder: Path) -> Self:
        return cls(GateDecision.from_dict(read_json(folder / cls.DECISION)))


STATUS_OF_OUTCOME = {"PASS": "registered", "FAIL": "rejected", "INCONCLUSIVE": "inconclusive"}


@dataclass(frozen=True)
class Registration(Artifact):
    """How the cycle ended: registered (the version, its state, when) or not, and the run it logged to."""

    RECORD: ClassVar = "registration.json"
    REPORT: ClassVar = "report.html"
    FILES: ClassVar = (RECORD, REPORT)
    REQUIRED: ClassVar = (RECORD,)
    LOGGED: ClassVar = {REPORT: "reports"}  # by the register stage itself, once the report names the version

    status: str  # "registered", "rejected" or "inconclusive"
    run_id: str
    version: int | None = None
    state: str = ""  # the version's state when it registered: champion, challenger, pending approval
    at: str = ""

    def save(self, folder: Path) -> None:
        write_json(folder / self.RECORD, {f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, folder: Path) -> Self:
        return cls(**read_json(folder / cls.RECORD))


def require(artifact: type[Artifact], folder: Path, writer: str) -> None:
    """Fail, naming the stage to run, when the cycle folder lacks what `artifact` needs."""
    missing = artifact.missing(folder)
    if missing:
        raise WorkspaceError(f"cycle {folder.name} has no {', '.join(missing)}; run the {writer} stage first")
