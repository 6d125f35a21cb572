"""What new data (a cycle's, or live traffic) is compared with: the champion's training data."""

from __future__ import annotations

import logging
from pathlib import Path

from ctloop.config import CtloopConfig
from ctloop.cycle.artifacts import Artifact, Holdouts, TrainingSet
from ctloop.data.records import Record, read_parquet
from ctloop.errors import DataError
from ctloop.fileio import read_json
from ctloop.registry.client import Registry
from ctloop.workspace import Workspace

log = logging.getLogger(__name__)


def champion_reference(
    config: CtloopConfig, workspace: Workspace, registry: Registry, champion: int | None
) -> list[Record]:
    """What drift compares with: `drift.reference` when set; else the rows that were new in the
    champion's cycle (its training data, from this workspace or, trained elsewhere, from the
    champion's MLflow run), without the replayed rows of older eras.

    Both the cycle trigger and production drift (`ctloop watch`, `drift --production`, the watch DAG)
    use it. Against the whole mixture, data just like the champion's own era still looks different
    once there is enough of it: with replay on, a watch on unchanged traffic alarmed at 27 of 30
    looks, and every alarm starts a cycle."""
    from ctloop.data.records import read_records

    if config.drift.reference is not None:
        return read_records(config.drift.reference)[0]
    if champion is None:
        raise DataError("there is no champion to compare with; set drift.reference to a file of reference records")
    info = registry.version(champion)
    records = _training_rows(workspace, registry, info)
    if records is None:
        raise DataError(
            f"cannot find the training data of champion v{champion} (not in this workspace, not in its "
            f"MLflow run); set drift.reference to a file of reference records"
        )
    manifest = _champion_file(workspace, registry, info, TrainingSet.MANIFEST, TrainingSet)
    if manifest is None:
        log.warning("champion v%s has no replay manifest; its whole training set is the drift reference", champion)
        return records
    replayed = {entry["id"] for entry in read_json(manifest).get("replayed", [])}
    own = [r for r in records if r.id not in replayed]
    return own or records


def champion_training_rows(workspace: Workspace, registry: Registry, champion: int) -> list[Record] | None:
    """Every row the champion trained on (its cycle's train.parquet, from this workspace or its MLflow
    run), or None when neither has it (a version registered by hand)."""
    return _training_rows(workspace, registry, registry.version(champion))


def anchor_holdout(workspace: Workspace, registry: Registry, anchor: int) -> list[Record] | None:
    """The new-data holdout of the anchor's (the first champion's) cycle: its own era, never trained
    on (holdouts stay out of training sets), from this workspace or its MLflow run; None when
    neither has it (a version registered by hand, or by a ctloop that did not log it)."""
    path = _champion_file(workspace, registry, registry.version(anchor), Holdouts.NEW, Holdouts)
    return None if path is None else read_parquet(path)[0]


def _training_rows(workspace: Workspace, registry: Registry, info) -> list[Record] | None:
    """train.parquet, and the rows a preference objective learned from (preference_train.parquet;
    for a dpo or kto champion train.parquet holds only its replayed rows)."""
    train = _champion_file(workspace, registry, info, TrainingSet.TRAIN, TrainingSet)
    if train is None:
        return None
    rows = read_parquet(train)[0]
    preference = _champion_file(workspace, registry, info, TrainingSet.PREFERENCE, TrainingSet)
    if preference is not None:
        known = {r.id for r in rows}
        rows += [r for r in read_parquet(preference)[0] if r.id not in known]
    return rows


def _champion_file(workspace: Workspace, registry: Registry, info, name: str, kind: type[Artifact]) -> Path | None:
    """A file of the champion's cycle (`name`, of the artifact `kind`): from this workspace when it
    trained here, else from its MLflow run, where the register stage logged it."""
    local = workspace.cycle_dir(info.tags.get("ctloop.cycle_id", "?")) / name
    if local.is_file():
        return local
    return registry.download_run_file(info.run_id, kind.logged_as(name), workspace.root / "registry-cache")
