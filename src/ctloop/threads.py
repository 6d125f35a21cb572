"""How many CPU threads torch uses.

torch's default is the machine's physical cores, whatever share of them the process may use. In a
container or an Airflow worker with a quota of 2 CPUs on a 64-core host, 32 threads then take turns
on 2 CPUs: training ran at 95 tokens/s under Airflow against 900-1,050 from a shell on the same
data. So ctloop sets the count itself, before a stage runs its model: `model.threads` when given,
else OMP_NUM_THREADS when set (torchrun sets it per process), else the CPUs the process may use:
its CPU affinity, capped by its cgroup's CPU quota.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, own_cgroup: str | None = None) -> int:
    """The CPUs this process may run on (affinity), capped by the smallest CPU quota of its cgroup
    and every cgroup above it (v2 `cpu.max`; v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us` at the
    cpu controller's root only), rounded up; at least 1. `own_cgroup`: the process's cgroup path (default: /proc/self/cgroup)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quotas = [q for folder in _cgroup_chain(cgroup_root, own_cgroup) if (q := _cgroup_quota(folder)) is not None]
    return max(1, min(cpus, math.ceil(min(quotas))) if quotas else cpus)


def _cgroup_chain(root: Path, own: str | None) -> list[Path]:
    """The process's cgroup folder and each one above it, up to `root` (a nested cgroup, as in a
    systemd slice, sets its quota there, not at the root)."""
    if own is None:
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            lines = []
        # cgroup v2: "0::/path"; v1: "N:cpu,cpuacct:/path"
        own = next((line.split(":", 2)[2] for line in lines if line.startswith("0::") or ":cpu" in line), "/")
    parts = [p for p in own.strip("/").split("/") if p and p != ".."]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _cgroup_quota(root: Path) -> float | None:
    """CPUs' worth of the quota, or None when there is none (or it cannot be read)."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            parts = v2.read_text().split()
            period = int(parts[1]) if len(parts) > 1 else 100_000
            return None if parts[0] == "max" else int(parts[0]) / period
        quota_file, period_file = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():
            quota = int(quota_file.read_text())
            return None if quota <= 0 else quota / int(period_file.read_text())
    except (OSError, ValueError):
        return None
    return None


def chosen_threads(requested: int | None) -> int:
    """The count the module docstring describes: `requested`, else OMP_NUM_THREADS, else the usable CPUs."""
    if requested is not None:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return usable_cpus()


def use_threads(requested: int | None) -> int:
    """Set torch's intra-op threads to `chosen_threads(requested)`, and return the count."""
    import torch

    count = chosen_threads(requested)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
