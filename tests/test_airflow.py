"""The Airflow DAGs, run for real: Airflow 3 with a SQLite metadata DB in a temp AIRFLOW_HOME
(`airflow db migrate`), `dag.test()` executing every task in-process, the registry checked after."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, quickstart_rows

# Airflow reads its settings once, at first import: set them before anything imports it.
_HOME = tempfile.mkdtemp(prefix="ctloop-airflow-home-")
os.environ.update(AIRFLOW_HOME=_HOME, AIRFLOW__CORE__LOAD_EXAMPLES="False",
                  AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
                  AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{_HOME}/airflow.db")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def airflow_env(tiny_base, tmp_path_factory):
    """An initialised Airflow DB and a ctloop config the DAG file reads through CTLOOP_CONFIG."""
    migrate = subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
                             capture_output=True, text=True, env=os.environ, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    root = tmp_path_factory.mktemp("airflow-ctloop")
    for name, source, rows in (("old.jsonl", "old_domain.jsonl", slice(0, 200)),
                               ("new.jsonl", "new_domain.jsonl", slice(0, 200))):
        (root / name).write_bytes(b"\n".join(quickstart_rows(source)[rows]) + b"\n")
    config = {
        "workspace": str(root / "ws"),
        "model": {"base": str(tiny_base), "max_seq_tokens": 96},
        "data": {"min_rows": 20, "holdout_fraction": 0.15},
        "drift": {"embedder": "base_model", "text": "both", "permutations": 200, "min_rows": 20},
        "train": {"epochs": 1, "learning_rate": 0.01, "batch_tokens": 512},
        # The DAG's mechanics are under test here, not the model: any candidate may pass.
        "gate": {"min_new_improvement": -1.0, "max_old_regression": 1.0, "min_examples": 10},
        "registry": {"model_name": "airflow-adapter"},
        "orchestration": {"data": str(root / "old.jsonl"), "retries": 0},
    }
    config_path = root / "ctloop.yaml"
    config_path.write_text(yaml.safe_dump(config))
    os.environ["CTLOOP_CONFIG"] = str(config_path)
    spec = importlib.util.spec_from_file_location("ctloop_dag", REPO / "dags" / "ctloop_dag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, root


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def _registry(root: Path):
    from ctloop.config import load_config
    from ctloop.pipeline import open_registry
    from ctloop.workspace import resolve_workspace

    config = load_config(root / "ctloop.yaml")
    return open_registry(config.registry, resolve_workspace(None, config)), config


def test_the_cycle_dag_registers_a_version_and_a_rerun_creates_no_duplicate(airflow_env):
    module, root = airflow_env
    first = module.cycle_dag.test()
    assert str(first.state) == "success", _states(first)
    assert set(_states(first).values()) == {"success"}
    registry, _ = _registry(root)
    assert [v.version for v in registry.versions()] == [1] and registry.alias("champion") == 1

    again = module.cycle_dag.test()  # same data, same config: the trigger task short-circuits
    states = _states(again)
    assert str(again.state) == "success"
    assert states["validate"] == "success" and states["trigger"] == "success"
    assert {states[t] for t in ("prepare", "train", "evaluate", "gate", "register")} == {"skipped"}
    assert [v.version for v in registry.versions()] == [1]


def test_a_run_that_died_after_training_is_finished_by_the_dag_without_retraining(airflow_env):
    from ctloop.stages import prepare_stage, train_stage, trigger_stage, validate_stage

    module, root = airflow_env
    registry, config = _registry(root)
    workspace_root = Path(config.workspace)
    from ctloop.workspace import Workspace

    workspace = Workspace(workspace_root)
    # The tasks up to `train` finished in an earlier attempt; then the worker died.
    cycle_id = validate_stage(config, root / "new.jsonl", workspace)
    assert trigger_stage(config, workspace, cycle_id).train  # new domain: drift
    prepare_stage(config, workspace, cycle_id)
    train_stage(config, workspace, cycle_id)
    adapter = workspace.cycle_dir(cycle_id) / "adapter" / "adapter_model.safetensors"
    trained_at = adapter.stat().st_mtime_ns
    run_id = (workspace.cycle_dir(cycle_id) / "cycle.json").read_text()

    finished = module.cycle_dag.test(run_conf={"data": str(root / "new.jsonl")})
    assert str(finished.state) == "success", _states(finished)
    assert adapter.stat().st_mtime_ns == trained_at  # the adapter was re-used, not retrained
    versions = registry.versions()
    assert [v.version for v in versions] == [1, 2]
    assert versions[1].run_id in run_id  # the MLflow run opened before the crash, continued
    assert registry.alias("challenger") == 2


def test_the_drift_watch_dag_triggers_a_cycle_only_on_drift(airflow_env, tmp_path):
    from airflow.models import DagRun

    module, root = airflow_env
    same = tmp_path / "same.jsonl"  # like the champion's training data (old domain, unseen rows)
    same.write_bytes(b"\n".join(quickstart_rows("old_domain.jsonl")[200:400]) + b"\n")
    quiet = module.drift_watch_dag.test(run_conf={"data": str(same)})
    assert _states(quiet) == {"drift_fires": "success", "start_cycle": "skipped"}

    shifted = tmp_path / "shifted.jsonl"
    shifted.write_bytes(b"\n".join(quickstart_rows("new_domain.jsonl")[300:500]) + b"\n")
    fired = module.drift_watch_dag.test(run_conf={"data": str(shifted)})
    assert _states(fired) == {"drift_fires": "success", "start_cycle": "success"}
    triggered = DagRun.find(dag_id="ctloop_cycle")
    assert any((run.conf or {}).get("data") == str(shifted) for run in triggered)


def test_parsing_the_dag_file_loads_no_heavy_library(airflow_env):
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('d', {str(REPO / 'dags' / 'ctloop_dag.py')!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(sorted(x for x in ('torch', 'transformers', 'peft', 'mlflow') if x in sys.modules)); "
            "print(m.cycle_dag.dag_id, m.drift_watch_dag.dag_id)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert out.stdout.splitlines() == ["[]", "ctloop_cycle ctloop_drift_watch"]
