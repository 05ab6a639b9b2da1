"""How many torch threads a process runs: as many as its cores, less its loader workers (and,
as a training run goes, less what its workers and other processes really keep busy).

torch's default is one OpenMP thread per core of the machine, whoever else uses them. When
other processes hold those cores (this run's own loader workers, other jobs on a shared server,
a CI runner, a container with a CPU quota), OpenMP threads spin waiting for each other and a
step can take 15-30x longer. So the main process gets the cores the scheduler and the cgroup
quota allow, less one per loader worker (at least 1), and every loader worker gets 1 thread.

Precedence: ``run.threads`` (or ``--threads``), then ``OMP_NUM_THREADS`` when the user set it,
then this policy. The arithmetic is in pure functions (:func:`plan_threads`,
:func:`siamae.cores.quota_cores`, :func:`refit_threads`) so it can be tested with any core
count, quota and worker count.

A loader worker is counted as a whole core at the start, because nothing is known yet. During
training (:class:`ThreadGovernor`) the policy is re-fitted to what the cores are really used
for: after the first seconds and then every half minute, the main process gets the usable cores
less those its loader workers and other processes keep busy (a core is free when under a quarter
of it is used). A light worker (the demo's: a tenth of a core) thus gives its core back on a
quiet machine, and a job that starts beside the run takes its cores back from it. This runs only
when idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``, which the ``siamae`` command sets),
where one thread too many costs a little rather than a spinning 10x, and only where Linux's
``/proc`` tells the use of every core, for the policy's own figure (not ``run.threads`` or
``OMP_NUM_THREADS``) and one training process per machine.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from siamae.cores import affinity_cores, cgroup_cores, usable_cores

PROC = Path("/proc")

# A core counts as taken by others when more than this share of it is busy with them: a thread
# of ours on a core a tenth used (the demo's loader worker) gains nine tenths of a core.
TAKEN_SHARE = 0.25
FIRST_REFIT_AFTER_S = 3.0  # of training after the first steps (workers start, prefetch)
REFIT_EVERY_S = 30.0
REFIT_MIN_STEPS = 3  # a window holds at least this many steps


@dataclass(frozen=True)
class ThreadPlan:
    """The resolved figure and where it came from (for the start line and the run folder)."""

    threads: int  # torch threads of this (main) process
    cores: int  # cores this process may use (affinity, cgroup quota, shared by local processes)
    workers: int  # loader worker processes, 1 torch thread each
    source: str  # "run.threads" (or "--threads"), "OMP_NUM_THREADS" or "policy"
    quota_limited: bool = False  # a cgroup quota, not the CPU affinity, sets ``cores``

    def describe(self, refitted: bool = False) -> str:
        threads = f"{self.threads} torch thread{'s' if self.threads != 1 else ''}"
        cores = f"{self.cores} usable core{'s' if self.cores != 1 else ''}"
        workers = f"{self.workers} loader worker{'s' if self.workers != 1 else ''}"
        if self.source == "policy":
            then = "; re-fitted to the cores left free as it runs" if refitted else ""
            return f"threads: {threads} ({cores} - {workers}, 1 thread each{then})"
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
    return ThreadPlan(refit_threads(share, float(workers), 0.0), share, workers, "policy")


def reserved_cores(busy: float) -> int:
    """Whole cores to leave to processes that keep ``busy`` cores busy (a core under
    :data:`TAKEN_SHARE` busy is free): 0.1 -> 0, 0.3 -> 1, 1.0 -> 1, 1.3 -> 2."""
    return max(0, math.ceil(round(busy - TAKEN_SHARE, 6)))


def refit_threads(cores: int, workers_busy: float, others_busy: float) -> int:
    """The main process's threads: ``cores`` less what its loader workers and other processes
    keep busy, at least 1. At the start ``workers_busy`` is the worker count (a core each)."""
    return max(1, cores - reserved_cores(workers_busy + others_busy))


def _env_threads(environ: Mapping[str, str]) -> int | None:
    try:
        value = int(environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value >= 1 else None


def _local_processes(environ: Mapping[str, str]) -> int:
    """Training processes on this machine (torchrun's local world size)."""
    return int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)


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
        processes = _local_processes(environ)
    affinity, quota = affinity_cores(), cgroup_cores()
    plan = plan_threads(
        usable_cores(affinity, quota),
        workers,
        processes,
        requested=requested,
        env_threads=_env_threads(environ),
        requested_by=requested_by,
    )
    # A quota caps this process's CPU time whatever other processes do on the machine's cores.
    plan = replace(plan, quota_limited=quota is not None and quota < affinity)
    torch.set_num_threads(plan.threads)
    return plan


def worker_threads(_: int) -> None:
    """``worker_init_fn`` part: a loader worker runs 1 torch thread (torch does this too, but
    a worker is a process of its own and must never spin several threads on shared cores)."""
    torch.set_num_threads(1)


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds at one moment: this process, its child processes (loader workers),
    and the busy and total seconds of every core this process may run on."""

    wall: float
    own: float
    children: float
    core_busy: float
    core_total: float  # summed over the cores: each core's elapsed seconds
    core_count: int  # the cores of this process's affinity that /proc/stat lists


@dataclass(frozen=True)
class CoreUse:
    """Cores kept busy over a window (CPU seconds per second) by this process's children and by
    every other process on its cores."""

    workers: float
    others: float


def _proc_stat_cores(text: str, cpus: set[int]) -> tuple[int, int, int]:
    """Busy and total clock ticks summed over ``cpus`` from /proc/stat's ``cpuN`` lines, and how
    many of them it lists."""
    busy = total = count = 0
    for line in text.splitlines():
        name, *fields = line.split() or [""]
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        # user nice system idle iowait irq softirq steal (guest time is inside user already)
        ticks = [int(f) for f in fields[:8]]
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
        count += 1
    return busy, total, count


def _process_ticks(text: str) -> int:
    """utime + stime of a /proc/<pid>/stat line (the name in parentheses may hold spaces)."""
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _child_pids() -> list[int]:
    # Loader workers are multiprocessing children of the main process (as is anything else the
    # run starts this way, whose cores are just as taken). active_children() also reaps those
    # that ended, whose CPU time then counts in _reaped_children_cpu.
    return [p.pid for p in multiprocessing.active_children() if p.pid is not None]


def _reaped_children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


class CoreMeter:
    """Reads :class:`CpuSample` from Linux's /proc; ``available`` is False elsewhere.

    The children's CPU time is that of the live ones (``/proc/<pid>/stat``) plus that of those
    ended and reaped (the kernel's rusage of children), so it keeps growing when the loader's
    workers end with an epoch and new ones start (``persistent_workers=False``)."""

    def __init__(
        self,
        proc: Path = PROC,
        cpus: set[int] | None = None,
        child_pids: Callable[[], list[int]] = _child_pids,
        reaped_cpu: Callable[[], float] = _reaped_children_cpu,
        own_cpu: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc, self.child_pids, self.own_cpu, self.clock = proc, child_pids, own_cpu, clock
        self.reaped_cpu = reaped_cpu
        if cpus is None:
            cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self.cpus = cpus
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = bool(cpus) and self._read_cores() is not None

    def _read_cores(self) -> tuple[int, int, int] | None:
        try:
            cores = _proc_stat_cores((self.proc / "stat").read_text(), self.cpus)
        except (OSError, ValueError, IndexError):
            return None
        return cores if cores[1] > 0 else None

    def _children_seconds(self) -> float:
        ticks = 0
        for pid in self.child_pids():  # first: it reaps the children that ended
            try:
                ticks += _process_ticks((self.proc / str(pid) / "stat").read_text())
            except (OSError, ValueError, IndexError):
                pass  # a worker that ended since; counted once reaped
        return ticks / self.tick + self.reaped_cpu()

    def sample(self) -> CpuSample | None:
        cores = self._read_cores()
        if cores is None:
            return None
        return CpuSample(
            wall=self.clock(),
            own=self.own_cpu(),
            children=self._children_seconds(),
            core_busy=cores[0] / self.tick,
            core_total=cores[1] / self.tick,
            core_count=cores[2],
        )


def core_use(before: CpuSample, after: CpuSample) -> CoreUse:
    """What kept the cores busy between two samples: this process's children, and others (the
    cores' busy time less this process's and its children's)."""
    wall = max(after.wall - before.wall, 1e-9)
    workers = max(0.0, after.children - before.children) / wall
    own = max(0.0, after.own - before.own) / wall
    elapsed = max(after.core_total - before.core_total, 1e-9) / max(1, after.core_count)
    busy = max(0.0, after.core_busy - before.core_busy) / elapsed  # in cores
    return CoreUse(workers=workers, others=max(0.0, busy - own - workers))


@dataclass(frozen=True)
class ThreadChange:
    step: int
    threads_before: int
    threads: int
    use: CoreUse

    def describe(self, cores: int) -> str:
        return (
            f"threads: {self.threads_before} -> {self.threads} torch threads at step {self.step}"
            f" ({cores} usable cores; loader workers kept {self.use.workers:.2f} busy, other"
            f" processes {self.use.others:.2f})"
        )

    def to_dict(self) -> dict[str, float | int]:
        return {
            "step": self.step,
            "threads": self.threads,
            "workers_busy": round(self.use.workers, 3),
            "others_busy": round(self.use.others, 3),
        }


@dataclass
class ThreadGovernor:
    """Re-fits the main process's torch threads to the cores left free, between steps (see the
    module's docstring). Windows start after ``skip_steps`` steps; the first closes after
    ``first_s`` seconds, the next ones after ``every_s``, each after ``min_steps`` steps at least."""

    plan: ThreadPlan
    meter: CoreMeter
    skip_steps: int = 2
    first_s: float = FIRST_REFIT_AFTER_S
    every_s: float = REFIT_EVERY_S
    min_steps: int = REFIT_MIN_STEPS
    set_threads: Callable[[int], None] = torch.set_num_threads
    changes: list[ThreadChange] = field(default_factory=list)
    threads: int = field(init=False)
    _start: CpuSample | None = field(default=None, init=False)
    _start_step: int = field(default=0, init=False)
    _steps: int = field(default=0, init=False)
    _windows: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.threads = self.plan.threads

    def after_step(self, step: int) -> ThreadChange | None:
        """Call after every optimizer step; returns the change when it set a new thread count."""
        self._steps += 1
        if self._steps < self.skip_steps:
            return None
        if self._start is None:
            self._start, self._start_step = self.meter.sample(), step
            return None
        wait = self.first_s if self._windows == 0 else self.every_s
        if step - self._start_step < self.min_steps or self.meter.clock() - self._start.wall < wait:
            return None
        end = self.meter.sample()
        if end is None:
            return None
        use = core_use(self._start, end)
        self._start, self._start_step, self._windows = end, step, self._windows + 1
        # A quota caps this process's CPU time: the machine's other processes do not take it.
        others = 0.0 if self.plan.quota_limited else use.others
        threads = refit_threads(self.plan.cores, use.workers, others)
        if threads == self.threads:
            return None
        change = ThreadChange(step, self.threads, threads, use)
        self.set_threads(threads)
        self.threads = threads
        self.changes.append(change)
        return change

    def to_dict(self) -> dict[str, object]:
        return {
            **self.plan.to_dict(),
            "refit": True,
            "changes": [c.to_dict() for c in self.changes],
        }


def thread_governor(
    plan: ThreadPlan, environ: Mapping[str, str] | None = None, meter: CoreMeter | None = None
) -> ThreadGovernor | None:
    """A governor for ``plan`` when re-fitting applies (see the module's docstring), else None."""
    environ = os.environ if environ is None else environ
    if plan.source != "policy" or environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        return None
    if _local_processes(environ) > 1:
        return None  # processes sharing a machine would each count the others' threads
    meter = CoreMeter() if meter is None else meter
    return ThreadGovernor(plan, meter) if meter.available else None
