"""The workspace lock: one cycle at a time, a clear message naming the holder, crash recovery."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from ctloop.errors import WorkspaceError
from ctloop.workspace import Workspace, workspace_lock

HOLDER = """
import sys, time
from pathlib import Path
from ctloop.workspace import Workspace, workspace_lock
with workspace_lock(Workspace(Path(sys.argv[1])), "holding for a test"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _start_holder(root) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_cycle_is_refused_with_the_holder_named_and_a_crashed_holder_releases(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    holder = _start_holder(workspace.root)
    try:
        started = time.monotonic()
        with pytest.raises(WorkspaceError, match=rf"busy: pid {holder.pid} on .*holding for a test"):
            with workspace_lock(workspace, "second", wait_seconds=1.0):
                pass
        assert time.monotonic() - started >= 1.0  # it waited before giving up
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup code runs
        holder.wait()
    with workspace_lock(workspace, "after the crash"):  # the OS released the dead holder's lock
        assert "after the crash" in (workspace.root / ".lock").read_text()


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    with workspace_lock(workspace, "outer"):
        with workspace_lock(workspace, "inner"):
            pass
        assert "outer" in (workspace.root / ".lock").read_text()
    assert (workspace.root / ".lock").read_text() == ""
