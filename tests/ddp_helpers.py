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
