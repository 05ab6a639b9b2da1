"""Clusters: plain srun tasks join their group, a stop vote, siamae submit through submitit's
local executor (preemption signal -> save -> requeue -> resume), torchrun's elastic restart."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch

from ddp_helpers import stop_votes
from siamae.commands import cli, submit
from siamae.engine import slurm
from siamae.engine.trainer import train
from siamae.errors import ConfigError
from siamae.recipes import load_config

TESTS = Path(__file__).parents[1]  # the helpers (elastic_worker.py) stand in tests/
# Tiny, dropout off (dropout masks are drawn per process: the one thing two processes with
# batch 4 cannot share with one with batch 8), a checkpoint every 2 steps.
TINY = [
    "model.arch=vit_tiny",
    "model.img_size=32",
    "model.patch_size=8",
    "data.source=synthetic",
    "data.synthetic_count=32",
    "data.synthetic_size=48",
    "data.num_workers=0",
    "decoder.dropout=0",
    "optim.base_lr=1e-3",
    "optim.warmup_steps=2",
    "optim.max_steps=6",
    "run.log_every=1",
    "run.checkpoint_every=2",
    "run.progress=false",
    "run.visualize=false",
    "run.tensorboard=false",
]
# The variables a launcher sets; a test of another launcher starts without them.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _clean_environment(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _command(out: Path, config: Path, batch: int, *extra: str) -> list[str]:
    sets = [
        item for field in [*TINY, f"data.batch_size={batch}", *extra] for item in ("--set", field)
    ]
    return ["pretrain", "--config", str(config), "--out", str(out), *sets]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text("method: cropmae\n")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, batch 8, 6 steps, never interrupted."""
    out = tmp_path_factory.mktemp("reference")
    train(load_config(None, [*TINY, "data.batch_size=8", f"run.out_dir={out}"]), resume=False)
    return out


# -- Slurm's variables -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("localhost", ["localhost"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu-a[9-11]", ["gpu-a9", "gpu-a10", "gpu-a11"]),
        ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
        ("a[1],b[002-003]c", ["a1", "b002c", "b003c"]),
    ],
)
def test_slurm_host_lists_expand_like_scontrol(text: str, hosts: list[str]) -> None:
    assert slurm.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["node[01-03", "node]1[", "node[3-1]", "node[a-b]", "", "a,,b"])
def test_an_unreadable_host_list_names_itself_and_the_fix(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        slurm.expand_hostlist(text)
    assert repr(text) in str(err.value) and "MASTER_ADDR" in str(err.value)


def test_process_group_variables_come_from_slurm_unless_a_launcher_set_them() -> None:
    task = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODELIST": "gpu[07-10]",
        "SLURM_JOB_ID": "4242",
    }
    assert slurm.process_group_variables(task) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(slurm.port_for_job("4242")),
    }
    # The step's own node list and task count win over the job's; a port the user set is kept.
    step = {**task, "SLURM_STEP_NODELIST": "gpu[09-10]", "SLURM_STEP_NUM_TASKS": "4"}
    assert slurm.process_group_variables({**step, "MASTER_PORT": "29500"}) == {
        "RANK": "5",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu09",
    }
    # torchrun (WORLD_SIZE set) or no Slurm at all: nothing to derive.
    assert slurm.process_group_variables({**task, "WORLD_SIZE": "8", "RANK": "5"}) == {}
    assert slurm.process_group_variables({"SLURM_JOB_ID": "1"}) == {}
    ports = {slurm.port_for_job(str(job)) for job in range(4000, 4100)}
    assert len(ports) == 100 and all(12000 <= p < 32768 for p in ports)
    assert slurm.port_for_job("77_3") == slurm.port_for_job("77_3") != slurm.port_for_job("77_4")


def test_two_tasks_started_with_only_slurms_variables_train_like_one_process(
    tmp_path: Path, config_file: Path, reference: Path
) -> None:
    """What ``srun siamae pretrain ...`` starts: no torchrun, RANK and WORLD_SIZE absent."""
    # A job id whose derived port is free here: the tasks find the port as on a cluster.
    job_id = next(j for j in range(90000, 91000) if _port_is_free(slurm.port_for_job(str(j))))
    out = tmp_path / "srun"
    # W&B (offline), where installed: only the main process logs.
    tracked = importlib.util.find_spec("wandb") is not None
    wandb_env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        **{v: str(tmp_path / v.lower()) for v in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR")},
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "siamae",
                *_command(out, config_file, 4, *(["run.wandb=true"] if tracked else [])),
            ],
            env=_clean_environment(
                SLURM_PROCID=str(rank),
                SLURM_NTASKS="2",
                SLURM_LOCALID=str(rank),
                SLURM_NODELIST="localhost",
                SLURM_JOB_ID=str(job_id),
                **(wandb_env if tracked else {}),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "joining 2 Slurm tasks" in outputs[0][1]
    assert "done: cropmae, 6 steps" in outputs[0][0] and "done" not in outputs[1][0]
    _assert_close(_weights(reference), _weights(out))
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert len(ckpt["rng"]["cpu"]) == 2  # a group of two ranks saved it
    if tracked:
        assert len(list((out / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path: Path) -> None:
    """Slurm signals every task, each at its own moment: the processes vote, so none is left
    waiting in a collective for one that stopped a step earlier."""
    # Signalled before its 4th vote: every process stops at the 5th, as SIGUSR2.
    assert stop_votes(str(tmp_path / "vote")) == ["4 SIGUSR2", "4 SIGUSR2"]


# -- siamae submit -----------------------------------------------------------------------------


def _submit_args(config: Path, out: Path, *options: str, command: list[str] | None = None):  # noqa: ANN202
    parser = cli.build_parser()
    job = command if command is not None else _command(out, config, 8)
    return parser, parser.parse_args(["submit", *options, "--", *job])


@pytest.mark.parametrize(
    "options, command, message",
    [
        (["--time", "1:00:00"], None, "--partition: needed for a Slurm job"),
        (["--time", "1:00:00", "--partition", "gpu"], None, "sbatch and srun not found"),
        (["--executor", "local", "--time", "90 min"], None, "--time '90 min': expected HH:MM:SS"),
        (["--executor", "local", "--time", "0:00:00"], None, "must be positive"),
        (["--executor", "local", "--time", "1:00:00", "--nodes", "2"], None, "use --nodes 1"),
        (["--executor", "local", "--time", "1:00:00", "--mem", "lots"], None, "--mem 'lots'"),
        (["--executor", "local", "--time", "1:00:00", "--nodes", "0"], None, "--nodes: expected"),
        (["--executor", "local", "--time", "1:00:00"], ["eval", "knn"], "(got 'eval')"),
        (["--executor", "local", "--time", "1:00:00"], [], "(got nothing)"),
        (["--executor", "local", "--time", "5"], ["pretrain", "--config", "c.yaml"], "'c.yaml'"),
    ],
)
def test_submit_refuses_bad_arguments_in_one_line_with_exit_code_2(
    options: list[str],
    command: list[str] | None,
    message: str,
    tmp_path: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here, whatever this machine has
    job = command if command is not None else _command(tmp_path / "run", config_file, 8)
    code = cli.main(["submit", "--gpus-per-node", "1", *options, "--", *job])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()  # nothing submitted, nothing written


def test_submit_checks_the_jobs_config_before_submitting(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture
) -> None:
    job = _command(tmp_path / "run", config_file, 8, "optim.base_lr=-1")
    code = cli.main(
        ["submit", "--executor", "local", "--gpus-per-node", "0", "--time", "5"] + ["--", *job]
    )
    assert code == 2
    assert "config field 'optim.base_lr'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, minutes",
    [("30", 30), ("1:30", 2), ("02:00:00", 120), ("1-00", 1440), ("2-01:30", 2970), ("0:0:59", 1)],
)
def test_submit_reads_slurms_time_formats(text: str, minutes: int) -> None:
    assert submit.parse_time(text) == minutes


def test_a_requeued_job_resumes_whatever_the_first_start_asked() -> None:
    command = ["pretrain", "--config", "c", "--no-resume", "--set", "a=1", "--resume", "x.pt"]
    assert submit.resumed_command(command) == ["pretrain", "--config", "c", "--set", "a=1"]
    assert submit.resumed_command(["finetune", "--resume=x.pt"]) == ["finetune"]


def test_submit_writes_the_batch_script_slurm_gets(
    tmp_path: Path,
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """A stand-in sbatch keeps the script it is given: one task per GPU, the signal before the
    time limit, every log in the run folder, the command pickled for every task."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kept = tmp_path / "script.sh"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {kept}\necho "Submitted batch job 4321"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "run"
    command = [*_command(out, config_file, 8, "data.num_workers=6"), "--no-resume"]
    options = ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "1-00"]
    options += ["--account", "proj", "--mem", "256G", "--slurm-option", "qos=high"]
    assert cli.main(["submit", *options, "--", *command]) == 0
    printed = capsys.readouterr().out
    assert "submitted job 4321" in printed and f"{out}/slurm/4321_<task>_log.out" in printed
    script = kept.read_text()
    for line in [
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=7",  # the config's 6 loader workers and the main process
        "--partition=gpu",
        "--time=1440",
        "--signal=USR2@120",
        "--account=proj",
        "--mem=256G",
        "--qos=high",
        f"--output={out}/slurm/%j_0_log.out",
    ]:
        assert f"#SBATCH {line}\n" in script, line
    assert f"--output {out}/slurm/%j_%t_log.out" in script  # srun: one log per task
    delayed = submitit.helpers.DelayedSubmission.load(out / "slurm" / "4321_submitted.pkl")
    job = delayed.function
    assert isinstance(job, submit.SiamaeJob) and job.command == command and job.attempt == 1
    assert job.run_command is cli.main  # the command line's main, handed in, pickled by name
    requeued = job.checkpoint().function
    assert requeued.attempt == 2 and "--no-resume" not in requeued.command
    assert requeued.command == [c for c in command if c != "--no-resume"]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the task through /proc")
def test_a_preempted_job_saves_requeues_and_ends_like_an_uninterrupted_run(
    tmp_path: Path, config_file: Path, reference: Path
) -> None:
    """submitit's local executor runs the Slurm path here: the task is sent SIGUSR2 (what Slurm
    sends before a time limit or a preemption); it saves last.pt, submitit requeues the job,
    the requeued task resumes from last.pt in the same run folder and ends with the weights of
    a run that was never interrupted."""
    out = tmp_path / "run"
    parser, args = _submit_args(
        config_file, out, "--executor", "local", "--gpus-per-node", "0", "--time", "0:10:00"
    )
    plan = submit.plan_from_args(
        args, parser, {"pretrain": cli._pretrain_config, "finetune": cli._finetune_config}
    )
    assert plan.run_dir == out and plan.tasks_per_node == 1 and plan.cpus_per_task == 1
    job = submit.launch(plan, cli.main)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        assert job.state == "RUNNING", job.stderr()
        time.sleep(0.02)
    (task,) = _children(job._process.pid)  # the controller runs one task process
    os.kill(task, signal.SIGUSR2)
    while not job.done() and time.time() < deadline:
        time.sleep(0.2)
    log = job.stdout() or ""
    assert job.done(), log
    assert job.result() == 0, log
    # The first attempt stopped at a step boundary before the end and saved...
    first, second = log.split("siamae submit: job")[1:]
    assert "interrupted (SIGUSR2) at step" in first and "/6; checkpoint saved" in first, log
    assert "Calling checkpoint method" in first and "Requeued job" in first, log
    # ...the second ran the same command in the same run folder and finished it.
    assert "attempt 2" in second and "done: cropmae, 6 steps" in second, log
    a, b = _weights(reference), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (out / "slurm").glob("*_log.out")) == [f"{job.job_id}_0_log.out"]


# -- torchrun ----------------------------------------------------------------------------------


def test_torchrun_restarts_a_dead_worker_and_the_run_resumes_from_last_pt(
    tmp_path: Path, config_file: Path, reference: Path
) -> None:
    """The multi-node command on one node: c10d rendezvous, --max-restarts 1. Rank 0 dies after
    step 3 of the first attempt; torchrun restarts both workers, which resume from last.pt
    (step 2) and end with the weights of one uninterrupted process."""
    out, steps_file = tmp_path / "elastic", tmp_path / "steps.txt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{_free_port()}",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.2",
        str(TESTS / "elastic_worker.py"),
        *_command(out, config_file, 4),
    ]
    env = _clean_environment(
        CRASH_AT_STEP="3",
        STEPS_FILE=str(steps_file),
        # As the README says: torch's default, one store shared by every restart, can hand the
        # restarted group the dead group's addresses (pytorch/pytorch#135712).
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    attempts = [tuple(map(int, line.split())) for line in steps_file.read_text().splitlines()]
    assert attempts == [(0, 1), (0, 2), (0, 3), (1, 3), (1, 4), (1, 5), (1, 6)]
    _assert_close(_weights(reference), _weights(out))
    steps = [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]
