"""The process's place in the job, from torchrun's (or Slurm's) environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """The collective backend for a device: NCCL between GPUs, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_dist(device_choice: str = "auto") -> DistEnv:
    """Read RANK/WORLD_SIZE/LOCAL_RANK; start the process group (NCCL on GPUs, gloo on CPU) when world > 1."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend_for(device), rank=rank, world_size=world)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def ensure_process_group(dist: DistEnv) -> None:
    """Sharded backends need a process group even for one process (`sft train` without torchrun)."""
    if torch.distributed.is_initialized():
        return
    backend = backend_for(dist.device)
    if dist.world_size == 1:
        # An in-memory store: no port to pick, nothing reaches the network.
        torch.distributed.init_process_group(
            backend=backend, store=torch.distributed.HashStore(), rank=0, world_size=1
        )
        return
    torch.distributed.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world_size)


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small tensor over all ranks (on `device`: NCCL reduces only GPU tensors); returns a CPU copy."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return values
    out = values.to(device)
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out.cpu()
