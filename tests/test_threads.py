"""ctloop sets torch's CPU threads from the CPUs the process may use, not the machine's cores (#29):
under a scheduler's environment (no OMP_NUM_THREADS, a CPU affinity or quota) training ran 10x
slower than from a shell."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ctloop.threads import usable_cpus


def test_the_cgroup_quota_caps_the_cpus(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == affinity  # no cgroup files: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: one thread
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # cgroup v1, no quota
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert usable_cpus(tmp_path) == affinity  # unreadable: no cap
    (tmp_path / "cpu.max").unlink()
    nested = tmp_path / "system.slice" / "airflow-worker.service"
    nested.mkdir(parents=True)
    (nested / "cpu.max").write_text("100000 100000\n")  # the worker's own cgroup: one CPU
    assert usable_cpus(tmp_path, "/system.slice/airflow-worker.service") == 1
    assert usable_cpus(tmp_path, "/system.slice") == affinity  # a sibling's quota is not ours


TRAIN = """
import json, os, sys, torch
from pathlib import Path
from ctloop.config import LoraConfig, ModelConfig, TrainConfig
from ctloop.data.records import Record
from ctloop.training.trainer import train_adapter
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # a scheduler's slot: one CPU
torch.set_num_threads(2)  # what torch may have chosen from the machine's cores
threads = json.loads(sys.argv[3])
rows = [Record(f"r{i}", f"question {i}", f" answer {i}") for i in range(8)]
result = train_adapter(rows, model=ModelConfig(base=sys.argv[1], device="cpu", threads=threads), lora=LoraConfig(),
                       out_dir=Path(sys.argv[2]), train=TrainConfig(epochs=1, batch_tokens=256, checkpoint_every=0))
print(json.dumps({"threads": result.threads, "torch": torch.get_num_threads()}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("threads", "omp", "expected"), [(None, None, 1), (None, "2", 2), (2, None, 2)])
def test_a_stage_run_like_a_scheduler_runs_it_uses_the_cpus_it_may_use(tiny_base, tmp_path, threads, omp, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | ({"OMP_NUM_THREADS": omp} if omp else {})
    done = subprocess.run(
        [sys.executable, "-c", TRAIN, str(tiny_base), str(tmp_path / "adapter"), json.dumps(threads)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"threads": expected, "torch": expected}
