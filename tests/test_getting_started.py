"""#29: a newcomer goes from a fresh clone to a cycle on their own JSONL file by following Getting
started alone. This runs the page's commands in order, as written (the venv's `ctloop` is this
interpreter's; `git clone` and `source` are the reader's, and `make demo` ends in `ctloop demo`),
in an empty folder, with the reader's own file written where the page asks for one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, quickstart_rows

PAGE = REPO / "docs" / "getting-started.md"


def _commands() -> list[str]:
    """The page's shell commands, in order: every line of its bash blocks, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _as_run_here(command: str) -> str | None:
    if command.startswith(("git clone", "source ")):
        return None  # the reader's clone and shell
    python = f"{sys.executable} -m ctloop"
    if command == "make demo":
        return f"{python} demo"  # make demo: install, then `ctloop demo`
    assert command.startswith((".venv/bin/ctloop", "cp ")), f"a command the test does not know: {command}"
    return command.replace(".venv/bin/ctloop", python)


@pytest.mark.slow
def test_getting_started_runs_as_written(tmp_path):
    commands = _commands()
    assert any("--data my.jsonl" in c for c in commands) and "make demo" in commands
    own = [json.loads(line) for line in quickstart_rows("pretrain.jsonl")[:300]]  # the reader's data
    (tmp_path / "my.jsonl").write_text("".join(json.dumps(row) + "\n" for row in own))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTLOOP_", "MLFLOW_"))}
    for command in commands:
        runnable = _as_run_here(command)
        if runnable is None:
            continue
        done = subprocess.run(runnable, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    cycles = sorted((tmp_path / "ctloop-workspace" / "cycles").glob("*/cycle.json"))
    datas = [json.loads(path.read_text()).get("data", "") for path in cycles]
    assert any(Path(data).name == "my.jsonl" for data in datas), datas  # a cycle ran on the reader's file
