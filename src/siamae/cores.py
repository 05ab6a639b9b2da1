"""How many cores this process may use: its CPU affinity capped by its cgroup CPU quota (v1 and
v2, every level above it). Torch-free, so the scoring-only commands count cores as the thread
plan (:mod:`siamae.threads`) does without importing torch."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def quota_cores(quota_us: int | None, period_us: int | None) -> int | None:
    """Cores a CFS quota allows (rounded up: 1.5 cores of quota keep 2 threads busy), or None."""
    if quota_us is None or period_us is None or quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def _read_v2(path: Path) -> int | None:
    # cpu.max: "<quota> <period>" or "max <period>"
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else quota_cores(int(quota), int(period))


def _read_v1(folder: Path) -> int | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_cores(quota, period)  # -1: no quota


def _ancestors(root: Path, relative: str) -> list[Path]:
    # A quota anywhere above this process's cgroup limits it too: look at every level.
    parts = [p for p in relative.strip().split("/") if p]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cores(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """The tightest CPU quota over this process's cgroups (v2 ``cpu.max``, v1 CFS), or None."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    limits: list[int] = []
    for line in lines or ["0::/"]:
        _, controllers, relative = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # cgroup v2, unified hierarchy
            for folder in _ancestors(root, relative):
                limits.append(_read_v2(folder / "cpu.max") or 0)
        elif "cpu" in controllers.split(","):  # cgroup v1 cpu controller
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                for folder in _ancestors(mount, relative):
                    limits.append(_read_v1(folder) or 0)
    found = [n for n in limits if n > 0]
    return min(found) if found else None


def affinity_cores() -> int:
    """The cores of this process's CPU affinity (all cores where the system cannot tell)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # macOS, Windows


def usable_cores(
    affinity: int | None = None,
    quota: int | None = None,
    root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_CGROUP,
) -> int:
    """Cores this process may run on: its CPU affinity, capped by its cgroup quota."""
    if affinity is None:
        affinity = affinity_cores()
    if quota is None:
        quota = cgroup_cores(root, proc_cgroup)
    return max(1, min(affinity, quota) if quota else affinity)
