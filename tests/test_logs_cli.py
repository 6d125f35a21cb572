"""Reading the request log and its feedback from the command line (#29): `ctloop logs list|show`
and `ctloop feedback list|export`, filtered by time, user, version and rating, on a real SQLite store."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from ctloop.logstore.requests import FeedbackRecord
from ctloop.workspace import Workspace
from test_harvest import _logged


def _ctloop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctloop", *args], capture_output=True, text=True, timeout=120)


def test_logs_and_feedback_can_be_listed_filtered_shown_and_exported(tmp_path):
    workspace = Workspace(tmp_path / "ws").create()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"workspace": str(workspace.root), "model": {"base": "unused"}}))
    _logged(
        workspace,
        [
            ("r1", "q1 [pypi]", "wrong", FeedbackRecord("r1", rating=-1, correction="right")),
            ("r2", "q2", "good", FeedbackRecord("r2", rating=1)),
            ("r3", "q3", "bad", FeedbackRecord("r3", rating=-1)),
            ("r4", "q4", "meh", None),
        ],
    )
    listed = _ctloop("logs", "list", "--config", str(config), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["request_id"] for r in rows] == ["r4", "r3", "r2", "r1"]  # newest first
    assert rows[0]["feedback"] is None and rows[1]["feedback"]["score"] == 0.0
    down = json.loads(_ctloop("logs", "list", "--config", str(config), "--rated", "down", "--json").stdout)
    assert {r["request_id"] for r in down} == {"r1", "r3"}
    corrected = json.loads(
        _ctloop("feedback", "list", "--config", str(config), "--rated", "corrected", "--json").stdout
    )
    assert [r["feedback"]["correction"] for r in corrected] == ["right"]
    table = _ctloop("logs", "list", "--config", str(config), "--since", "1h")
    assert "[pypi]" in table.stderr  # printed as written, brackets included
    shown = json.loads(_ctloop("logs", "show", "r1", "--config", str(config)).stdout)
    assert shown["answer"] == "wrong" and [f["correction"] for f in shown["feedback"]] == ["right"]
    missing = _ctloop("logs", "show", "nope", "--config", str(config))
    assert missing.returncode == 2 and "no logged request has id 'nope'" in missing.stderr
    out = tmp_path / "feedback.jsonl"
    exported = _ctloop("feedback", "export", str(out), "--config", str(config))
    assert exported.returncode == 0 and "wrote 3 answers" in exported.stderr
    assert {json.loads(line)["request_id"] for line in out.read_text().splitlines()} == {"r1", "r2", "r3"}
    wrong = _ctloop("logs", "list", "--config", str(config), "--rated", "sideways")
    assert wrong.returncode == 2 and "use up, down, corrected, any or none" in wrong.stderr
