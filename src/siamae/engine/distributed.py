"""Process groups under torchrun or plain ``srun``: gloo on CPU, NCCL on GPU, one node or many."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from siamae.engine.slurm import process_group_variables


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or, in a task ``srun``
    started without torchrun, the one Slurm's variables describe; a no-op for one process."""
    # Exported, not only read: torch's env:// rendezvous and the CLI (which rank prints) read them.
    from_slurm = process_group_variables(os.environ)
    os.environ.update(from_slurm)
    if from_slurm and from_slurm.get("RANK") == "0" and int(from_slurm["WORLD_SIZE"]) > 1:
        # A batch script that runs the command without srun would wait here for tasks that
        # never come: say what it waits for.
        print(
            f"siamae: joining {from_slurm['WORLD_SIZE']} Slurm tasks (SLURM_PROCID, "
            f"SLURM_NTASKS) at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            file=sys.stderr,
            flush=True,
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank)


def barrier(info: DistInfo) -> None:
    """A barrier only when there is more than one process (never crashes single runs)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value)
    return value


def broadcast_from_main(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Overwrite ``tensors`` in place with rank 0's (every process passes the same list)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def gather_rng_states(
    state: torch.Tensor, info: DistInfo, device: torch.device
) -> list[torch.Tensor]:
    """Every rank's RNG state (same-size byte tensors), so a resumed DDP run continues exactly."""
    if not info.enabled:
        return [state]
    local = state.to(device)
    out = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(out, local)
    return [t.cpu() for t in out]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
