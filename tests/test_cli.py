"""The command line's edges: fast help, clear errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _ctloop(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctloop", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys, ctloop.cli; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    help_text = _ctloop("--help").stdout
    for command in ("run", "demo", "status", "promote", "rollback", "validate-config"):
        assert command in help_text


def test_validate_config_lists_every_problem_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  bse: x\nreplay:\n  ratio: 1.5\ntrain:\n  lerning_rate: 0.1\n")
    result = _ctloop("validate-config", str(bad))
    assert result.returncode == 2
    assert "4 problems" in result.stderr
    for expected in (
        "model.base: required",
        "did you mean 'base'",
        "replay.ratio: got 1.5",
        "did you mean 'learning_rate'",
    ):
        assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_config_warns_about_settings_that_can_never_decide(tmp_path):
    """#29: production.example's holdout_fraction 0.05 with gate.min_examples 100 cannot decide below
    about 2,000 rows, and nothing said so."""
    risky = tmp_path / "risky.yaml"
    risky.write_text(
        "model:\n  base: x\n  max_seq_tokens: 64\ndata:\n  holdout_fraction: 0.05\n  min_rows: 200\n"
        "gate:\n  min_examples: 100\ntrain:\n  batch_tokens: 65536\n"
    )
    result = _ctloop("validate-config", str(risky))
    assert result.returncode == 0, result.stderr
    assert "a cycle needs at least 1990 new rows to decide, but data.min_rows=200" in result.stderr
    assert "trains at most 1 optimizer steps" in result.stderr
    assert "valid, with 2 warning(s)" in result.stderr
    fine = tmp_path / "fine.yaml"  # the defaults' own 20 rows are warned about too: 295 are needed to decide
    fine.write_text("model:\n  base: x\ndata:\n  min_rows: 300\n")
    assert "warning" not in _ctloop("validate-config", str(fine)).stderr


def test_status_without_a_workspace_says_what_to_do(tmp_path):
    result = _ctloop("status", cwd=tmp_path)
    assert result.returncode == 2
    assert "no workspace" in result.stderr and "ctloop demo" in result.stderr


def test_run_with_a_missing_data_file_names_it(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  base: nowhere\n")
    result = _ctloop(
        "run", "--config", str(config), "--data", str(tmp_path / "missing.jsonl"), "--workspace", str(tmp_path / "ws")
    )
    assert result.returncode == 2
    assert "missing.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_run_with_a_missing_base_model_names_the_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  base: /nowhere/model\n")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "completion": "c"}\n')
    result = _ctloop("run", "--config", str(config), "--data", str(data), "--workspace", str(tmp_path / "ws"))
    assert result.returncode == 2
    assert "model.base='/nowhere/model'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_every_command_but_serve_and_demo_has_json_and_it_is_strict_json(tmp_path):
    """#29 item 6: `--json` on every command (serve is a server, demo a walkthrough for people); the
    output is strict JSON on stdout, and the console's lines go to stderr."""
    import json

    import typer.main

    from ctloop.cli import app

    def commands(group, path=""):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from commands(command, f"{path}{name} ")
            else:
                yield f"{path}{name}", {p.name for p in command.params}

    missing = [name for name, params in commands(typer.main.get_command(app)) if "as_json" not in params]
    assert sorted(missing) == ["demo", "serve"], missing

    risky = tmp_path / "risky.yaml"
    risky.write_text(
        "model:\n  base: x\ndata:\n  holdout_fraction: 0.05\n  min_rows: 200\ngate:\n  min_examples: 100\n"
    )
    result = _ctloop("validate-config", str(risky), "--json")
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)
    assert parsed["valid"] is True and len(parsed["warnings"]) == 1 and "warning" not in result.stderr
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  base: {tmp_path / 'no-model'}\nworkspace: {tmp_path / 'ws'}\n")
    doctor = _ctloop("doctor", "--config", str(config), "--json")
    assert doctor.returncode == 3, doctor.stderr  # the base model is missing
    checks = json.loads(doctor.stdout)
    assert "base model" in " ".join(checks["failed"]) and all({"name", "status"} <= set(c) for c in checks["checks"])
