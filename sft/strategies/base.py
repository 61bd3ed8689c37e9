"""The protocol every strategy (single, fsdp2, deepspeed) implements. The training loop knows only this.

The loss contract (DESIGN invariant 2): for each micro-batch the loop calls `backward(share)` where `share` is
that micro-batch's token-loss sum divided by the global count of trained tokens of the step, so the shares of
all micro-batches on all ranks add up to the step's loss. After the last micro-batch, every strategy must
hold the gradient of that sum: backends that average gradients over ranks scale by the world size, and
DeepSpeed is told not to divide by the accumulation steps.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

from sft.dist import DistEnv
from sft.errors import SftError

META_FILE = "strategy.json"


class Strategy(Protocol):
    dist: DistEnv
    collective_forward: bool
    """True when every forward is a collective (sharded weights): every rank must run each forward, so
    generation runs on all ranks, not only on rank 0."""

    def build_model(self) -> torch.nn.Module:
        """The recipe's trainable model as this backend takes it into `prepare`: whole on the device (single,
        ZeRO-1/2), empty on the meta device (FSDP2: `prepare` shards it, then each rank reads its shards), or
        partitioned as it is constructed (ZeRO-3). No rank holds the whole of a sharded model (invariant 10)."""
        ...

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Wrap/shard the model for this backend and build the optimizer over its trainable parameters.

        The returned model is what the loop calls forward on; the optimizer is what the schedule drives."""
        ...

    def accumulating(self, model: torch.nn.Module, last_micro_batch: bool) -> AbstractContextManager[Any]:
        """Context for one micro-batch's forward+backward (skips gradient sync before the last one)."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this micro-batch's share of the step's global mean loss (see the module docstring)."""
        ...

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> float:
        """Clip (when asked), step, zero the gradients; return the global gradient norm before clipping."""
        ...

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small float64 CPU tensor of counters over all ranks."""
        ...

    def save_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write model and optimizer state into `folder` (every rank calls this)."""
        ...

    def load_checkpoint(
        self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> None: ...

    def export(self, folder: Path, model: Any, tokenizer: Any) -> None:
        """Write a loadable Hugging Face folder: full model (safetensors) or the LoRA adapter.

        Every rank calls this (gathering sharded weights is a collective); only rank 0 writes."""
        ...

    def unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to run generation on."""
        ...


def write_meta(folder: Path, dist: DistEnv, name: str, **extra: Any) -> None:
    """Record which backend wrote a checkpoint and with how many ranks (rank 0 writes)."""
    if dist.is_main:
        meta = {"strategy": name, "world_size": dist.world_size, **extra}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def check_meta(folder: Path, dist: DistEnv, name: str, reshardable: bool) -> dict[str, Any]:
    """Refuse a checkpoint from another backend, or from another world size when the backend cannot reshard."""
    path = folder / META_FILE
    if not path.is_file():
        return {}  # written before checkpoints carried this file: nothing to compare
    meta: dict[str, Any] = json.loads(path.read_text())
    if meta.get("strategy") != name:
        raise SftError(
            f"checkpoint {folder} was written by strategy {meta.get('strategy')}; resume it with "
            f"strategy.name={meta.get('strategy')} or start a new output_dir"
        )
    saved = int(meta.get("world_size", dist.world_size))
    if not reshardable and saved != dist.world_size:
        raise SftError(
            f"checkpoint {folder} was written by {saved} processes and {name} cannot reshard it for "
            f"{dist.world_size}; resume with {saved} processes (keeping micro_batch_size x grad_accum x "
            "processes), or use strategy.name=fsdp2, whose checkpoints reshard"
        )
    return meta
