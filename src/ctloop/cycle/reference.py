"""What new data (a cycle's, or live traffic) is compared with: the champion's training data."""

from __future__ import annotations

import logging
from pathlib import Path

from ctloop.config import CtloopConfig
from ctloop.data.records import Record, read_parquet
from ctloop.errors import DataError
from ctloop.fileio import read_json
from ctloop.registry.client import Registry
from ctloop.workspace import Workspace

log = logging.getLogger(__name__)


def champion_reference(
    config: CtloopConfig, workspace: Workspace, registry: Registry, champion: int, own_rows_only: bool = False
) -> list[Record]:
    """`drift.reference` when set; else the training data of the champion's cycle, from this
    workspace or, trained elsewhere, from the champion's MLflow run.

    `own_rows_only` (the trigger) keeps only the rows that were new in the champion's cycle, not
    the replayed rows of older eras: against that mixture, data just like the last era would still
    look different once there is enough of it. Live traffic (production drift) is compared with all
    the champion trained on."""
    from ctloop.data.records import read_records

    if config.drift.reference is not None:
        return read_records(config.drift.reference)[0]
    records = champion_training_rows(workspace, registry, champion)
    if records is None:
        raise DataError(
            f"cannot find the training data of champion v{champion} (not in this workspace, not in its "
            f"MLflow run); set drift.reference to a file of reference records"
        )
    if not own_rows_only:
        return records
    info = registry.version(champion)
    cycle_dir = workspace.cycle_dir(info.tags.get("ctloop.cycle_id", "?"))
    cache = workspace.root / "registry-cache"
    manifest = _local_or_fetched(
        cycle_dir / "replay_manifest.json", registry, info.run_id, "reports/replay_manifest.json", cache
    )
    if manifest is None:
        log.warning("champion v%s has no replay manifest; its whole training set is the drift reference", champion)
        return records
    replayed = {entry["id"] for entry in read_json(manifest).get("replayed", [])}
    own = [r for r in records if r.id not in replayed]
    return own or records


def champion_training_rows(workspace: Workspace, registry: Registry, champion: int) -> list[Record] | None:
    """Every row the champion trained on (its cycle's train.parquet, from this workspace or its MLflow
    run), or None when neither has it (a version registered by hand)."""
    info = registry.version(champion)
    cycle_dir = workspace.cycle_dir(info.tags.get("ctloop.cycle_id", "?"))
    cache = workspace.root / "registry-cache"
    train = _local_or_fetched(cycle_dir / "train.parquet", registry, info.run_id, "data/train.parquet", cache)
    return None if train is None else read_parquet(train)[0]


def _local_or_fetched(local: Path, registry: Registry, run_id: str, artifact: str, cache: Path) -> Path | None:
    if local.is_file():
        return local
    return registry.download_run_file(run_id, artifact, cache)
