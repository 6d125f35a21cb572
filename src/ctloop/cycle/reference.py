"""What new data (a cycle's, or live traffic) is compared with: the champion's training data."""

from __future__ import annotations

from ctloop.config import CtloopConfig
from ctloop.data.records import Record, read_parquet
from ctloop.errors import DataError
from ctloop.registry.client import Registry
from ctloop.workspace import Workspace


def champion_reference(config: CtloopConfig, workspace: Workspace, registry: Registry, champion: int) -> list[Record]:
    """`drift.reference` when set; else the training data of the champion's cycle, from this
    workspace or, trained elsewhere, from the champion's MLflow run."""
    from ctloop.data.records import read_records

    if config.drift.reference is not None:
        return read_records(config.drift.reference)[0]
    info = registry.version(champion)
    local = workspace.cycle_dir(info.tags.get("ctloop.cycle_id", "?")) / "train.parquet"
    if local.is_file():
        return read_parquet(local)[0]
    fetched = registry.download_run_file(info.run_id, "data/train.parquet", workspace.root / "registry-cache")
    if fetched is None:
        raise DataError(
            f"cannot find the training data of champion v{champion} (not in this workspace, not in its "
            f"MLflow run); set drift.reference to a file of reference records"
        )
    return read_parquet(fetched)[0]
