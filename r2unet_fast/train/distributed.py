"""DDP set-up for ``torchrun``: env:// rendezvous, gloo on CPU, nccl on CUDA, rank-0-only side effects."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .runtime import resolve_device


@dataclass
class DistContext:
    """Where this process sits: rank, world size, its device and the process group's backend
    (None without one). A plain process is rank 0 of 1 with no group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when a process group is live (launched by torchrun, even with one process: then DDP and
        the collectives run over a group of one, which is how one GPU proves the DDP path)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op for a single process)."""
        if self.enabled:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Overwrite every buffer of ``module`` (BatchNorm running statistics, ...) with rank 0's copy,
        in place, so every rank holds the model rank 0 checkpoints (no-op for a single process)."""
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks (float64)."""
        if not self.enabled:
            return list(values)
        packed = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(packed)
        return packed.cpu().tolist()

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        return self.sum([float(flag)])[0] > 0 if self.enabled else flag

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def shutdown(self) -> None:
        """Leave the process group (safe to call twice)."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """True when the environment holds what env:// rendezvous needs (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), as torchrun sets it, for any number of processes."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def setup_distributed(device_name: str) -> DistContext:
    """Resolve the device and, under torchrun, join the process group (nccl for CUDA, gloo for CPU)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if not launched_by_torchrun():
        return DistContext(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), device=device,
                       backend=str(dist.get_backend()))


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` gets items r, r+w, r+2w, ... in order: every item exactly once across ranks.

    For evaluation, where DistributedSampler's padding would count some images twice.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
