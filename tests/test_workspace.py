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


def test_a_copied_workspace_never_writes_into_the_original(tmp_path):
    """`cp -r ws ws-copy`: the copy's MLflow database still names ws's artifacts; opening it says so,
    and `ctloop workspace relocate` points it at the copy's own (#17 item 2)."""
    import shutil
    import subprocess
    import sys

    import pytest

    from ctloop.config import RegistryConfig
    from ctloop.errors import WorkspaceError
    from ctloop.registry.client import open_registry

    original = Workspace(tmp_path / "ws").create()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    settings = RegistryConfig(model_name="copied")
    open_registry(settings, original).register_adapter_dir(adapter, "k1", {}, "v1")
    shutil.copytree(original.root, tmp_path / "ws-copy")
    copy = Workspace(tmp_path / "ws-copy")
    with pytest.raises(WorkspaceError, match="copied or moved.*ctloop workspace relocate"):
        open_registry(settings, copy)
    relocated = subprocess.run(
        [sys.executable, "-m", "ctloop", "workspace", "relocate", "--workspace", str(copy.root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert relocated.returncode == 0 and "1 experiments, 1 runs" in relocated.stderr, relocated.stderr
    registry = open_registry(settings, copy)
    before = sorted(p.relative_to(original.root) for p in original.artifacts_dir.rglob("*"))
    registry.register_adapter_dir(adapter, "k2", {}, "v2 from the copy")
    assert sorted(p.relative_to(original.root) for p in original.artifacts_dir.rglob("*")) == before
    assert (registry.download_adapter(1, tmp_path / "cache") / "adapter_config.json").is_file()
