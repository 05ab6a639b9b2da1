"""The thread policy: its arithmetic, cgroup quotas, 1-thread workers, run.threads and --threads."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from siamae.arguments import apply_threads_option
from siamae.cli import build_parser, main
from siamae.engine.setup import THREADS_FILE, _init_worker
from siamae.engine.trainer import train
from siamae.entry import main as entry_main
from siamae.errors import ConfigError
from siamae.recipes import load_config
from siamae.threads import (
    apply_thread_policy,
    cgroup_cores,
    plan_threads,
    quota_cores,
    usable_cores,
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
    code = "import sys, siamae.entry; print('torch' in sys.modules)"
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
