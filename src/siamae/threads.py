"""How many torch threads a process runs: as many as its cores, less its loader workers.

torch's default is one OpenMP thread per core of the machine, whoever else uses them. When
other processes hold those cores (this run's own loader workers, other jobs on a shared server,
a CI runner, a container with a CPU quota), OpenMP threads spin waiting for each other and a
step can take 15-30x longer. So the main process gets the cores the scheduler and the cgroup
quota allow, less one per loader worker (at least 1), and every loader worker gets 1 thread.

Precedence: ``run.threads`` (or ``--threads``), then ``OMP_NUM_THREADS`` when the user set it,
then this policy. The arithmetic is in pure functions (:func:`plan_threads`, :func:`quota_cores`)
so it can be tested with any core count, quota and worker count.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class ThreadPlan:
    """The resolved figure and where it came from (for the start line and the run folder)."""

    threads: int  # torch threads of this (main) process
    cores: int  # cores this process may use (affinity, cgroup quota, shared by local processes)
    workers: int  # loader worker processes, 1 torch thread each
    source: str  # "run.threads" (or "--threads"), "OMP_NUM_THREADS" or "policy"

    def describe(self) -> str:
        threads = f"{self.threads} torch thread{'s' if self.threads != 1 else ''}"
        cores = f"{self.cores} usable core{'s' if self.cores != 1 else ''}"
        workers = f"{self.workers} loader worker{'s' if self.workers != 1 else ''}"
        if self.source == "policy":
            return f"threads: {threads} ({cores} - {workers}, 1 thread each)"
        return f"threads: {threads} (set by {self.source}; {cores}, {workers} at 1 thread each)"

    def to_dict(self) -> dict[str, int | str]:
        return {
            "threads": self.threads,
            "cores": self.cores,
            "workers": self.workers,
            "source": self.source,
        }


def plan_threads(
    cores: int,
    workers: int,
    processes: int = 1,
    requested: int | None = None,
    env_threads: int | None = None,
    requested_by: str = "run.threads",
) -> ThreadPlan:
    """The policy: ``cores // processes - workers`` threads, at least 1, unless one is asked for.

    ``processes`` is how many training processes share the machine (torchrun's local world
    size); each gets its share of the cores and runs its own workers in it.
    """
    share = max(1, cores // max(1, processes))
    if requested is not None:
        return ThreadPlan(requested, share, workers, requested_by)
    if env_threads is not None:
        return ThreadPlan(env_threads, share, workers, "OMP_NUM_THREADS")
    return ThreadPlan(max(1, share - workers), share, workers, "policy")


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


def usable_cores(
    affinity: int | None = None,
    quota: int | None = None,
    root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_CGROUP,
) -> int:
    """Cores this process may run on: its CPU affinity, capped by its cgroup quota."""
    if affinity is None:
        if hasattr(os, "sched_getaffinity"):
            affinity = len(os.sched_getaffinity(0))
        else:  # macOS, Windows
            affinity = os.cpu_count() or 1
    if quota is None:
        quota = cgroup_cores(root, proc_cgroup)
    return max(1, min(affinity, quota) if quota else affinity)


def _env_threads(environ: Mapping[str, str]) -> int | None:
    try:
        value = int(environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value >= 1 else None


def apply_thread_policy(
    requested: int | None,
    workers: int,
    processes: int | None = None,
    environ: Mapping[str, str] | None = None,
    requested_by: str = "run.threads",
) -> ThreadPlan:
    """Resolve the plan for this process and set torch's thread count to it."""
    environ = os.environ if environ is None else environ
    if processes is None:
        processes = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    plan = plan_threads(
        usable_cores(),
        workers,
        processes,
        requested=requested,
        env_threads=_env_threads(environ),
        requested_by=requested_by,
    )
    torch.set_num_threads(plan.threads)
    return plan


def worker_threads(_: int) -> None:
    """``worker_init_fn`` part: a loader worker runs 1 torch thread (torch does this too, but
    a worker is a process of its own and must never spin several threads on shared cores)."""
    torch.set_num_threads(1)
