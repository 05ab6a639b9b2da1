"""Where this process stands among the training processes: the one place that asks
``torch.distributed`` (outside a process group, as in tests and single-device runs, it is
rank 0 of 1)."""

from __future__ import annotations

import torch.distributed as dist


def world_size() -> int:
    """How many processes the running process group holds (1 outside one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_and_world_size() -> tuple[int, int]:
    """(this process's rank, world size); (0, 1) outside a process group."""
    if world_size() == 1:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()
