"""Drift on live traffic: prompts in the request log against the champion's training data, through
`ctloop drift --production` and `ctloop watch` (real embeddings from the tiny base model, a real
MLflow registry, the SQLite log store)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import quickstart_rows
from ctloop.config import load_config
from ctloop.data.records import BadRow, record_from_fields, write_parquet
from ctloop.logstore.requests import RequestLog, RequestRecord
from ctloop.registry.client import open_registry
from ctloop.registry.promotion import promote
from ctloop.training.tinymodel import random_adapter
from ctloop.workspace import Workspace

pytestmark = pytest.mark.slow


def _records(name: str, rows: slice):
    """The valid records among the rows (the sample files hold a few broken rows on purpose)."""
    records = []
    for line in quickstart_rows(name)[rows]:
        try:
            records.append(record_from_fields(json.loads(line)))
        except (ValueError, BadRow):
            continue
    return records


def load_config_from(root: Path, tiny_base: Path):
    """The tests' config, written to root/ctloop.yaml: a live champion, drift on the base model's embeddings."""
    path = root / "ctloop.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "workspace": str(root / "ws"),
                "model": {"base": str(tiny_base)},
                "drift": {"embedder": "base_model", "min_rows": 50},
                "registry": {"model_name": "live"},
            }
        )
    )
    return load_config(path)


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    """A champion trained (as far as the registry knows) on Python/Perl packages, and a config."""
    root = tmp_path_factory.mktemp("production-drift")
    config = load_config_from(root, tiny_base)
    config_path = root / "ctloop.yaml"
    workspace = Workspace(root / "ws").create()
    write_parquet(
        workspace.cycle_dir("c1") / "train.parquet",
        [r for r in _records("old_domain.jsonl", slice(0, 400, 2))],
    )
    registry = open_registry(config.registry, workspace)
    adapter = random_adapter(tiny_base, root / "adapter", 1)
    registry.register_adapter_dir(adapter, "key-1", {"ctloop.gate": "PASS", "ctloop.cycle_id": "c1"}, "v1")
    promote(registry, 1, by="test", note="champion")
    return config, config_path, workspace


def _serve(config, workspace: Workspace, prompts: list[str], created_at: float) -> None:
    writer = RequestLog(workspace.shadow_store_url(config.shadow.store_url))
    for i, prompt in enumerate(prompts):
        writer.put(
            RequestRecord(
                request_id=f"{created_at}-{i}",
                model_version="1",
                endpoint="completions",
                prompt=prompt,
                answer="x",
                created_at=created_at,
            )
        )
    writer.close()


def _check(command: str, config_path: Path, since: str) -> tuple[int, dict]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctloop",
            command,
            *(["--production"] if command == "drift" else []),
            "--since",
            since,
            "--config",
            str(config_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_production_drift_fires_on_another_domain_and_stays_quiet_on_the_training_distribution(served):
    config, config_path, workspace = served
    now = time.time()
    # Yesterday: the same kind of prompts as the champion was trained on (rows it never saw).
    _serve(config, workspace, [r.prompt for r in _records("old_domain.jsonl", slice(1, 400, 2))], now - 86400)
    code, quiet = _check("drift", config_path, "25h")  # the window holds yesterday's traffic only
    assert code == 0 and quiet["outcome"] == "no_drift" and quiet["window"]["requests"] == 200
    # The last hour: games, sound, graphics.
    _serve(config, workspace, [r.prompt for r in _records("new_domain.jsonl", slice(0, 200))], now - 600)
    code, fired = _check("watch", config_path, "1h")
    assert code == 3 and fired["outcome"] == "drift" and fired["window"]["requests"] <= 200
    assert Path(fired["report"]).is_file() and fired["report"].startswith(str(workspace.root / "watch"))
    # `ctloop watch` is a look of a repeated watch: it tests at 0.05 / 168 looks (the default budget)
    # and draws the permutations that alpha needs; a one-off `ctloop drift --production` does not.
    assert (fired["watch"]["period"], fired["watch"]["look"]) == (1, 1)
    assert fired["alpha"] == pytest.approx(0.05 / 168) and "look 1 of 168" in fired["reasons"][-1]
    assert {d["name"]: d["details"]["permutations"] for d in fired["detectors"]} == {"mmd": 6719, "mean": 6719}
    assert quiet["alpha"] == 0.05 and "watch" not in quiet
    code, again = _check("watch", config_path, "1h")
    assert code == 3 and again["watch"]["look"] == 2


def test_a_watch_with_too_few_requests_says_so_instead_of_deciding(served):
    _, config_path, _ = served
    state = Path(served[2].root / "watch" / "state.json")
    before = state.read_text() if state.exists() else None
    code, result = _check("watch", config_path, "1m")
    assert code == 4 and result["outcome"] == "not_enough_data" and "not enough traffic" in result["summary"]
    assert "watch" not in result and (state.read_text() if state.exists() else None) == before  # nothing spent


def test_bad_since_values_are_one_line_errors(served):
    _, config_path, _ = served
    result = subprocess.run(
        [sys.executable, "-m", "ctloop", "watch", "--since", "yesterday", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "neither a duration" in result.stderr and "Traceback" not in result.stderr


def test_the_watch_stays_quiet_on_the_champions_own_era_when_it_trained_with_replay(tiny_base, tmp_path):
    """#23 item 1: a champion trained on games/sound/graphics prompts with half its rows replayed from
    the older Python/Perl era. Live traffic of its own era (rows it never saw) is no drift; the watch
    used to compare it with the whole mixture, replayed era included, and fired (on the quickstart's
    real prompts: 27 of 30 looks), and every alarm starts a forced cycle."""
    from ctloop.cycle.production import check_production_drift
    from ctloop.fileio import write_json

    config = load_config_from(tmp_path, tiny_base)
    workspace = Workspace(tmp_path / "ws").create()
    own = _records("new_domain.jsonl", slice(0, 320, 2))
    replayed = _records("old_domain.jsonl", slice(0, 320, 2))
    cycle = workspace.cycle_dir("c2")
    write_parquet(cycle / "train.parquet", own + replayed)
    write_json(cycle / "replay_manifest.json", {"replayed": [{"cycle": "c1", "id": r.id} for r in replayed]})
    registry = open_registry(config.registry, workspace)
    adapter = random_adapter(tiny_base, tmp_path / "adapter", 2)
    registry.register_adapter_dir(adapter, "key-2", {"ctloop.gate": "PASS", "ctloop.cycle_id": "c2"}, "v1")
    promote(registry, 1, by="test", note="champion")
    now = time.time()
    _serve(config, workspace, [r.prompt for r in _records("new_domain.jsonl", slice(1, 320, 2))], now - 600)
    quiet = check_production_drift(config, workspace, now - 3600, watch=True)
    assert quiet["outcome"] == "no_drift", quiet["summary"]
    assert quiet["n_reference"] == len(own)  # the replayed rows are not part of the reference
    # The same traffic against the replayed era alone is drift: the detectors can tell the eras apart here.
    other_era = tmp_path / "old_era.jsonl"
    other_era.write_text("".join(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n" for r in replayed))
    against_old = config.model_copy(update={"drift": config.drift.model_copy(update={"reference": str(other_era)})})
    assert check_production_drift(against_old, workspace, now - 3600, watch=True)["outcome"] == "drift"
