"""Airflow 3 DAGs that run ctloop cycles with the same stage functions as `ctloop run`.

- `ctloop_cycle`: validate -> trigger (drift, schedule, force) -> prepare (split + replay mix)
  -> train -> evaluate -> gate -> register. Tasks pass the cycle id (a short string), never
  data. When the trigger says no (no drift, cooldown) or the cycle already ran, the downstream
  tasks are skipped, not failed. A retried task re-uses the cycle folder's finished work; the
  registry never gets a duplicate version.
- `ctloop_drift_watch`: checks newly landed data for drift more often and triggers
  `ctloop_cycle` only when the trigger policy fires.

Configuration: the environment variable CTLOOP_CONFIG (or the Airflow Variable `ctloop_config`)
names a ctloop YAML file; its `orchestration` section sets the data path, schedules, retries.
A run's conf may override {"data": PATH, "force": true}. Parsing this file reads that YAML and
nothing heavier: torch, transformers and mlflow load inside the tasks.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import dag, get_current_context, task

from ctloop.config import load_config  # pydantic + yaml only: parsing stays fast


def _config_path() -> str:
    path = os.environ.get("CTLOOP_CONFIG")
    if not path:
        from airflow.sdk import Variable

        path = Variable.get("ctloop_config", default=None)
    if not path:
        raise RuntimeError("ctloop DAGs need a config: set the environment variable CTLOOP_CONFIG or the Airflow "
                           "Variable ctloop_config to the path of a ctloop YAML file")
    return path


CONFIG_PATH = _config_path()


def _load():
    from ctloop.workspace import resolve_workspace

    config = load_config(CONFIG_PATH)
    return config, resolve_workspace(None, config)


def _run_inputs(config) -> tuple[Path, bool]:
    params = get_current_context()["params"]
    data = params.get("data") or config.orchestration.data
    if not data:
        from ctloop.errors import ConfigError

        raise ConfigError(CONFIG_PATH, ["orchestration.data: no data file; set it, or trigger the run with "
                                        "conf {\"data\": \"/path/to/new.jsonl\"}"])
    return Path(data), bool(params.get("force", False))


def _locked(config, workspace, purpose: str):
    from ctloop.workspace import workspace_lock

    return workspace_lock(workspace, purpose, wait_seconds=config.orchestration.lock_wait_seconds)


_settings = load_config(CONFIG_PATH).orchestration
DEFAULT_ARGS = {"retries": _settings.retries, "retry_delay": timedelta(minutes=_settings.retry_delay_minutes)}


@dag(dag_id="ctloop_cycle", schedule=_settings.schedule, start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, default_args=DEFAULT_ARGS, params={"data": "", "force": False}, tags=["ctloop"],
     doc_md=__doc__)
def ctloop_cycle():
    @task
    def validate() -> str:
        from ctloop.stages import validate_stage

        config, workspace = _load()
        data, _ = _run_inputs(config)
        with _locked(config, workspace, "airflow ctloop_cycle: validate"):
            return validate_stage(config, data, workspace)

    @task.short_circuit
    def trigger(cycle_id: str) -> bool:
        from ctloop.pipeline import finished_result
        from ctloop.stages import trigger_stage

        config, workspace = _load()
        _, force = _run_inputs(config)
        with _locked(config, workspace, "airflow ctloop_cycle: trigger"):
            if finished_result(config, workspace, cycle_id) is not None:
                print(f"cycle {cycle_id} already ran on this data and config: skipping the rest")
                return False
            return trigger_stage(config, workspace, cycle_id, force=force).train

    def stage_task(name: str):
        @task(task_id=name)
        def run_stage(cycle_id: str) -> str:
            from ctloop import stages

            config, workspace = _load()
            with _locked(config, workspace, f"airflow ctloop_cycle: {name}"):
                getattr(stages, f"{name}_stage")(config, workspace, cycle_id)
            return cycle_id

        return run_stage

    cycle_id = validate()
    previous = trigger(cycle_id)
    for name in ("prepare", "train", "evaluate", "gate", "register"):
        current = stage_task(name)(cycle_id)
        previous >> current
        previous = current


@dag(dag_id="ctloop_drift_watch", schedule=_settings.drift_watch_schedule, start_date=datetime(2026, 1, 1),
     catchup=False, max_active_runs=1, default_args=DEFAULT_ARGS, params={"data": ""}, tags=["ctloop"])
def ctloop_drift_watch():
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    @task.short_circuit
    def drift_fires() -> bool:
        from ctloop.pipeline import finished_result
        from ctloop.stages import trigger_stage, validate_stage

        config, workspace = _load()
        data, _ = _run_inputs(config)
        with _locked(config, workspace, "airflow ctloop_drift_watch"):
            cycle_id = validate_stage(config, data, workspace)
            if finished_result(config, workspace, cycle_id) is not None:
                return False
            return trigger_stage(config, workspace, cycle_id).train

    drift_fires() >> TriggerDagRunOperator(
        task_id="start_cycle", trigger_dag_id="ctloop_cycle",
        conf={"data": "{{ params.data or '' }}"}, wait_for_completion=False)


cycle_dag = ctloop_cycle()
drift_watch_dag = ctloop_drift_watch()
