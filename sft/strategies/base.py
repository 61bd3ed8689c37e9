"""The protocol every strategy (single, fsdp2, deepspeed) implements. The training loop knows only this."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

from sft.dist import DistEnv


class Strategy(Protocol):
    dist: DistEnv

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Wrap/shard the model for this backend and build the optimizer over its trainable parameters."""
        ...

    def accumulating(self, model: torch.nn.Module, last_micro_batch: bool) -> AbstractContextManager[Any]:
        """Context for one micro-batch's forward+backward (skips gradient sync before the last one)."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> float:
        """Clip (when asked), step, zero the gradients; return the gradient norm before clipping."""
        ...

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small float64 tensor of counters over all ranks."""
        ...

    def save_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write model and optimizer state into `folder` (every rank calls this)."""
        ...

    def load_checkpoint(
        self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> None: ...

    def export(self, folder: Path, model: Any, tokenizer: Any) -> None:
        """Write a loadable Hugging Face folder: full model (safetensors) or the LoRA adapter."""
        ...

    def unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to run generation on."""
        ...
