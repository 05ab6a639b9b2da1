"""One run per run folder: a lock file naming the process that holds the folder.

Two runs on one folder at once overwrote each other's config, checkpoints and metrics. The
main process of a training call holds ``<run folder>/.siamae.lock`` (its PID, host and Slurm
job) from before its first check to its very end, on every exit path. A second run is refused
in one line naming the holder. A lock left by a process that is gone is taken over: a dead PID
on this host, or an earlier incarnation of this same Slurm job (a requeued job keeps its id and
may land on another node).

The folder is created with the lock when it does not exist; a start that fails before its first
file is written removes it again, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from siamae.errors import ConfigError

LOCK_FILE = ".siamae.lock"


@dataclass
class LockHolder:
    pid: int
    host: str
    slurm_job: str

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(os.getpid(), socket.gethostname(), os.environ.get("SLURM_JOB_ID", ""))

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        try:
            return cls(int(fields["pid"]), fields.get("host", ""), fields.get("slurm_job", ""))
        except (KeyError, ValueError):
            return None

    def to_text(self) -> str:
        return f"pid={self.pid}\nhost={self.host}\nslurm_job={self.slurm_job}\n"

    def is_gone(self) -> bool:
        """Whether the holder certainly no longer runs (unknown on another host: False)."""
        me = LockHolder.this_process()
        if self.slurm_job and self.slurm_job == me.slurm_job:
            return True  # an earlier incarnation of this job: Slurm ended it before the requeue
        if self.host != me.host:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"process {self.pid} on {self.host or 'an unknown host'}{job}"


@dataclass
class RunFolder:
    """The lock held on a run folder; ``started`` once the start wrote its first file."""

    path: Path
    created: bool
    started: bool = False


def _try_lock(lock: Path, me: LockHolder) -> LockHolder | None:
    """Take the lock; return the holder instead when another process has it."""
    for _ in range(2):  # a second try after a stale lock is removed
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text = lock.read_text()
            except FileNotFoundError:  # released meanwhile
                continue
            holder = LockHolder.parse(text)
            if holder is not None and not holder.is_gone():
                return holder
            lock.unlink(missing_ok=True)  # stale (or unreadable: a crash while writing it)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me.to_text())
        return None
    raise ConfigError(
        f"run.out_dir {str(lock.parent)!r}: could not take its lock file {LOCK_FILE}; another "
        "run is starting there: wait for it or use another run.out_dir"
    )


@contextlib.contextmanager
def lock_run_folder(path: Path, enabled: bool = True) -> Iterator[RunFolder | None]:
    """Hold ``path``'s lock (creating the folder) for the block; ``enabled`` False (a process
    other than the main one) does nothing."""
    if not enabled:
        yield None
        return
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock, me = path / LOCK_FILE, LockHolder.this_process()
    holder = _try_lock(lock, me)
    if holder is not None:
        raise ConfigError(
            f"run.out_dir {str(path)!r} is in use by another run ({holder.describe()}); wait "
            f"for it to end or use another --out (if that run is gone, delete {lock})"
        )
    folder = RunFolder(path, created)
    try:
        yield folder
    finally:
        own = LockHolder.parse(lock.read_text()) if lock.is_file() else None
        if own == me:
            lock.unlink(missing_ok=True)
        if created and not folder.started:
            shutil.rmtree(path, ignore_errors=True)  # a failed start leaves no folder
