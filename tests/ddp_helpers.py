"""Real multi-process DDP on CPU: ``world`` gloo processes, each running the one training loop."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: list[str]) -> None:
    from siamae.engine.trainer import train
    from siamae.recipes import load_config

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)  # two processes on two cores
    train(load_config(None, overrides), resume=False)


def train_in_processes(overrides: list[str], world: int = 2) -> None:
    """``siamae pretrain`` with these ``--set`` overrides, as ``world`` DDP processes (gloo)."""
    mp.start_processes(
        _worker,
        args=(world, _free_port(), list(overrides)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )


def _vote(rank: int, world: int, port: int, signalled_at: int, out: str) -> None:
    import signal

    from siamae.engine.distributed import DistInfo
    from siamae.engine.stop import StopRequest

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.distributed.init_process_group("gloo")
    stop = StopRequest()
    stopped_at = None
    for call in range(10):
        if rank == world - 1 and call == signalled_at:
            stop._handle(signal.SIGUSR2, None)  # what its handler does when the signal comes
        if stop.agreed(DistInfo(rank, world, rank), torch.device("cpu")):
            stopped_at = call
            break
    name = signal.Signals(stop.signal).name if stop.signal else None
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{stopped_at} {name}")
    torch.distributed.destroy_process_group()


def stop_votes(out: str, world: int = 2, signalled_at: int = 3) -> list[str]:
    """``world`` gloo processes ask StopRequest.agreed at each step; only the last process gets
    SIGUSR2, before its call ``signalled_at``. Each one's "<call it stopped at> <signal>"."""
    mp.start_processes(
        _vote, args=(world, _free_port(), signalled_at, out), nprocs=world, join=True
    )
    return [open(f"{out}.{rank}").read() for rank in range(world)]
