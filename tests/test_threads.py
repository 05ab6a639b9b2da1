"""The thread policy: its arithmetic, cgroup quotas, 1-thread workers, run.threads and --threads,
and its re-fit to the cores left free as a run goes (the /proc readings, the governor, the run)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from siamae import threads as T
from siamae.arguments import apply_threads_option
from siamae.commands.cli import build_parser, main
from siamae.commands.entry import main as entry_main
from siamae.cores import cgroup_cores, quota_cores, usable_cores
from siamae.engine.setup import THREADS_FILE, _init_worker
from siamae.engine.trainer import train
from siamae.errors import ConfigError
from siamae.recipes import load_config
from siamae.threads import (
    CoreMeter,
    CoreUse,
    CpuSample,
    ThreadChange,
    ThreadGovernor,
    ThreadPlan,
    apply_thread_policy,
    core_use,
    plan_threads,
    refit_threads,
    reserved_cores,
    thread_governor,
)

TINY = [
    "model.arch=vit_tiny",
    "model.img_size=32",
    "model.patch_size=8",
    "data.source=synthetic",
    "data.synthetic_count=16",
    "data.synthetic_size=48",
    "data.batch_size=8",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "run.progress=false",
    "run.visualize=false",
    "run.tensorboard=false",
]


@pytest.mark.parametrize(
    ("cores", "workers", "processes", "threads"),
    [
        (2, 1, 1, 1),  # the demo on this machine: 1 worker beside 1 thread
        (2, 0, 1, 2),
        (8, 2, 1, 6),
        (2, 8, 1, 1),  # more workers than cores: still 1 thread
        (16, 2, 4, 2),  # torchrun, 4 processes: 4 cores each, less 2 workers
        (3, 0, 4, 1),  # fewer cores than processes
    ],
)
def test_policy_gives_the_cores_left_after_the_workers(
    cores: int, workers: int, processes: int, threads: int
) -> None:
    plan = plan_threads(cores, workers, processes)
    assert (plan.threads, plan.source, plan.workers) == (threads, "policy", workers)


def test_run_threads_wins_over_omp_num_threads_and_the_policy() -> None:
    assert plan_threads(8, 1, requested=3, env_threads=5).to_dict() == {
        "threads": 3,
        "cores": 8,
        "workers": 1,
        "source": "run.threads",
    }
    env = plan_threads(8, 1, env_threads=5)
    assert (env.threads, env.source) == (5, "OMP_NUM_THREADS")


@pytest.mark.parametrize(
    ("quota", "period", "cores"),
    [(200000, 100000, 2), (150000, 100000, 2), (50000, 100000, 1), (-1, 100000, None)],
)
def test_cfs_quota_rounds_up_to_whole_cores(quota: int, period: int, cores: int | None) -> None:
    assert quota_cores(quota, period) == cores


def test_cgroup_v2_quota_is_the_tightest_on_the_path(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/job/step\n")
    (tmp_path / "job" / "step").mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "job" / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "job" / "step" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cores(tmp_path, proc) == 3
    assert usable_cores(affinity=16, root=tmp_path, proc_cgroup=proc) == 3
    assert usable_cores(affinity=2, root=tmp_path, proc_cgroup=proc) == 2


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    proc.write_text("5:memory:/x\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    folder = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("150000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cores(tmp_path, proc) == 2
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cores(tmp_path, proc) is None
    assert usable_cores(affinity=6, root=tmp_path, proc_cgroup=proc) == 6


def test_apply_sets_torch_threads() -> None:
    plan = apply_thread_policy(None, workers=0, processes=1, environ={})
    assert plan.source == "policy" and plan.threads == usable_cores()
    assert torch.get_num_threads() == plan.threads
    plan = apply_thread_policy(1, workers=0, processes=1, environ={})
    assert torch.get_num_threads() == 1 and plan.source == "run.threads"


class _ThreadCount(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return torch.get_num_threads()


def test_loader_workers_run_one_thread() -> None:
    torch.set_num_threads(2)
    loader = DataLoader(_ThreadCount(), batch_size=None, num_workers=1, worker_init_fn=_init_worker)
    assert [int(n) for n in loader] == [1, 1]


def test_start_line_and_run_folder_name_the_threads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    train(load_config(None, [*TINY, f"run.out_dir={tmp_path / 'a'}", "data.num_workers=1"]))
    expected = max(1, usable_cores() - 1)
    line = capsys.readouterr().out.splitlines()[0]
    assert f"threads: {expected} torch thread" in line and "1 loader worker" in line
    assert json.loads((tmp_path / "a" / THREADS_FILE).read_text())["threads"] == expected

    cfg = load_config(
        None, [*TINY, f"run.out_dir={tmp_path / 'b'}", "run.threads=3", "data.num_workers=0"]
    )
    train(cfg)
    assert "threads: 3 torch threads (set by run.threads" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / THREADS_FILE).read_text())["source"] == "run.threads"
    assert torch.get_num_threads() == 3


def test_run_threads_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run.threads"):
        load_config(None, [*TINY, "run.threads=0"])


def test_every_eval_command_takes_threads(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    eval_group = next(
        a
        for a in parser._subparsers._group_actions[0].choices["eval"]._actions  # type: ignore[union-attr]
        if isinstance(a, argparse._SubParsersAction)
    )
    for name, sub in eval_group.choices.items():
        assert "--threads" in sub._option_string_actions, name
    apply_threads_option(argparse.Namespace(threads=1, num_workers=2))
    assert "threads: 1 torch thread (set by --threads" in capsys.readouterr().out
    assert torch.get_num_threads() == 1


def test_threads_below_one_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(
        ["eval", "knn", "--random-init", "vit_tiny_patch8_32", "--train", str(tmp_path)]
        + ["--val", str(tmp_path), "--threads", "0"]
    )
    assert code == 2
    assert "--threads must be 1 or more" in capsys.readouterr().err


def test_the_command_imports_no_torch_before_it_sets_the_openmp_environment() -> None:
    # OMP_WAIT_POLICY is read once, when torch's OpenMP runtime loads: the entry module must not
    # import torch before main() has set it.
    code = "import sys, siamae.commands.entry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("before", "after"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_sets_a_passive_wait_policy_unless_the_user_chose_one(
    before: str | None, after: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", before or "unset")  # restored after the test
    if before is None:
        monkeypatch.delenv("OMP_WAIT_POLICY")
    entry_main(
        ["eval", "knn", "--random-init", "vit_tiny_patch8_32", "--train", str(tmp_path)]
        + ["--val", str(tmp_path), "--threads", "0"]
    )
    assert os.environ["OMP_WAIT_POLICY"] == after


# --- the re-fit: cores left free by the loader workers and other processes --------------------


@pytest.mark.parametrize(
    ("busy", "reserved"),
    [(0.0, 0), (0.1, 0), (0.25, 0), (0.3, 1), (1.0, 1), (1.25, 1), (1.3, 2), (2.0, 2)],
)
def test_a_core_is_taken_when_over_a_quarter_of_it_is_busy(busy: float, reserved: int) -> None:
    assert reserved_cores(busy) == reserved


@pytest.mark.parametrize(
    ("cores", "workers_busy", "others_busy", "threads"),
    [
        (2, 1.0, 0.0, 1),  # the start: a worker counts as a whole core
        (2, 0.1, 0.0, 2),  # the demo's light worker gives its core back
        (2, 0.1, 1.0, 1),  # ... and a rival process takes it again
        (2, 0.1, 2.0, 1),  # never fewer than 1
        (16, 3.6, 0.0, 12),  # 4 heavy workers keep 4 cores
        (16, 3.6, 8.0, 4),  # beside an 8-core job
        (8, 8.0, 0.0, 1),
    ],
)
def test_refit_gives_the_cores_workers_and_others_leave_free(
    cores: int, workers_busy: float, others_busy: float, threads: int
) -> None:
    assert refit_threads(cores, workers_busy, others_busy) == threads


def test_the_start_plan_is_the_refit_with_every_worker_a_whole_core() -> None:
    for cores in (1, 2, 8, 16):
        for workers in range(0, 10):
            assert plan_threads(cores, workers).threads == refit_threads(cores, workers, 0.0)


def _fake_proc(
    root: Path, cpus: dict[int, list[int]], children: dict[int, tuple[int, int]]
) -> None:
    lines = ["cpu  1 1 1 1 1 1 1 1 0 0", ""]  # the all-cores line is not read; a blank line
    lines += [f"cpu{n} " + " ".join(map(str, ticks)) + " 0 0" for n, ticks in cpus.items()]
    (root / "stat").write_text("\n".join(lines) + "\nintr 5 6\n")
    for pid, (utime, stime) in children.items():
        (root / str(pid)).mkdir(exist_ok=True)
        # a name with a space and a parenthesis, as a process may have
        fields = ["S", "1"] + ["0"] * 9 + [str(utime), str(stime)] + ["0"] * 10
        (root / str(pid) / "stat").write_text(f"{pid} (pt worker) x) " + " ".join(fields) + "\n")


def test_core_meter_reads_proc_stat_and_the_children(tmp_path: Path) -> None:
    tick = os.sysconf("SC_CLK_TCK")
    # ticks: user nice system idle iowait irq softirq steal
    start = {0: [100, 0, 0, 800, 100, 0, 0, 0], 1: [1000] + [0] * 7, 2: [50, 0, 0, 950, 0, 0, 0, 0]}
    _fake_proc(tmp_path, start, {41: (10, 0), 42: (5, 5)})
    wall, own = iter([10.0, 20.0]), iter([5.0, 10.0])
    live, reaped = [41, 42, 43], [2.0]  # 43 has ended, not yet reaped: no /proc entry
    meter = CoreMeter(
        proc=tmp_path,
        cpus={0, 2},  # cpu1 is outside this process's affinity
        child_pids=lambda: live,
        reaped_cpu=lambda: reaped[0],
        own_cpu=lambda: next(own),
        clock=lambda: next(wall),
    )
    assert meter.available
    before = meter.sample()
    assert before is not None
    assert (before.core_count, before.wall, before.own) == (2, 10.0, 5.0)
    assert before.core_busy == pytest.approx(150 / tick)  # idle and iowait are not busy
    assert before.core_total == pytest.approx(2000 / tick)
    assert before.children == pytest.approx(20 / tick + 2.0)
    # 10 s later: cpu0 busy all the time (a quarter of it stolen by the hypervisor's other
    # guests, which is busy too), cpu2 half; this process ran 5 s. Worker 41 ran 5 s; worker 42
    # ended after 1 s more and was reaped (its 1.1 s now in the rusage of children), and a new
    # worker 44 started and ran 2 s: the children kept 0.8 of a core busy.
    t = 10 * tick
    later = {
        0: [100 + 3 * t // 4, 0, 0, 800, 100, 0, 0, t // 4],
        1: [5000] + [0] * 7,
        2: [50 + t // 2, 0, 0, 950 + t // 2, 0, 0, 0, 0],
    }
    _fake_proc(tmp_path, later, {41: (10 + t // 4, t // 4), 44: (t // 5, 0)})
    live[:] = [41, 44]
    reaped[0] = 2.0 + 10 / tick + 1.0
    after = meter.sample()
    assert after is not None
    use = core_use(before, after)
    assert use.workers == pytest.approx((5.0 + 1.0 + 2.0) / 10)
    assert use.others == pytest.approx(1.5 - 0.5 - 0.8)


def test_core_meter_is_unavailable_without_proc_stat(tmp_path: Path) -> None:
    assert not CoreMeter(proc=tmp_path, cpus={0}).available
    assert CoreMeter(proc=tmp_path, cpus={0}).sample() is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux's /proc")
def test_the_real_meter_counts_a_child_process_cpu_time() -> None:
    # CPU seconds, not a rate: the child burns 0.3 s of CPU however loaded the machine is.
    fork = multiprocessing.get_context("fork")  # Linux only, as /proc is; starts in milliseconds
    ready = fork.Event()
    child = fork.Process(target=_burn, args=(0.3, ready))
    meter = CoreMeter()
    child.start()
    try:
        before = meter.sample()
        assert before is not None
        assert ready.wait(60), "the child process did not finish burning CPU"
        after = meter.sample()
        assert after is not None
        assert after.children - before.children >= 0.2
        assert after.core_busy > before.core_busy and after.core_count >= 1
    finally:
        child.terminate()
        child.join()
    # ended and reaped, its CPU time still counts (the rusage of children)
    ended = meter.sample()
    assert ended is not None and ended.children >= after.children - 0.02


def _burn(seconds: float, done: object) -> None:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    done.set()  # type: ignore[attr-defined]
    time.sleep(60)  # stay alive so the parent can read its CPU time


def test_core_use_arithmetic() -> None:
    before = CpuSample(wall=0.0, own=0.0, children=0.0, core_busy=0.0, core_total=0.0, core_count=4)
    after = CpuSample(
        wall=10.0, own=20.0, children=3.0, core_busy=35.0, core_total=40.0, core_count=4
    )
    use = core_use(before, after)
    assert use == CoreUse(workers=pytest.approx(0.3), others=pytest.approx(3.5 - 2.0 - 0.3))
    idle = CpuSample(
        wall=10.0, own=20.0, children=3.0, core_busy=10.0, core_total=40.0, core_count=4
    )
    assert core_use(before, idle).others == 0.0  # never below 0 (sampling skew)


class _ScriptedMeter:
    """A meter over ``cores`` cores on which time passes as a test says (``advance``, or
    ``seconds_per_reading`` at every reading), this process keeping 1 core busy, its loader
    workers and the other processes as ``use`` says (changeable as time goes)."""

    available = True

    def __init__(
        self, workers: float, others: float, cores: int = 2, seconds_per_reading: float = 0.0
    ) -> None:
        self.use = CoreUse(workers, others)
        self.cores, self.cpus = cores, set(range(cores))
        self.seconds_per_reading = seconds_per_reading
        self.now = self.own = self.children = self.busy = 0.0

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.own += seconds
        self.children += self.use.workers * seconds
        self.busy += (1.0 + self.use.workers + self.use.others) * seconds

    def clock(self) -> float:
        self.advance(self.seconds_per_reading)
        return self.now

    def sample(self) -> CpuSample:
        now = self.clock()
        return CpuSample(now, self.own, self.children, self.busy, self.cores * now, self.cores)


def _governor(meter: _ScriptedMeter, **plan: bool) -> tuple[ThreadGovernor, list[int]]:
    set_to: list[int] = []
    start = ThreadPlan(1, 2, 1, "policy", **plan)  # 2 cores less 1 loader worker
    return ThreadGovernor(start, meter, set_threads=set_to.append), set_to  # type: ignore[arg-type]


def _run(governor: ThreadGovernor, meter: _ScriptedMeter, steps: range) -> dict[int, ThreadChange]:
    """Steps of 1 s each; the changes by step."""
    changes = {}
    for step in steps:
        meter.advance(1.0)
        change = governor.after_step(step)
        if change is not None:
            changes[step] = change
    return changes


def test_governor_gives_a_light_workers_core_back_after_the_first_window() -> None:
    meter = _ScriptedMeter(workers=0.1, others=0.0)
    governor, set_to = _governor(meter)
    changes = _run(governor, meter, range(1, 40))
    # step 1 is skipped (start-up); the window opens after step 2 and closes after 3 s: step 5
    assert list(changes) == [5]
    change = changes[5]
    assert (change.threads_before, change.threads) == (1, 2)
    assert change.use.workers == pytest.approx(0.1) and change.use.others == pytest.approx(0.0)
    assert set_to == [2] and governor.threads == 2
    line = change.describe(2)
    assert "threads: 1 -> 2 torch threads at step 5" in line and "loader workers kept 0.10" in line
    assert governor.to_dict()["changes"] == [
        {"step": 5, "threads": 2, "workers_busy": 0.1, "others_busy": 0.0}
    ]


def test_governor_gives_the_core_to_a_rival_and_takes_it_back_when_it_leaves() -> None:
    meter = _ScriptedMeter(workers=0.1, others=0.0)
    governor, set_to = _governor(meter)
    assert list(_run(governor, meter, range(1, 7))) == [5]
    meter.use = CoreUse(0.1, 0.9)  # a CPU-bound job starts beside the run after step 6
    # the later windows are 30 s long: the one from step 5 closes at step 35
    changes = _run(governor, meter, range(7, 66))
    assert list(changes) == [35] and changes[35].threads == 1
    assert changes[35].use.others == pytest.approx((0.0 * 1 + 0.9 * 29) / 30)
    meter.use = CoreUse(0.1, 0.0)  # it ends
    changes = _run(governor, meter, range(66, 100))
    assert list(changes) == [95] and changes[95].threads == 2
    assert set_to == [2, 1, 2]


def test_governor_keeps_heavy_workers_cores_and_ignores_others_under_a_quota() -> None:
    meter = _ScriptedMeter(workers=0.9, others=0.0)
    heavy, _ = _governor(meter)
    assert _run(heavy, meter, range(1, 100)) == {} and heavy.threads == 1
    # a cgroup quota caps this process's CPU time: other processes' use of the machine's cores
    # does not take from it (and /proc/stat shows the whole host's)
    meter = _ScriptedMeter(workers=0.1, others=1.5)
    quota, _ = _governor(meter, quota_limited=True)
    assert list(_run(quota, meter, range(1, 10))) == [5] and quota.threads == 2
    meter = _ScriptedMeter(workers=0.1, others=1.5)
    free, _ = _governor(meter)
    assert _run(free, meter, range(1, 100)) == {} and free.threads == 1


@pytest.mark.parametrize(
    ("source", "environ", "wanted"),
    [
        ("policy", {"OMP_WAIT_POLICY": "PASSIVE"}, True),
        ("policy", {"OMP_WAIT_POLICY": "passive"}, True),
        ("policy", {}, False),  # spinning threads: one too many costs 10x, no re-fit
        ("policy", {"OMP_WAIT_POLICY": "ACTIVE"}, False),
        ("run.threads", {"OMP_WAIT_POLICY": "PASSIVE"}, False),  # the user's figure is kept
        ("OMP_NUM_THREADS", {"OMP_WAIT_POLICY": "PASSIVE"}, False),
        ("policy", {"OMP_WAIT_POLICY": "PASSIVE", "LOCAL_WORLD_SIZE": "2"}, False),
    ],
)
def test_the_refit_runs_only_for_the_policy_with_passive_threads(
    source: str, environ: dict[str, str], wanted: bool
) -> None:
    plan = ThreadPlan(1, 2, 1, source)
    governor = thread_governor(plan, environ, meter=_ScriptedMeter(0.1, 0.0))  # type: ignore[arg-type]
    assert (governor is not None) == wanted


def test_no_refit_where_proc_cannot_tell(tmp_path: Path) -> None:
    plan = ThreadPlan(1, 2, 1, "policy")
    meter = CoreMeter(proc=tmp_path, cpus={0})
    assert thread_governor(plan, {"OMP_WAIT_POLICY": "PASSIVE"}, meter=meter) is None


def test_a_run_refits_its_threads_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(T, "affinity_cores", lambda: 4)
    monkeypatch.setattr(T, "cgroup_cores", lambda *a: None)
    meter = _ScriptedMeter(workers=0.1, others=0.0, cores=4, seconds_per_reading=10.0)
    monkeypatch.setattr(T, "CoreMeter", lambda: meter)
    out = tmp_path / "run"
    overrides = [*TINY, f"run.out_dir={out}", "data.num_workers=1", "optim.epochs=4"]
    try:
        train(load_config(None, overrides))
        lines = capsys.readouterr().out.splitlines()
        assert (
            "threads: 3 torch threads (4 usable cores - 1 loader worker, 1 thread each; "
            "re-fitted to the cores left free as it runs)" in lines[0]
        )
        assert (
            "siamae: threads: 3 -> 4 torch threads at step 5 (4 usable cores; loader "
            "workers kept 0.10 busy, other processes 0.00)" in lines
        )
        assert torch.get_num_threads() == 4
        plan = json.loads((out / THREADS_FILE).read_text())
        assert (plan["threads"], plan["source"], plan["refit"]) == (3, "policy", True)
        assert plan["changes"] == [
            {"step": 5, "threads": 4, "workers_busy": 0.1, "others_busy": 0.0}
        ]
    finally:
        torch.set_num_threads(1)


def test_a_run_without_passive_threads_keeps_the_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(T, "affinity_cores", lambda: 4)
    monkeypatch.setattr(T, "cgroup_cores", lambda *a: None)
    # a re-fit would see 2 cores taken by others and go down to 2 threads
    meter = _ScriptedMeter(workers=0.0, others=2.0, cores=4, seconds_per_reading=10.0)
    monkeypatch.setattr(T, "CoreMeter", lambda: meter)
    out = tmp_path / "run"
    train(load_config(None, [*TINY, f"run.out_dir={out}", "data.num_workers=0", "optim.epochs=4"]))
    assert "re-fitted" not in capsys.readouterr().out
    assert torch.get_num_threads() == 4
    assert "changes" not in json.loads((out / THREADS_FILE).read_text())
