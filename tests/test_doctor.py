"""`ctloop doctor` (#29): each check of a config's environment, with its fix, against the real
components: the embedded registry, a SQLite log store, the tiny base model; and an unreachable
registry and a missing model reported, not raised."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import free_port


def _doctor(config, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctloop", "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


@pytest.mark.slow
def test_doctor_passes_a_working_setup_and_names_what_is_missing(tiny_base, tmp_path, monkeypatch):
    config = tmp_path / "ok.yaml"
    config.write_text(f"workspace: {tmp_path / 'ws'}\nmodel:\n  base: {tiny_base}\n  device: cpu\n")
    monkeypatch.setenv("CTLOOP_FEEDBACK_TOKEN", "t")
    monkeypatch.delenv("CTLOOP_ADMIN_TOKEN", raising=False)
    done = _doctor(config)
    assert done.returncode == 0, done.stderr
    out = done.stderr
    for line in (
        "ok   workspace:",
        "ok   registry:",
        "champion none yet",
        "ok   log store:",
        "ok   device: cpu",
        "ok   base model:",
        "chat format",
        "ok   $CTLOOP_FEEDBACK_TOKEN: set",
        "warn $CTLOOP_ADMIN_TOKEN: not set",
        "fix: export CTLOOP_ADMIN_TOKEN=",
    ):
        assert line in out, (line, out)

    broken = tmp_path / "broken.yaml"
    broken.write_text(
        f"workspace: {tmp_path / 'ws2'}\nmodel:\n  base: {tmp_path / 'no-model'}\n"
        f"registry:\n  tracking_uri: http://127.0.0.1:{free_port()}\n"
    )
    done = _doctor(broken)
    assert done.returncode == 3, done.stderr
    assert "FAIL registry:" in done.stderr and "FAIL base model:" in done.stderr and "model.base" in done.stderr
    assert "ok   log store:" in done.stderr  # one failure does not stop the other checks
    assert "failed: registry, base model" in done.stderr and "Traceback" not in done.stderr
