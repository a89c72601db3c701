"""Processes: torchrun's environment through timm's ``init_distributed_device_so``.

The same command runs on one process (no launcher) or many (``torchrun --nproc-per-node N``;
multi-node with torchrun's own ``--nnodes/--node-rank/--rdzv-*`` flags): nccl on GPUs, gloo on
CPUs unless ``--dist-backend`` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so

__all__ = ["ProcessInfo", "all_gather_objects", "init_processes", "shutdown"]


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in the job."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def primary(self) -> bool:
        return self.rank == 0


def init_processes(device: Optional[str], backend: Optional[str]) -> ProcessInfo:
    """Join the torchrun job when there is one (``WORLD_SIZE`` > 1) and pick this rank's device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    result = init_distributed_device_so(device=device, dist_backend=backend)
    return ProcessInfo(
        device=torch.device(result["device"]), rank=result["global_rank"], local_rank=result["local_rank"],
        world_size=result["world_size"], distributed=result["distributed"],
    )


def all_gather_objects(value: Any, info: ProcessInfo) -> list[Any]:
    """Every rank's ``value`` in rank order (just ``[value]`` on one process)."""
    if not info.distributed:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def shutdown(info: ProcessInfo) -> None:
    """Leave the process group (all ranks), if one was joined."""
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
