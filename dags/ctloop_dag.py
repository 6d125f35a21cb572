"""Airflow 3 DAGs that run ctloop cycles, derived from ctloop's cycle declaration (`CYCLE`).

- `ctloop_cycle`: one task per stage, in the declared order (with `orchestration.source:
  production`, a harvest task first, which hands validate the records it harvested). Tasks pass
  the cycle id (a short string), never data. The deciding stage (trigger) is a short-circuit: when it says no (no drift,
  cooldown) or the cycle already ran, the downstream tasks are skipped, not failed. A failed task
  marks the cycle's MLflow run FAILED exactly as `ctloop run` does; a retried task re-uses the
  cycle folder's finished work, and the registry never gets a duplicate version.
- `ctloop_drift_watch`: the stages up to the decision, on newly landed data, more often; it
  triggers `ctloop_cycle` only when the decision is to train (the cycle re-uses that decision).
  With `orchestration.source: production` it checks live traffic (the prompts served in
  `orchestration.production_window`) against the champion's training data instead.

Configuration: the environment variable CTLOOP_CONFIG (or the Airflow Variable `ctloop_config`)
names a ctloop YAML file; its `orchestration` section sets the data path, schedules, retries.
A run's conf may override {"data": PATH, "force": true}. Parsing this file reads that YAML once
and the cycle's declaration, whose stage signatures bring numpy (about 0.3 s in all); torch,
transformers, mlflow and pyarrow load inside the tasks.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import dag, task

from ctloop.config import load_config  # pydantic + yaml only: parsing stays fast


def _config_path() -> str:
    path = os.environ.get("CTLOOP_CONFIG")
    if not path:
        from airflow.sdk import Variable

        path = Variable.get("ctloop_config", default=None)
    if not path:
        raise RuntimeError(
            "ctloop DAGs need a config: set the environment variable CTLOOP_CONFIG or the Airflow "
            "Variable ctloop_config to the path of a ctloop YAML file"
        )
    return path


CONFIG_PATH = _config_path()
CONFIG = load_config(CONFIG_PATH)  # read once, at parse time
SETTINGS = CONFIG.orchestration
DEFAULT_ARGS = {"retries": SETTINGS.retries, "retry_delay": timedelta(minutes=SETTINGS.retry_delay_minutes)}


def _stage_tasks(dag_id: str, stages) -> list:
    """One task per stage, chained in order. The opening stage's cycle id reaches the later tasks by
    XCom; a sources stage (the harvest) hands the opening stage its records file the same way."""
    from airflow.sdk import get_current_context

    def make(stage):
        kind = task.short_circuit if stage.role == "decides" else task

        @kind(task_id=stage.name)
        def run(cycle_id: str = "", data: str = ""):
            from ctloop.cycle.run import run_stage_task

            context = get_current_context()
            params = context["params"]
            step = run_stage_task(
                CONFIG_PATH,
                stage.name,
                cycle_id,
                data or params.get("data"),
                bool(params.get("force", False)),
                f"airflow {dag_id}",
                task_tags={"airflow.dag_id": dag_id, "airflow.dag_run_id": str(context["run_id"])},
            )
            if stage.role == "decides":
                return step.proceed
            return step.data if stage.role == "sources" else step.cycle_id

        return run

    tasks: list = []
    data = cycle_id = None
    for stage in stages:
        if stage.role == "sources":
            current = data = make(stage)()
        elif stage.role == "opens":
            current = cycle_id = make(stage)(data=data) if data is not None else make(stage)()
        else:
            current = make(stage)(cycle_id)
        if tasks:
            tasks[-1] >> current
        tasks.append(current)
    return tasks


@dag(
    dag_id="ctloop_cycle",
    schedule=SETTINGS.schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={"data": "", "force": False},
    tags=["ctloop"],
    doc_md=__doc__,
)
def ctloop_cycle():
    from ctloop.cycle.declaration import stages_for

    _stage_tasks("ctloop_cycle", stages_for(CONFIG))


@dag(
    dag_id="ctloop_drift_watch",
    schedule=SETTINGS.drift_watch_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={"data": ""},
    tags=["ctloop"],
)
def ctloop_drift_watch():
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    from ctloop.cycle.declaration import up_to_decision

    if SETTINGS.source == "production":

        @task.short_circuit(task_id="production_drift")
        def production_drift() -> bool:
            from ctloop.cycle.production import watch_production

            return watch_production(CONFIG_PATH)

        tasks = [production_drift()]
    else:
        tasks = _stage_tasks("ctloop_drift_watch", up_to_decision())
    tasks[-1] >> TriggerDagRunOperator(
        task_id="start_cycle",
        trigger_dag_id="ctloop_cycle",
        # production: the drift was found in live traffic, not in the harvested records; train on it
        conf={"force": True} if SETTINGS.source == "production" else {"data": "{{ params.data or '' }}"},
        wait_for_completion=False,
    )


cycle_dag = ctloop_cycle()
drift_watch_dag = ctloop_drift_watch()
