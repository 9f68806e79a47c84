"""The distributed facts of this process, read once from the environment.

Model and data code receive a :class:`DistInfo`; nothing else reads ``os.environ`` for rank,
world size or device.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import ConfigError

log = logging.getLogger("dstrain")

# A JIT build of a DeepSpeed op (shm_comm at CPU init, fused/cpu Adam) takes minutes at most.
STALE_LOCK_ENV, STALE_LOCK_DEFAULT_S = "DSTRAIN_STALE_LOCK_S", 600.0


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


def extension_build_root() -> Path:
    """Where torch JIT-builds DeepSpeed's ops (``TORCH_EXTENSIONS_DIR`` or ~/.cache/torch_extensions)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def clear_stale_build_locks(
    root: Path | None = None, stale_after_s: float | None = None, poll_s: float = 2.0
) -> list[Path]:
    """Wait out JIT-build locks under ``root``; remove those older than ``stale_after_s``.

    torch guards every load of a JIT-built op with ``<op>/lock``, a file that names no process.
    A process killed while holding it (kill -9, a SLURM time limit, a node failure) leaves it
    behind, and every later run then waits on it forever inside DeepSpeed's init. A lock held by
    a live build disappears within minutes, so one older than ``stale_after_s`` is removed with
    a warning (``stale_after_s`` defaults to ``$DSTRAIN_STALE_LOCK_S``, 600). Returns the locks removed.
    """
    if stale_after_s is None:
        raw = os.environ.get(STALE_LOCK_ENV, str(STALE_LOCK_DEFAULT_S))
        try:
            stale_after_s = float(raw)
        except ValueError:
            raise ConfigError(f"${STALE_LOCK_ENV}={raw!r} is not a number of seconds") from None
    root = extension_build_root() if root is None else root
    if not root.is_dir():
        return []
    removed: list[Path] = []
    warned = False
    while True:
        locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]
        waiting = []
        for lock in locks:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # released while we looked
            if age < stale_after_s:
                waiting.append(lock)
                continue
            log.warning(
                "removing %s: a build lock %.0f s old, left by a killed process "
                "(every run would otherwise wait on it forever)",
                lock,
                age,
            )
            lock.unlink(missing_ok=True)
            removed.append(lock)
        if not waiting:
            return removed
        if not warned:
            log.warning(
                "waiting for %s: another process is building a DeepSpeed op, or one was "
                "killed while holding it (removed once %.0f s old; set "
                "DSTRAIN_STALE_LOCK_S to change)",
                waiting[0],
                stale_after_s,
            )
            warned = True
        time.sleep(poll_s)


def init_distributed(dist: DistInfo) -> None:
    """Start the process group (gloo on CPU, nccl on GPU) through DeepSpeed, once."""
    import deepspeed

    clear_stale_build_locks()
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


def barrier(dist: DistInfo) -> None:
    """Wait for every rank (a no-op on one rank or before the process group exists)."""
    if dist.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_gather_objects(obj: object, dist: DistInfo) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` on one rank."""
    if dist.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    gathered: list[object] = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
