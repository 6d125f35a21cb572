"""The cycle DAG under a real Airflow 3 scheduler: the scheduler, the DAG processor and the API
server run as separate processes on loopback (as `airflow standalone` starts them, LocalExecutor;
metadata on the throwaway PostgreSQL under `make test`, as production Airflow keeps it, else SQLite,
which under load can answer a trigger with "Database error" while the scheduler holds its lock), the run is triggered through Airflow's REST API with a data conf, and every task
runs in its own process. `test_airflow.py` covers the DAGs' logic in one process (`dag.test()`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import REPO, free_port, postgres_database, quickstart_rows

pytestmark = pytest.mark.slow


def _wait_for(what: str, check, timeout: float, logs: Path, progress=None):
    """Poll `check` until it returns a value. The wait ends after `timeout` seconds without
    progress: each time `progress()` returns something new (a task's state moved), it starts again, so a
    slow but moving run on a loaded machine is waited for, and a stuck one is not."""
    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        now = progress() if progress is not None else None
        if now is not None and now != seen:  # None: no answer, which is no progress
            deadline, seen = time.monotonic() + timeout, now
        time.sleep(1)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log")))
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def test_the_cycle_dag_runs_under_a_real_scheduler_triggered_through_the_rest_api(tiny_base, tmp_path):
    if os.environ.get("CTLOOP_TEST_POSTGRES_URL"):
        with postgres_database("airflow") as metadata:
            _run_the_dag(tiny_base, tmp_path, metadata)
    else:
        _run_the_dag(tiny_base, tmp_path, f"sqlite:///{tmp_path / 'airflow.db'}")


def _the_gate_decision_is_an_info_line(task_logs: Path) -> None:
    """#29: ctloop's normal output went to stderr, which Airflow logs at ERROR level, so a task log
    showed the gate's decision as an error. The gate task's log holds it at INFO."""
    import json

    logs = [p for p in task_logs.rglob("*.log") if "task_id=gate" in str(p)]
    assert logs, sorted(str(p) for p in task_logs.rglob("*"))[:20]
    lines = [line for p in logs for line in p.read_text(errors="replace").splitlines() if "gate PASS" in line]
    assert lines, logs
    for line in lines:
        level = json.loads(line).get("level", "") if line.startswith("{") else ("error" if "ERROR" in line else "")
        assert level.lower() != "error", line


def _run_the_dag(tiny_base, tmp_path: Path, metadata: str) -> None:
    home, logs, port = tmp_path / "airflow-home", tmp_path / "logs", free_port()
    logs.mkdir()
    data = tmp_path / "new.jsonl"
    data.write_bytes(b"\n".join(quickstart_rows("old_domain.jsonl")[:200]) + b"\n")
    config = {
        "workspace": str(tmp_path / "ws"),
        "model": {"base": str(tiny_base), "max_seq_tokens": 96},
        "data": {"min_rows": 20, "holdout_fraction": 0.15},
        "drift": {"embedder": "base_model", "permutations": 200, "min_rows": 20},
        "train": {"epochs": 1, "learning_rate": 0.01, "batch_tokens": 512},
        "gate": {"min_new_improvement": -1.0, "max_old_regression": 1.0, "min_examples": 10},
        "registry": {"model_name": "scheduled-adapter"},
        "orchestration": {"retries": 0},
    }
    (tmp_path / "ctloop.yaml").write_text(yaml.safe_dump(config))
    airflow = str(Path(sys.executable).with_name("airflow"))
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": "ctloop-test-secret-not-for-production",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata,
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "CTLOOP_CONFIG": str(tmp_path / "ctloop.yaml"),
        "OMP_NUM_THREADS": "1",
    }
    if metadata.startswith("postgresql"):
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] = metadata  # psycopg 3 serves async too (default: asyncpg)
    migrate = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    commands = {
        "scheduler": ["scheduler"],
        "dag-processor": ["dag-processor"],
        "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
    }
    processes = [
        subprocess.Popen([airflow, *args], env=env, stdout=(logs / f"{name}.log").open("w"), stderr=subprocess.STDOUT)
        for name, args in commands.items()
    ]
    api = f"http://127.0.0.1:{port}/api/v2"
    try:

        def dag_parsed() -> bool:
            try:
                return httpx.get(f"{api}/dags/ctloop_cycle", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for("the DAG processor to parse dags/ and the API server to answer", dag_parsed, 300, logs)
        started = httpx.post(
            f"{api}/dags/ctloop_cycle/dagRuns", timeout=30, json={"logical_date": None, "conf": {"data": str(data)}}
        )
        assert started.status_code == 200, started.text
        run_id = started.json()["dag_run_id"]

        def get(path: str) -> dict | None:
            """An idempotent read of the API; None when it does not answer in time (a loaded
            machine: Airflow's API server shares the cores with the scheduler and the tasks)."""
            try:
                return httpx.get(f"{api}{path}", timeout=30).json()
            except httpx.TransportError:
                return None

        def finished() -> str | None:
            state = (get(f"/dags/ctloop_cycle/dagRuns/{run_id}") or {}).get("state")
            return state if state in ("success", "failed") else None

        def task_states() -> tuple | None:
            tasks = get(f"/dags/ctloop_cycle/dagRuns/{run_id}/taskInstances")
            return None if tasks is None else tuple(sorted((t["task_id"], t["state"]) for t in tasks["task_instances"]))

        assert _wait_for("the DAG run to finish", finished, 600, logs, progress=task_states) == "success"
        tasks = _wait_for(
            "the task instances", lambda: get(f"/dags/ctloop_cycle/dagRuns/{run_id}/taskInstances"), 120, logs
        )
        states = {t["task_id"]: t["state"] for t in tasks["task_instances"]}
        from ctloop.cycle.declaration import CYCLE

        assert states == {stage.name: "success" for stage in CYCLE}
        pids = {t["task_id"]: t.get("pid") for t in tasks["task_instances"]}
        assert len({pid for pid in pids.values() if pid}) == len(CYCLE)  # each task in its own process
        _the_gate_decision_is_an_info_line(home / "logs")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    from ctloop.config import load_config
    from ctloop.registry.client import open_registry
    from ctloop.workspace import resolve_workspace

    loaded = load_config(tmp_path / "ctloop.yaml")
    registry = open_registry(loaded.registry, resolve_workspace(None, loaded))
    assert [v.version for v in registry.versions()] == [1] and registry.alias("champion") == 1
    # Each task names the cycle's MLflow run in its log, and the run names the DAG run (#29).
    run = registry.client.get_run(registry.version(1).run_id)
    assert run.data.tags["airflow.dag_id"] == "ctloop_cycle" and run.data.tags["airflow.dag_run_id"] == run_id
    gate_log = "".join(
        p.read_text(errors="replace") for p in (home / "logs").rglob("*.log") if "task_id=gate" in str(p)
    )
    assert f"stage gate: MLflow run {run.info.run_id} in experiment" in gate_log, gate_log[-2000:]
