"""Where a stage-one process runs: device, rank and world size under torchrun.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1) a process joins the group the
environment describes, NCCL on GPUs and gloo on the CPU; alone it is rank 0
of 1. Rank 0 reads the data and writes; :func:`broadcast_from_main` hands its
result (or its error) to the other ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, List

import torch

from decouple.errors import ConfigError, DecoupleError


@dataclass
class DistInfo:
    """Where this process runs: rank, world size, local rank, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def resolve_device(device: str = "auto", *, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA (this process's local GPU) when present, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible to this process")
        return torch.device("cuda", local_rank)
    if device == "cpu" or device.startswith("cuda:"):
        return torch.device(device)
    raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    resolved = resolve_device(device, local_rank=local_rank)
    info = DistInfo(rank, world_size, local_rank, local_world, resolved)
    if world_size > 1:
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        if not torch.distributed.is_initialized():
            backend = "nccl" if resolved.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
            info.initialized_here = True
    return info


def shutdown_distributed(info: DistInfo) -> None:
    if info.initialized_here and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def broadcast_from_main(info: DistInfo, make: Callable[[], Any]) -> Any:
    """Run ``make`` on rank 0 and hand its result (or its DecoupleError) to every rank."""
    if not info.distributed:
        return make()
    payload: List[Any] = [None]
    if info.is_main:
        try:
            payload[0] = ("ok", make())
        except DecoupleError as exc:
            payload[0] = ("error", exc)
    torch.distributed.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise value
    return value


def default_workers(device: torch.device, local_world_size: int = 1) -> int:
    """Loader processes: none on the CPU (decoding competes with compute), else up to 8 per GPU."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // max(local_world_size, 1)))
