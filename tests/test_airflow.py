"""The Airflow DAGs, run for real: Airflow 3 with a SQLite metadata DB in a temp AIRFLOW_HOME
(`airflow db migrate`), `dag.test()` executing every task in-process, the registry checked after."""

from __future__ import annotations

import importlib.util
import json
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
os.environ.update(
    AIRFLOW_HOME=_HOME,
    AIRFLOW__CORE__LOAD_EXAMPLES="False",
    AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
    AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{_HOME}/airflow.db",
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def airflow_env(tiny_base, tmp_path_factory):
    """An initialised Airflow DB and a ctloop config the DAG file reads through CTLOOP_CONFIG."""
    migrate = subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=300,
    )
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    root = tmp_path_factory.mktemp("airflow-ctloop")
    for name, source, rows in (
        ("old.jsonl", "old_domain.jsonl", slice(0, 200)),
        ("new.jsonl", "new_domain.jsonl", slice(0, 200)),
    ):
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
    from ctloop.registry.client import open_registry
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
    from ctloop.cycle.declaration import stage
    from ctloop.cycle.folder import StageContext
    from ctloop.cycle.run import run_stage

    module, root = airflow_env
    registry, config = _registry(root)
    workspace_root = Path(config.workspace)
    from ctloop.workspace import Workspace

    workspace = Workspace(workspace_root)
    # The tasks up to `train` finished in an earlier attempt; then the worker died.
    cycle_id = run_stage(stage("validate"), StageContext(config, workspace, data=root / "new.jsonl")).cycle_id
    context = StageContext(config, workspace, cycle_id)
    assert run_stage(stage("trigger"), context).proceed  # new domain: drift
    run_stage(stage("prepare"), context)
    run_stage(stage("train"), context)
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
    assert _states(quiet) == {"validate": "success", "trigger": "success", "start_cycle": "skipped"}

    shifted = tmp_path / "shifted.jsonl"
    shifted.write_bytes(b"\n".join(quickstart_rows("new_domain.jsonl")[300:500]) + b"\n")
    fired = module.drift_watch_dag.test(run_conf={"data": str(shifted)})
    assert _states(fired) == {"validate": "success", "trigger": "success", "start_cycle": "success"}
    triggered = DagRun.find(dag_id="ctloop_cycle")
    assert any((run.conf or {}).get("data") == str(shifted) for run in triggered)
    # The cycle the watch triggered re-uses the watch's decision: drift is computed once per cycle.
    from ctloop.cycle.artifacts import Triggered
    from ctloop.cycle.declaration import stage
    from ctloop.cycle.folder import CycleFolder, StageContext
    from ctloop.cycle.run import run_stage
    from ctloop.workspace import Workspace

    registry, config = _registry(root)
    workspace = Workspace(Path(config.workspace))
    cycle_id = run_stage(stage("validate"), StageContext(config, workspace, data=shifted)).cycle_id
    drift_json = CycleFolder(workspace, cycle_id).path(Triggered.DRIFT)
    written = drift_json.stat().st_mtime_ns
    assert run_stage(stage("trigger"), StageContext(config, workspace, cycle_id)).proceed
    assert drift_json.stat().st_mtime_ns == written


def test_the_dags_tasks_are_the_declared_stages_in_order(airflow_env):
    from ctloop.cycle.declaration import CYCLE, up_to_decision

    module, _ = airflow_env

    def chain(dag) -> list[str]:
        """The tasks in dependency order; each must directly follow the one before it."""
        ordered = sorted(dag.tasks, key=lambda task: len(task.get_flat_relative_ids(upstream=True)))
        for before, after in zip(ordered, ordered[1:], strict=False):
            assert before.task_id in after.upstream_task_ids, (before.task_id, after.task_id)
        return [task.task_id for task in ordered]

    assert chain(module.cycle_dag) == [stage.name for stage in CYCLE]
    assert chain(module.drift_watch_dag) == [stage.name for stage in up_to_decision()] + ["start_cycle"]
    assert len(module.cycle_dag.tasks) == len(CYCLE)


def test_a_task_failing_in_airflow_leaves_the_state_a_failing_cli_run_leaves(airflow_env, tmp_path, monkeypatch):
    """Training breaks in both: the cycle's MLflow run is FAILED, cycle.json names the stage and the
    error, and a retry after the fix resumes the same run and registers once."""
    from ctloop.config import load_config
    from ctloop.cycle.folder import CycleFolder
    from ctloop.cycle.run import run_cycle
    from ctloop.registry.client import open_registry
    from ctloop.training import trainer
    from ctloop.workspace import Workspace

    module, root = airflow_env

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(trainer, "train_adapter", broken)
    data = tmp_path / "sound.jsonl"
    data.write_bytes(b"\n".join(quickstart_rows("new_domain.jsonl")[500:700]) + b"\n")
    failed_dag = module.cycle_dag.test(run_conf={"data": str(data), "force": True})
    assert str(failed_dag.state) == "failed" and _states(failed_dag)["train"] == "failed"

    config = load_config(root / "ctloop.yaml")
    workspace = Workspace(Path(config.workspace))
    registry, _ = _registry(root)
    airflow_cycles = [
        p.parent for p in workspace.cycles_dir.glob("*/cycle.json") if json.loads(p.read_text()).get("failures")
    ]
    assert len(airflow_cycles) == 1
    airflow_state = json.loads((airflow_cycles[0] / "cycle.json").read_text())

    cli_workspace = Workspace(tmp_path / "cli-ws")
    with pytest.raises(RuntimeError, match="simulated"):
        run_cycle(config, data, cli_workspace, force=True)
    cli_state = CycleFolder(cli_workspace, airflow_state["cycle_id"]).state()

    for state, where in ((airflow_state, workspace), (cli_state, cli_workspace)):
        [failure] = state["failures"]
        assert failure["stage"] == "train" and "out of memory (simulated)" in failure["error"]
        assert state["status"] == "triggered"
        run = open_registry(config.registry, where).client.get_run(state["run_id"])
        assert run.info.status == "FAILED"
    assert set(airflow_state) == set(cli_state)

    monkeypatch.undo()
    resumed = module.cycle_dag.test(run_conf={"data": str(data), "force": True})
    assert str(resumed.state) == "success", _states(resumed)
    final = json.loads((airflow_cycles[0] / "cycle.json").read_text())
    assert final["run_id"] == airflow_state["run_id"] and final["status"] in ("registered", "rejected", "inconclusive")
    assert registry.client.get_run(final["run_id"]).info.status == "FINISHED"


def test_parsing_the_dag_file_loads_no_heavy_library(airflow_env):
    """The scheduler parses the DAG file often: the declaration it reads (and the stage signatures
    behind it) may load numpy (tens of milliseconds), never torch, transformers, peft, mlflow or arrow."""
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('d', {str(REPO / 'dags' / 'ctloop_dag.py')!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(sorted(x for x in ('torch', 'transformers', 'peft', 'mlflow', 'pyarrow', 'pandas', 'scipy', 'sklearn') "
        "if x in sys.modules)); "
        "print(m.cycle_dag.dag_id, m.drift_watch_dag.dag_id)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert out.stdout.splitlines() == ["[]", "ctloop_cycle ctloop_drift_watch"]


def test_with_production_as_the_source_the_dags_harvest_and_watch_live_traffic(
    airflow_env, tiny_base, tmp_path, monkeypatch
):
    """orchestration.source: production: the cycle DAG starts with a harvest task that hands validate
    its records; the watch DAG checks the prompts served lately against the champion's data."""
    from ctloop.logstore.requests import FeedbackRecord, LogReader, RequestLog, RequestRecord
    from ctloop.workspace import Workspace

    _, root = airflow_env
    config = yaml.safe_load((root / "ctloop.yaml").read_text())
    config |= {
        "workspace": str(tmp_path / "ws"),
        "registry": {"model_name": "airflow-production"},
        "gate": {"first_cycle": "accept"},
        "orchestration": {"source": "production", "production_window": "1h", "retries": 0},
    }
    (tmp_path / "ctloop.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("CTLOOP_CONFIG", str(tmp_path / "ctloop.yaml"))
    spec = importlib.util.spec_from_file_location("ctloop_dag_production", REPO / "dags" / "ctloop_dag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    url = Workspace(tmp_path / "ws").create().shadow_store_url()
    writer, corrections = RequestLog(url), []
    for i, line in enumerate(quickstart_rows("old_domain.jsonl")[:160]):
        try:
            fields = json.loads(line)
        except ValueError:
            continue
        if isinstance(fields.get("prompt"), str) and isinstance(fields.get("completion"), str):
            writer.put(
                RequestRecord(
                    request_id=f"p{i}",
                    model_version="0",
                    endpoint="completions",
                    prompt=fields["prompt"],
                    answer="not quite",
                )
            )
            corrections.append(FeedbackRecord(f"p{i}", rating=-1, correction=fields["completion"]))
    writer.close()
    reader = LogReader(url)
    reader.add_feedback(corrections)
    reader.close()

    run = module.cycle_dag.test()
    states = _states(run)
    assert str(run.state) == "success", states
    from ctloop.cycle.declaration import CYCLE

    assert states == {name: "success" for name in ["harvest", *(stage.name for stage in CYCLE)]}
    cycle_state = next(json.loads(p.read_text()) for p in (tmp_path / "ws").glob("cycles/*/cycle.json"))
    assert cycle_state["harvest"]["kept"] == len(corrections) and cycle_state["status"] == "registered"

    quiet = module.drift_watch_dag.test()  # the traffic served so far is what the champion was trained on
    assert _states(quiet) == {"production_drift": "success", "start_cycle": "skipped"}
    writer = RequestLog(url)
    for i, line in enumerate(quickstart_rows("new_domain.jsonl")[:200]):
        try:
            prompt = json.loads(line).get("prompt")
        except ValueError:
            continue
        if isinstance(prompt, str):
            writer.put(
                RequestRecord(request_id=f"n{i}", model_version="1", endpoint="completions", prompt=prompt, answer="x")
            )
    writer.close()
    fired = module.drift_watch_dag.test()
    assert _states(fired) == {"production_drift": "success", "start_cycle": "success"}
