"""``siamae submit``: a pre-training or fine-tuning run as a Slurm job, through submitit.

``siamae submit --nodes N --gpus-per-node G --partition P --time HH:MM:SS -- pretrain ...``
submits one task per GPU (N x G processes, one DDP group; each task reads its rank from the job's
environment). The run folder holds the job's files: ``<run>/slurm/`` has the batch script and
one log per task. submitit asks Slurm for SIGUSR2 ``--signal-delay`` seconds before the time
limit (and clusters send it at a preemption): the engine saves ``last.pt`` at the next step and
stops, then submitit calls :meth:`SiamaeJob.checkpoint` and requeues the job, which runs the same
command again: it resumes from ``last.pt`` in the same run folder. ``--executor local`` runs the
same path on this machine (submitit's local executor: no queue, the same signal and requeue).

The command is checked (its options and its whole config) before anything is submitted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from siamae.config import Config
from siamae.engine.slurm import port_for_job
from siamae.errors import ConfigError
from siamae.paths import check_writable

COMMANDS = ("pretrain", "finetune")
LOG_FOLDER = "slurm"  # inside the run folder
# The engine's exit code for a run stopped (and saved) by SIGUSR2: 128 + the signal number
# (Slurm and submitit are POSIX only; the module still imports elsewhere).
REQUEUE_EXIT_CODE = 128 + signal.SIGUSR2 if hasattr(signal, "SIGUSR2") else None
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^\d+[KMGT]?B?$", re.IGNORECASE)


def parse_time(text: str) -> int:
    """Slurm's time formats, in whole minutes (rounded up): ``MM``, ``MM:SS``, ``HH:MM:SS``,
    ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    match = _TIME.match(text.strip())
    if not match:
        raise ConfigError(
            f"--time {text!r}: expected HH:MM:SS (or D-HH:MM:SS, or minutes), e.g. --time 24:00:00"
        )
    days, *rest = match.groups()
    parts = [int(p) for p in rest if p is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
        total = ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    elif len(parts) == 3:
        total = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    elif len(parts) == 2:  # MM:SS
        total = parts[0] * 60 + parts[1]
    else:
        total = parts[0] * 60
    if total <= 0:
        raise ConfigError(f"--time {text!r}: the time limit must be positive")
    return -(-total // 60)


def resumed_command(command: Sequence[str]) -> list[str]:
    """The command a requeued job runs: the same, resuming from the run folder's ``last.pt``
    (without ``--no-resume`` or ``--resume PATH``, which are for the first start only)."""
    out: list[str] = []
    skip = False
    for token in command:
        if skip:
            skip = False
            continue
        if token == "--no-resume" or token.startswith("--resume="):
            continue
        if token == "--resume":
            skip = True
            continue
        out.append(token)
    return out


class JobFailed(RuntimeError):
    """The command of a job exited with an error; its message is in the task's log."""


#: The command line's ``main``: what a task runs with the job's command (handed in by the command
#: line, so that this module does not import it back).
RunCommand = Callable[[Sequence[str]], int]


class SiamaeJob:
    """What each task of the job runs: ``siamae <command>``, as one process of the DDP group.

    submitit pickles it (``run_command`` by its importable name); on SIGUSR2 it calls
    :meth:`checkpoint` and requeues what that returns.
    """

    def __init__(
        self, command: Sequence[str], cwd: str, run_command: RunCommand, attempt: int = 1
    ) -> None:
        self.command = list(command)
        self.cwd = cwd  # relative paths in the command mean what they meant at submission
        self.run_command = run_command
        self.attempt = attempt

    def __call__(self) -> int:
        job = submitit.JobEnvironment()
        os.chdir(self.cwd)
        local = job.cluster == "local"
        os.environ.update(
            RANK=str(job.global_rank),
            LOCAL_RANK=str(job.local_rank),
            WORLD_SIZE=str(job.num_tasks),
        )
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1" if local else job.hostnames[0])
        os.environ.setdefault("MASTER_PORT", str(port_for_job(str(job.job_id))))
        if job.global_rank == 0:
            print(
                f"siamae submit: job {job.job_id}, attempt {self.attempt}, {job.num_tasks} "
                f"tasks on {job.num_nodes} node(s): siamae {' '.join(self.command)}",
                flush=True,
            )
        code = self.run_command(self.command)
        if code == REQUEUE_EXIT_CODE:
            # The engine saved last.pt and restored submitit's SIGUSR2 handler: handing the
            # signal back lets submitit call checkpoint() and requeue the job (on the main task;
            # the others return, and the requeue ends them).
            if callable(signal.getsignal(signal.SIGUSR2)):
                signal.raise_signal(signal.SIGUSR2)
            return code
        if code != 0:
            raise JobFailed(
                f"siamae {' '.join(self.command)} exited with code {code}; its message is above "
                "in this log"
            )
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit's requeue hook: the same command again, resuming from last.pt."""
        return submitit.helpers.DelayedSubmission(
            SiamaeJob(resumed_command(self.command), self.cwd, self.run_command, self.attempt + 1)
        )


@dataclass
class JobPlan:
    """Everything a submission needs, checked."""

    command: list[str]
    run_dir: Path
    executor: str
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    time_min: int
    cpus_per_task: int
    partition: str | None = None
    account: str | None = None
    mem: str | None = None
    name: str = "siamae"
    signal_delay_s: int = 120
    max_timeouts: int = 30
    slurm_options: dict[str, str] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.run_dir / LOG_FOLDER


def _positive(value: int | None, option: str, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        expected = "0 or more" if allow_zero else "a positive integer"
        raise ConfigError(f"{option}: expected {expected}, got {value}")


def plan_from_args(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    configs: dict[str, Callable[[argparse.Namespace], Config]],
) -> JobPlan:
    """Check ``siamae submit``'s options and its command (options and whole config)."""
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command or command[0] not in COMMANDS:
        got = f"got {command[0]!r}" if command else "got nothing"
        raise ConfigError(
            f"submit: the job's command comes after '--' and is one of {', '.join(COMMANDS)} "
            f"({got}), e.g. siamae submit ... -- pretrain --config C"
        )
    for value, option in ((args.nodes, "--nodes"), (args.tasks_per_node, "--tasks-per-node")):
        _positive(value, option)
    _positive(args.gpus_per_node, "--gpus-per-node", allow_zero=True)
    _positive(args.cpus_per_task, "--cpus-per-task")
    _positive(args.signal_delay, "--signal-delay")
    _positive(args.max_timeouts, "--max-timeouts", allow_zero=True)
    time_min = parse_time(args.time)
    if args.mem is not None and not _MEM.match(args.mem):
        raise ConfigError(f"--mem {args.mem!r}: expected a size like 64G or 500000M")
    slurm_options = {}
    for text in args.slurm_option or []:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--slurm-option {text!r}: expected KEY=VALUE, e.g. qos=high")
        slurm_options[key.strip().replace("-", "_")] = value
    if args.executor == "slurm":
        if not args.partition:
            raise ConfigError(
                "submit --partition: needed for a Slurm job (or pass --executor local to run "
                "the job here)"
            )
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise ConfigError(
                f"submit: {' and '.join(missing)} not found on this machine: submit from a "
                "Slurm login node, or pass --executor local to run the job here"
            )
    elif args.nodes != 1:
        raise ConfigError(
            f"--nodes {args.nodes}: --executor local runs on this machine only: use --nodes 1"
        )

    # The command is parsed and its config resolved as the job will: a mistake fails here, not
    # after hours in the queue.
    job_args = parser.parse_args(command)
    cfg = configs[command[0]](job_args)
    run_dir = Path(cfg.run.out_dir).resolve()
    check_writable(run_dir, "run.out_dir")
    tasks = args.tasks_per_node if args.tasks_per_node is not None else max(args.gpus_per_node, 1)
    return JobPlan(
        command=command,
        run_dir=run_dir,
        executor=args.executor,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=tasks,
        time_min=time_min,
        # The loader's workers and the main process of each task.
        cpus_per_task=args.cpus_per_task or cfg.data.num_workers + 1,
        partition=args.partition,
        account=args.account,
        mem=args.mem,
        name=args.name or f"siamae-{command[0]}-{run_dir.name}",
        signal_delay_s=args.signal_delay,
        max_timeouts=args.max_timeouts,
        slurm_options=slurm_options,
    )


def build_executor(plan: JobPlan) -> submitit.AutoExecutor:
    """The submitit executor of the plan; its files go to ``<run>/slurm/``."""
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(
        folder=plan.log_dir,
        cluster=plan.executor,
        slurm_max_num_timeout=plan.max_timeouts,
        local_max_num_timeout=plan.max_timeouts,
    )
    parameters: dict[str, Any] = {
        "name": plan.name,
        "timeout_min": plan.time_min,
        "nodes": plan.nodes,
        "tasks_per_node": plan.tasks_per_node,
        "cpus_per_task": plan.cpus_per_task,
    }
    if plan.gpus_per_node:
        parameters["gpus_per_node"] = plan.gpus_per_node
    if plan.executor == "slurm":
        parameters.update(
            slurm_partition=plan.partition,
            slurm_signal_delay_s=plan.signal_delay_s,
            slurm_additional_parameters=dict(plan.slurm_options),
        )
        if plan.account:
            parameters["slurm_account"] = plan.account
        if plan.mem:
            parameters["slurm_mem"] = plan.mem
    executor.update_parameters(**parameters)
    return executor


def launch(plan: JobPlan, run_command: RunCommand) -> submitit.Job:
    """Submit the plan: every task runs its command with ``run_command`` (:class:`SiamaeJob`)."""
    return build_executor(plan).submit(SiamaeJob(plan.command, os.getcwd(), run_command))


def run_submit(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    configs: dict[str, Callable[[argparse.Namespace], Config]],
    run_command: RunCommand,
) -> int:
    plan = plan_from_args(args, parser, configs)
    job = launch(plan, run_command)
    where = plan.log_dir / f"{job.job_id}_<task>_log.out"
    print(
        f"submitted job {job.job_id} ({plan.executor}): {plan.nodes} node(s) x "
        f"{plan.tasks_per_node} task(s), {plan.time_min} min a run, requeued on preemption "
        f"or time limit (up to {plan.max_timeouts} time limits)\n"
        f"  run folder: {plan.run_dir}\n  logs:       {where}"
    )
    sys.stdout.flush()
    return 0


def register(
    sub: Any,
    parser: argparse.ArgumentParser,
    configs: dict[str, Callable[[argparse.Namespace], Config]],
    run_command: RunCommand,
) -> None:
    """Add ``siamae submit`` to the CLI; ``configs`` resolves a command's config as it would,
    ``run_command`` (the command line's ``main``) is what each task of the job runs."""
    p = sub.add_parser(
        "submit",
        help="run pretrain or finetune as a Slurm job (submitit): one task per GPU, "
        "requeued on preemption or time limit, resumed from last.pt",
        description="siamae submit [options] -- pretrain|finetune [its options]. The job's logs "
        "go to <run folder>/slurm/. SIGUSR2 before the time limit (or at a preemption) saves "
        "last.pt and requeues the job, which resumes in the same run folder.",
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument(
        "--gpus-per-node", type=int, required=True, help="GPUs per node: one task per GPU"
    )
    p.add_argument(
        "--tasks-per-node",
        type=int,
        help="processes per node (default: --gpus-per-node, or 1 without GPUs)",
    )
    p.add_argument("--partition", help="Slurm partition (needed with --executor slurm)")
    p.add_argument(
        "--time", required=True, help="time limit of one run of the job: HH:MM:SS, D-HH:MM:SS"
    )
    p.add_argument("--account", help="Slurm account to charge")
    p.add_argument(
        "--cpus-per-task",
        type=int,
        help="CPUs per task (default: the config's data.num_workers + 1)",
    )
    p.add_argument("--mem", help="memory per node, e.g. 256G (default: the partition's)")
    p.add_argument("--name", help="job name (default: siamae-<command>-<run folder name>)")
    p.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        help="seconds before the time limit that SIGUSR2 comes (default 120): time for one "
        "step and a checkpoint",
    )
    p.add_argument(
        "--max-timeouts",
        type=int,
        default=30,
        help="requeues after a time limit before the job gives up (default 30; preemptions "
        "do not count)",
    )
    p.add_argument(
        "--slurm-option",
        action="append",
        metavar="KEY=VALUE",
        help="another sbatch option, e.g. qos=high or constraint=a100 (repeatable)",
    )
    p.add_argument(
        "--executor",
        choices=("slurm", "local"),
        default="slurm",
        help="slurm (default), or local: the same path on this machine, no queue",
    )
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="-- then the job's command: pretrain ... or finetune ...",
    )
    p.set_defaults(func=lambda args: run_submit(args, parser, configs, run_command))
