"""The distributed facts of this process, read once from the environment.

Model and data code receive a :class:`DistInfo`; nothing else reads ``os.environ`` for rank,
world size or device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    """Rank, local rank, world size and device of this process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read RANK/LOCAL_RANK/WORLD_SIZE (set by deepspeed, torchrun or our srun wrapper)."""
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        return cls(rank=rank, local_rank=local_rank, world_size=world_size, device=device)

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"


def init_distributed(dist: DistInfo) -> None:
    """Start the process group (gloo on CPU, nccl on GPU) through DeepSpeed, once."""
    import deepspeed

    if dist.device.startswith("cuda"):
        torch.cuda.set_device(dist.local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.backend)


def all_reduce_sum(values: list[float], dist: DistInfo) -> list[float]:
    """Sum a few floats over all ranks (fp64, so token counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.world_size > 1 and torch.distributed.is_initialized():
        if dist.backend == "nccl":
            tensor = tensor.to(dist.device)
        torch.distributed.all_reduce(tensor)
    return tensor.cpu().tolist()


def all_reduce_max(values: list[float], dist: DistInfo) -> list[float]:
    """Max of a few floats over all ranks (flags: any rank set it)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.world_size > 1 and torch.distributed.is_initialized():
        if dist.backend == "nccl":
            tensor = tensor.to(dist.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.cpu().tolist()
