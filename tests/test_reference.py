"""The drift reference (#16 item 5, #23 item 1): the trigger and production drift compare with the
champion cycle's own new rows, not with the replayed rows of older eras. Local cycle folders and,
for a champion trained elsewhere, its MLflow run."""

from __future__ import annotations

import shutil

import pytest

from ctloop.config import config_from_dict
from ctloop.cycle.reference import champion_reference
from ctloop.data.records import Record, write_parquet
from ctloop.fileio import write_json
from ctloop.registry.client import open_registry
from ctloop.workspace import Workspace


@pytest.fixture()
def champion(tmp_path):
    workspace = Workspace(tmp_path / "ws").create()
    config = config_from_dict({"model": {"base": "m"}, "registry": {"model_name": "ref"}})
    cycle = workspace.cycle_dir("c2")
    rows = [Record(i, f"prompt {i}", "c") for i in ("new-1", "new-2", "old-1", "old-2")]
    write_parquet(cycle / "train.parquet", rows)
    write_json(
        cycle / "replay_manifest.json", {"replayed": [{"cycle": "c1", "id": "old-1"}, {"cycle": "c1", "id": "old-2"}]}
    )
    registry = open_registry(config.registry, workspace)
    run_id = registry.start_run("cycle-c2", {"ctloop.cycle_id": "c2"})
    registry.log_artifact(run_id, cycle / "train.parquet", "data")
    registry.log_artifact(run_id, cycle / "replay_manifest.json", "reports")
    (cycle / "adapter").mkdir()
    (cycle / "adapter" / "adapter_config.json").write_text("{}")
    registry.log_artifact(run_id, cycle / "adapter", "adapter")
    registry.end_run(run_id)
    registry.register(run_id, "c2", {"ctloop.cycle_id": "c2"}, "v1")
    return config, workspace, registry


def test_drift_compares_with_the_champions_own_new_rows(champion):
    config, workspace, registry = champion
    own = champion_reference(config, workspace, registry, 1)
    assert sorted(r.id for r in own) == ["new-1", "new-2"]


def test_a_champion_trained_elsewhere_gives_the_same_reference_from_its_run(champion):
    config, workspace, registry = champion
    shutil.rmtree(workspace.cycle_dir("c2"))  # trained on another host: only the MLflow run has the files
    own = champion_reference(config, workspace, registry, 1)
    assert sorted(r.id for r in own) == ["new-1", "new-2"]
