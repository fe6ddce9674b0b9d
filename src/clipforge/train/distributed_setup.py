"""Process-group set-up from the environment torchrun provides; the same code runs without it.

torchrun (``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` for every process it starts. Without them this is a single
process of rank 0 and no process group is created.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..runtime import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0  # this process among all processes of the run
    world_size: int = 1  # processes in the run (all nodes)
    local_rank: int = 0  # this process among those of its node; picks the GPU
    device: torch.device = torch.device("cpu")  # where this process trains

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def read_environment(requested_device: str = "auto") -> DistributedContext:
    """This process's place in the run, from the torchrun environment; joins nothing.

    Cheap and side-effect free, so configuration errors can be reported before any set-up.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    device = resolve_device(requested_device, local_rank)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def init_distributed(context: DistributedContext) -> bool:
    """Select this process's GPU and join the process group when there are several processes.

    The backend is NCCL for CUDA and gloo for CPU. Returns True when this call created the group;
    then call :func:`cleanup_distributed` at the end.
    """
    if context.device.type == "cuda":
        torch.cuda.set_device(context.device)
    if context.world_size == 1 or dist.is_initialized():
        return False
    if context.device.type == "cuda":
        dist.init_process_group("nccl", rank=context.rank, world_size=context.world_size, device_id=context.device)
    else:
        dist.init_process_group("gloo", rank=context.rank, world_size=context.world_size)
    return True


def cleanup_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
