"""Whole cycles on a tiny model against a real MLflow (SQLite) registry in a temp folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import quickstart_rows
from ctloop.config import config_from_dict
from ctloop.cycle.run import run_cycle
from ctloop.errors import DataError
from ctloop.fileio import read_json
from ctloop.registry.client import CHALLENGER, CHAMPION, open_registry, relocate_embedded
from ctloop.workspace import Workspace

pytestmark = pytest.mark.slow


def _config(base: Path, **overrides):
    raw = {
        "model": {"base": str(base), "max_seq_tokens": 96},
        "data": {"min_rows": 20, "holdout_fraction": 0.15},
        "drift": {"embedder": "base_model", "text": "both", "permutations": 200, "min_rows": 20},
        "replay": {"ratio": 0.4, "holdout_rows": 40},
        "train": {"epochs": 2, "learning_rate": 0.01, "batch_tokens": 512, "log_every": 2},
        "eval": {"batch_tokens": 2048, "slice_by": "source"},
        # Permissive thresholds: these tests check the mechanics; the gate rules have their own tests.
        "gate": {
            "min_new_improvement": 0.0,
            "max_old_regression": 1.0,
            "max_cumulative_regression": 1.0,
            "seed_spread": 0.0,  # the tiny test model improves by well under 1%; seed noise has its own test
            "min_examples": 10,
        },
        "registry": {"model_name": "test-adapter", "experiment": "test"},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    return config_from_dict(raw)


def _data(tmp_path: Path, name: str, source: str, limit: int) -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(quickstart_rows(source, limit)) + b"\n")
    return path


@pytest.fixture(scope="module")
def two_cycles(tiny_base, tmp_path_factory):
    """Cycle 1 on old-domain data, cycle 2 on new-domain data with broken rows; shared by tests."""
    tmp = tmp_path_factory.mktemp("pipeline")
    workspace = Workspace(tmp / "ws")
    config = _config(tiny_base)
    old = _data(tmp, "old.jsonl", "old_domain.jsonl", 200)
    new = _data(tmp, "new.jsonl", "new_domain.jsonl", 200)  # rows 101-103 are broken
    first = run_cycle(config, old, workspace)
    second = run_cycle(config, new, workspace)
    return workspace, config, first, second, new


def test_first_cycle_beats_the_base_model_and_becomes_champion(two_cycles):
    workspace, config, first, _, _ = two_cycles
    assert first.status == "registered" and first.version == 1
    assert first.gate["reference"] == "base"
    new = first.means["new_holdout"]
    assert new["candidate"] < new["base"]  # the adapter really learned the domain
    registry = open_registry(config.registry, workspace)
    assert registry.alias(CHAMPION) == 1


def test_second_cycle_replays_old_data_and_measures_forgetting(two_cycles):
    workspace, config, first, second, _ = two_cycles
    assert second.status == "registered" and second.version == 2
    assert second.champion_before == 1 and second.gate["reference"] == "champion"
    # the first champion's own era (cycle 1's holdout) is scored for the cumulative budget (#23 item 2)
    assert set(second.means) == {"new_holdout", "replay_holdout", "anchor_holdout"}
    assert set(second.means["replay_holdout"]) == {"candidate", "champion"}
    manifest = read_json(Path(second.cycle_dir) / "replay_manifest.json")
    assert manifest["replayed_rows"] > 0
    assert {item["cycle"] for item in manifest["replayed"]} == {first.cycle_id}
    assert manifest["replayed_tokens"] >= manifest["target_replay_tokens"]
    first_holdout = {r["id"] for r in _jsonl_ids(Path(first.cycle_dir) / "new_holdout.parquet")}
    assert set(manifest["replay_holdout"]) <= first_holdout  # forgetting is measured on unseen rows
    registry = open_registry(config.registry, workspace)
    assert registry.alias(CHALLENGER) == 2 and registry.alias(CHAMPION) == 1
    # The first champion is the anchor of the cumulative budget (here the champion itself), and the
    # evaluation rows were checked against what the champion trained on, not only the candidate.
    assert any("vs the first champion (cumulative)" in reason for reason in second.gate["reasons"])
    contamination = read_json(Path(second.cycle_dir) / "contamination.json")
    assert contamination["checked_against"] == "the candidate's training rows and champion v1's"


def test_drift_triggered_the_second_cycle_and_is_reported(two_cycles):
    _, _, first, second, _ = two_cycles
    assert first.trigger.startswith("no champion yet")
    assert second.trigger.startswith("drift detected")
    drift = read_json(Path(second.cycle_dir) / "drift.json")
    assert drift["outcome"] == "drift" and {d["name"] for d in drift["detectors"]} == {"mmd", "mean"}
    assert "<svg" in (Path(second.cycle_dir) / "drift.html").read_text()


def test_data_like_the_champions_is_not_trained_on_unless_forced(two_cycles, tmp_path):
    import shutil

    original, config, _, _, _ = two_cycles
    workspace = Workspace(tmp_path / "ws")  # a copy, so the other tests see the two cycles' registry
    shutil.copytree(original.root, workspace.root)
    relocate_embedded(workspace)  # else the copy's MLflow database would write into the original's artifacts
    same_domain = tmp_path / "more_old.jsonl"
    same_domain.write_bytes(b"\n".join(quickstart_rows("old_domain.jsonl", 400)[200:]) + b"\n")
    registry = open_registry(config.registry, workspace)
    versions_before = [v.version for v in registry.versions()]
    skipped = run_cycle(config, same_domain, workspace)
    assert skipped.status == "skipped" and skipped.trigger.startswith("no drift detected")
    assert [v.version for v in registry.versions()] == versions_before
    forced = run_cycle(config, same_domain, workspace, force=True)
    assert forced.trained and forced.trigger == "forced (--force)"


def _jsonl_ids(parquet: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(parquet, columns=["id"]).to_pylist()


def test_evaluation_is_reported_per_slice(two_cycles):
    _, _, _, second, _ = two_cycles
    stored = read_json(Path(second.cycle_dir) / "eval.json")
    new_slices = stored["slice_means"]["new_holdout"]
    assert set(new_slices) <= {"games", "sound", "graphics"} and len(new_slices) >= 2
    assert sum(by["n"] for by in new_slices.values()) == len(stored["ids"]["new_holdout"])
    assert "new_holdout by slice" in (Path(second.cycle_dir) / "report.html").read_text()


def test_broken_rows_are_quarantined_and_counted(two_cycles):
    _, _, _, second, _ = two_cycles
    validation = second.validation
    assert validation["bad_by_reason"] == {"invalid_json": 1, "missing_field": 1, "wrong_type": 1}
    lines = Path(validation["quarantine_path"]).read_text().splitlines()
    assert len(lines) == 3 and validation["total_rows"] == validation["good_rows"] + 3


def test_adapter_is_saved_with_its_manifest(two_cycles):
    _, config, first, second, _ = two_cycles
    adapter = Path(second.cycle_dir) / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == config.lora.r
    manifest = json.loads((adapter / "ctloop_manifest.json").read_text())
    assert manifest["parent_version"] == 1
    assert manifest["base_revision"].startswith("sha256:")
    assert manifest["data_fingerprint"] == second.validation["fingerprint"]
    assert manifest["seed"] == config.train.seed and manifest["config"]["lora"]["r"] == config.lora.r
    training = manifest["training"]  # what the defaults resolved to, and the library versions
    assert training["compute_dtype"] in ("float32", "bfloat16") and training["attn_implementation"]
    assert training["row_width"] > 0 and training["libraries"]["torch"] == torch.__version__
    report = (Path(second.cycle_dir) / "report.html").read_text()
    assert report.count("<svg") >= 2 and "one-sided bound" in report
    # #29: the report names the version it registered and links the drift report; the rules' table
    # has their limits, and a rule that only reported reads "not checked", not PASS.
    assert "registered as" in report and "version 2" in report and 'href="drift.html"' in report
    assert "<th>limit</th>" in report
    first_report = (Path(first.cycle_dir) / "report.html").read_text()
    assert ">not checked<" in first_report and "version 1" in first_report


def test_an_mlflow_client_sees_versions_aliases_and_lineage(two_cycles):
    from mlflow import MlflowClient

    workspace, _, first, second, _ = two_cycles
    uri = workspace.tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    model = client.get_registered_model("test-adapter")
    assert model.aliases == {"champion": 1, "challenger": 2} or model.aliases == {"champion": "1", "challenger": "2"}
    v2 = client.get_model_version("test-adapter", "2")
    assert v2.tags["ctloop.parent_version"] == "1"
    assert v2.tags["ctloop.data_fingerprint"] == second.validation["fingerprint"]
    assert v2.tags["ctloop.gate"] == "PASS"
    run = client.get_run(v2.run_id)
    assert run.data.metrics["new_holdout_candidate_loss"] == pytest.approx(second.means["new_holdout"]["candidate"])
    artifacts = {a.path for a in client.list_artifacts(v2.run_id)}
    assert {"adapter", "reports"} <= artifacts


def test_running_the_same_cycle_again_registers_nothing_new(two_cycles):
    workspace, config, _, second, new = two_cycles
    again = run_cycle(config, new, workspace)
    assert again.status == "already_done" and again.version == second.version
    assert [v.version for v in open_registry(config.registry, workspace).versions()] == [1, 2]


def test_cli_status_promote_rollback(two_cycles, tmp_path):
    import shutil

    original, _, _, _, _ = two_cycles
    workspace = Workspace(tmp_path / "ws")  # a copy: this test moves aliases, the others must not see it
    shutil.copytree(original.root, workspace.root)
    relocate_embedded(workspace)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def ctloop(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ctloop", *args, "--workspace", str(workspace.root)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    status = json.loads(ctloop("status", "--json").stdout)
    assert status["aliases"] == {"champion": 1, "challenger": 2}
    assert [v["version"] for v in status["versions"]] == [1, 2]
    assert [v["state"] for v in status["versions"]] == ["champion", "challenger"]  # #22 item 4
    assert ctloop("promote").returncode == 0
    promoted = json.loads(ctloop("status", "--json").stdout)
    assert promoted["aliases"] == {"champion": 2, "challenger": None}  # nothing pending after a promotion
    assert "challenger: none pending" in ctloop("status").stdout
    rolled = ctloop("rollback")
    assert rolled.returncode == 0 and "v2 -> v1" in rolled.stderr
    final = json.loads(ctloop("status", "--json").stdout)
    assert final["aliases"] == {"champion": 1, "challenger": None}
    assert [v["state"] for v in final["versions"]] == ["champion", "rolled back"]
    assert final["champion_history"] == [1]


def test_a_failing_gate_registers_nothing(tiny_base, tmp_path):
    config = _config(tiny_base, gate={"min_new_improvement": 0.9})
    result = run_cycle(config, _data(tmp_path, "old.jsonl", "old_domain.jsonl", 120), Workspace(tmp_path / "ws"))
    assert result.status == "rejected" and result.version is None
    assert "< required +90.00%" in " ".join(result.gate["reasons"])
    assert open_registry(config.registry, Workspace(tmp_path / "ws")).versions() == []
    # #23 item 10: an unregistered cycle's rows stay out of the replay buffer (a retry would replay them)
    from ctloop.data.replay import ReplayBuffer

    assert ReplayBuffer(Workspace(tmp_path / "ws").replay_dir).cycles() == []


def test_too_many_bad_rows_stop_the_cycle_and_keep_every_bad_row(tiny_base, tmp_path):
    lines = quickstart_rows("old_domain.jsonl", 40) + [b"{not json"] * 10 + [b'{"prompt": "p"}'] * 5
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b"\n".join(lines))
    workspace = Workspace(tmp_path / "ws")
    with pytest.raises(DataError, match=r"(?s)invalid_json: 10, missing_field: 5.*stops.*max_bad_fraction"):
        run_cycle(_config(tiny_base), data, workspace)
    quarantine = next(workspace.cycles_dir.glob("*/quarantine.jsonl"))
    assert len(quarantine.read_text().splitlines()) == 15


def test_a_cycle_killed_mid_training_resumes_and_registers_once(tiny_base, tmp_path):
    import signal
    import time

    import yaml

    config_path = tmp_path / "c.yaml"
    raw = _config(tiny_base, train={"epochs": 6}).model_dump(mode="json")
    config_path.write_text(yaml.safe_dump(raw))
    data = _data(tmp_path, "old.jsonl", "old_domain.jsonl", 200)
    workspace = tmp_path / "ws"
    command = [
        sys.executable,
        "-m",
        "ctloop",
        "run",
        "--config",
        str(config_path),
        "--data",
        str(data),
        "--workspace",
        str(workspace),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120

    def training_started() -> bool:  # the MLflow run is opened just before training
        return any("run_id" in read_json(p) for p in workspace.glob("cycles/*/cycle.json"))

    while not training_started() and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # like kill -9: no cleanup runs
    victim.wait()
    state = read_json(next(workspace.glob("cycles/*/cycle.json")))
    assert state["status"] == "triggered"  # it really died mid-way
    assert not list(workspace.glob("cycles/*/adapter/adapter_model.safetensors"))

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming cycle" in resumed.stderr
    registry = open_registry(config_from_dict(raw).registry, Workspace(workspace))
    versions = registry.versions()
    assert [v.version for v in versions] == [1]
    assert versions[0].run_id == state["run_id"]  # the same MLflow run, continued


def test_lineage_traces_a_version_back_to_the_first(two_cycles):
    workspace, _, first, second, _ = two_cycles
    out = subprocess.run(
        [sys.executable, "-m", "ctloop", "lineage", "2", "--json", "--workspace", str(workspace.root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    chain = json.loads(out.stdout)
    assert [v["version"] for v in chain] == [2, 1]
    assert chain[0]["tags"]["ctloop.cycle_id"] == second.cycle_id
    assert chain[1]["tags"]["ctloop.data_fingerprint"] == first.validation["fingerprint"]
    assert chain[0]["tags"]["ctloop.replay_fingerprint"] != ""
    assert set(json.loads(chain[0]["tags"]["ctloop.eval_fingerprints"])) == {
        "new_holdout",
        "replay_holdout",
        "anchor_holdout",
    }
    assert json.loads(chain[0]["tags"]["ctloop.adapter_config"])["peft_type"] == "LORA"


@pytest.mark.parametrize("promote_first", [True, False], ids=["promote-first", "challenger-first"])
def test_a_gate_that_requires_approval_waits_for_it(tiny_base, tmp_path, promote_first):
    from ctloop.errors import RegistryError
    from ctloop.registry.promotion import awaiting_approval, promote

    config = _config(tiny_base, gate={"require_approval": True}, registry={"promote_first": promote_first})
    workspace = Workspace(tmp_path / "ws")
    result = run_cycle(config, _data(tmp_path, "old.jsonl", "old_domain.jsonl", 120), workspace)
    registry = open_registry(config.registry, workspace)
    assert result.version == 1 and awaiting_approval(registry, 1)
    assert registry.alias(CHALLENGER) is None and registry.alias(CHAMPION) is None
    with pytest.raises(RegistryError, match="awaits approval"):
        promote(registry, 1, by="t", note="too early")
    shown = [
        subprocess.run(
            [sys.executable, "-m", "ctloop", "status", *extra, "--workspace", str(workspace.root)],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        for extra in ((), ("--json",))
    ]
    assert "awaiting approval: v1 (ctloop approve 1 --by NAME --note TEXT)" in shown[0], shown[0]  # #29
    (listed,) = json.loads(shown[1])["versions"]
    assert listed["awaiting_approval"] and "ctloop.adapter_config" not in listed["tags"]  # no bulky config
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctloop",
            "approve",
            "1",
            "--by",
            "alice",
            "--note",
            "looked good",
            "--workspace",
            str(workspace.root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    info = registry.version(1)
    assert info.tags["ctloop.approved_by"] == "alice" and info.tags["ctloop.approval_note"] == "looked good"
    # `ctloop approve` follows registry.promote_first, as the register stage does (#22 item 4)
    if promote_first:
        assert registry.alias(CHALLENGER) is None and registry.alias(CHAMPION) == 1
    else:
        assert registry.alias(CHALLENGER) == 1 and registry.alias(CHAMPION) is None


def test_contaminated_evaluation_rows_are_dropped_and_counted(tiny_base, tmp_path):
    # Golden set = rows that are also training rows: every one of them is contamination.
    data = _data(tmp_path, "old.jsonl", "old_domain.jsonl", 120)
    golden = _data(tmp_path, "golden.jsonl", "old_domain.jsonl", 40)
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(b"\n".join(quickstart_rows("new_domain.jsonl", 60)[:40]) + b"\n")
    golden_sets = {"faq": str(golden), "fresh": str(clean)}
    config = _config(tiny_base, eval={"golden": golden_sets}, gate={"first_cycle": "accept"})
    result = run_cycle(config, data, Workspace(tmp_path / "ws"))
    report = read_json(Path(result.cycle_dir) / "contamination.json")
    assert report["golden_faq"]["contaminated"] >= 30  # all but those that went to the holdout
    assert report["golden_fresh"]["contaminated"] == 0
    assert "golden_fresh" in result.means
    # A second cycle on other data: the candidate replays only a sample of the first cycle's rows, but
    # the champion trained on all of them, and rows it saw favour it: they are dropped too.
    assert result.status == "registered"  # v1: the champion of the next cycle
    second = run_cycle(config, _data(tmp_path, "new.jsonl", "new_domain.jsonl", 120), Workspace(tmp_path / "ws"))
    later = read_json(Path(second.cycle_dir) / "contamination.json")
    candidate_rows = {r["id"] for r in _jsonl_ids(Path(second.cycle_dir) / "train.parquet")}
    golden_ids = {json.loads(line)["id"] for line in golden.read_text().splitlines() if line.strip()}
    assert later["checked_against"].endswith("champion v1's")
    assert later["golden_faq"]["contaminated"] > len(golden_ids & candidate_rows)
    with pytest.raises(DataError, match="overlap the training set"):
        run_cycle(
            _config(tiny_base, eval={"golden": {"faq": str(golden)}, "contamination": "fail"}, train={"seed": 1}),
            data,
            Workspace(tmp_path / "ws2"),
        )


def test_a_registry_outage_fails_the_stage_instead_of_gating_against_the_base_model(
    two_cycles, tiny_base, tmp_path, monkeypatch
):
    """#22 item 1: prepare fixes the champion a cycle is gated against. An MLflow hiccup there read
    as "no champion", so the cycle was gated (for life) against the bare base model. Now the stage
    fails, no evaluation or gate runs, and the rerun resumes against the real champion."""
    import functools
    import shutil
    from dataclasses import replace

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ctloop.cycle import stages
    from ctloop.cycle.declaration import CYCLE
    from ctloop.errors import RegistryUnavailable

    original, _, _, _, _ = two_cycles
    workspace = Workspace(tmp_path / "ws")
    shutil.copytree(original.root, workspace.root)
    relocate_embedded(workspace)
    config = _config(tiny_base, registry={"retry_delays_s": [0.0]})
    champion = open_registry(config.registry, workspace).alias(CHAMPION)
    versions_before = [v.version for v in open_registry(config.registry, workspace).versions()]
    data = tmp_path / "more_old.jsonl"
    data.write_bytes(b"\n".join(quickstart_rows("old_domain.jsonl", 400)[200:]) + b"\n")

    def outage(*args, **kwargs):
        raise MlflowException("API request failed: connection refused", error_code="INTERNAL_ERROR")

    @functools.wraps(stages.prepare_stage)  # the same signature: the same artifacts in and out
    def prepare_during_an_outage(ctx, validated):
        with monkeypatch.context() as during:
            during.setattr(MlflowClient, "get_registered_model", outage)
            return stages.prepare_stage(ctx, validated)

    during_an_outage = tuple(replace(s, function=prepare_during_an_outage) if s.name == "prepare" else s for s in CYCLE)
    with pytest.raises(RegistryUnavailable, match="did not answer get_registered_model"):
        run_cycle(config, data, workspace, force=True, cycle=during_an_outage)
    cycle_dir = next(d for d in workspace.cycles_dir.iterdir() if read_json(d / "cycle.json").get("failures"))
    state = read_json(cycle_dir / "cycle.json")
    assert "champion_before" not in state and "run_id" not in state
    assert state["failures"][-1]["stage"] == "prepare" and "RegistryUnavailable" in state["failures"][-1]["error"]
    assert not (cycle_dir / "eval.json").exists()  # gated against nothing
    assert [v.version for v in open_registry(config.registry, workspace).versions()] == versions_before

    resumed = run_cycle(config, data, workspace, force=True)  # the registry is back
    assert resumed.cycle_id == cycle_dir.name
    assert resumed.champion_before == champion and resumed.gate["reference"] == "champion"
