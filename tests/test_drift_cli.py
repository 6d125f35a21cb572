"""`ctloop drift` end to end: real embeddings from the tiny base model, exit codes, JSON, HTML report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import quickstart_rows

pytestmark = pytest.mark.slow

ROWS = 150


def _ctloop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctloop", *args], capture_output=True, text=True, timeout=300)


def _write(path: Path, rows: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(rows) + b"\n" if rows else b"")
    return path


@pytest.fixture(scope="module")
def files(tiny_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drift-cli")
    old = quickstart_rows("old_domain.jsonl")
    config = root / "ctloop.yaml"
    config.write_text(f"model:\n  base: {tiny_base}\ndrift:\n  embedder: base_model\n")
    return {
        "config": config,
        # Two disjoint, interleaved slices of the same domain: even rows and odd rows.
        "reference": _write(root / "reference.jsonl", old[0::2][:ROWS]),
        "same_domain": _write(root / "same_domain.jsonl", old[1::2][:ROWS]),
        "new_domain": _write(root / "new_domain.jsonl", quickstart_rows("new_domain.jsonl", ROWS)),
        "empty": _write(root / "empty.jsonl", []),
        "root": root,
    }


def _drift_json(files: dict[str, Path], current: str, *extra: str) -> tuple[int, dict]:
    result = _ctloop(
        "drift",
        "--reference",
        str(files["reference"]),
        "--current",
        str(files[current]),
        "--config",
        str(files["config"]),
        "--json",
        *extra,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def _check_shape(out: dict) -> None:
    assert out["n_reference"] == ROWS
    assert [d["name"] for d in out["detectors"]] == ["mmd", "mean"]  # the default detectors
    for detector in out["detectors"]:
        assert set(detector) >= {"name", "statistic", "p_value", "drift"}
        assert isinstance(detector["statistic"], float)
        assert 0 < detector["p_value"] <= 1


def test_same_domain_is_not_drift_and_writes_the_report(files):
    report = files["root"] / "same.html"
    code, out = _drift_json(files, "same_domain", "--report", str(report))
    _check_shape(out)
    assert code == 0, out
    assert out["drift"] is False
    assert out["outcome"] == "no_drift"
    assert out["n_current"] == ROWS
    assert not any(d["drift"] for d in out["detectors"])
    page = report.read_text(encoding="utf-8")
    assert "<svg" in page


def test_new_domain_is_drift(files):
    code, out = _drift_json(files, "new_domain")
    _check_shape(out)
    assert code == 3, out
    assert out["drift"] is True
    assert out["outcome"] == "drift"
    # new_domain.jsonl carries a few deliberately broken rows: skipped and counted, not fatal.
    assert out["n_current"] + out["skipped_rows"]["current"] == ROWS
    assert all(d["drift"] for d in out["detectors"])
    assert all(d["p_value"] < 0.01 for d in out["detectors"])


def test_empty_current_file_is_a_clear_error(files):
    result = _ctloop(
        "drift",
        "--reference",
        str(files["reference"]),
        "--current",
        str(files["empty"]),
        "--config",
        str(files["config"]),
        "--json",
    )
    assert result.returncode == 2
    assert "empty.jsonl" in result.stderr
    assert "no valid records" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_online_mode_alarms_on_a_new_domain_stream_only(files):
    # The reference (150 rows) is small for an online detector: a window of 20 keeps it valid.
    code, same = _drift_json(files, "same_domain", "--online", "--ert", "400", "--window", "20")
    assert (code, same["mode"], same["alarm_rows"]) == (0, "online", [])  # seeded: deterministic
    code, shifted = _drift_json(files, "new_domain", "--online", "--ert", "400", "--window", "20")
    assert code == 3 and shifted["drift"] is True
    assert shifted["alarm_rows"][0] < 60  # the first full window already looks unlike the reference
