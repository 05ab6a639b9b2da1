"""Stop requests: a signal asks the training loop to save a checkpoint at the next step and stop.

SIGINT (Ctrl-C), SIGTERM (``kill``, a scheduler's stop) and SIGUSR2, the signal Slurm sends
before a time limit or a preemption when asked to (``--signal=USR2@90``; submitit asks so) and
submitit's cue to requeue the job. Several processes of one run stop at the same step: they vote
at every step (a MAX all-reduce), so a signal that reaches one process only, or reaches the
processes at different steps, never leaves one of them waiting in a collective for the others.
"""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist

from siamae.engine.distributed import DistInfo

# Lowest priority first: when several signals arrive, the one that says what happens after the
# save wins, a requeue (SIGUSR2) over a stop (SIGTERM) over an interruption (SIGINT). POSIX only:
# SIGUSR2 does not exist on Windows.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2") if hasattr(signal, name)
)
_PRIORITY = {sig: rank for rank, sig in enumerate(STOP_SIGNALS, start=1)}
_BY_PRIORITY = {rank: sig for sig, rank in _PRIORITY.items()}


class StopRequest:
    """Inside ``with``: a stop signal sets :attr:`signal` (the handlers before are restored on
    exit). :meth:`agreed` is the loop's question, asked once per micro-batch."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        # The last vote's result (on the host) and, on a GPU, the event after its copy.
        self._vote: torch.Tensor | None = None
        self._vote_ready: torch.cuda.Event | None = None

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker thread)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None or _PRIORITY[signum] >= _PRIORITY[self.signal]:
            self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        """This process received a stop signal."""
        return self.signal is not None

    @property
    def name(self) -> str:
        """The signal's name (``SIGTERM``), what the summary's ``interrupted`` says."""
        return signal.Signals(self.signal).name

    def agreed(self, info: DistInfo, device: torch.device) -> bool:
        """Whether the run stops here. One process: its own signal. Several: a collective that
        every process calls at the same point of the loop; it returns the vote of its previous
        call (so it never waits for the device: that all-reduce and its copy to the host ran
        before the last step's work) and sets :attr:`signal` alike on every process."""
        if not info.enabled or not dist.is_initialized():
            return self.requested
        decided = 0
        if self._vote is not None:
            if self._vote_ready is not None:
                self._vote_ready.synchronize()
            decided = int(self._vote.item())
        own = _PRIORITY.get(self.signal, 0)  # 0: no signal here
        vote = torch.full((1,), own, dtype=torch.int32, device=device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        if device.type == "cuda":
            if self._vote is None:
                self._vote = torch.empty(1, dtype=torch.int32, pin_memory=True)
            self._vote.copy_(vote, non_blocking=True)
            self._vote_ready = torch.cuda.Event()
            self._vote_ready.record()
        else:
            self._vote = vote
        if decided:
            self.signal = _BY_PRIORITY[decided]
            return True
        return False
