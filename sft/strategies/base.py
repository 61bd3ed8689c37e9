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

from sft.config import Recipe
from sft.dist import DistEnv
from sft.errors import SftError

EXPORT_SHARD_SIZE = "5GB"  # safetensors shards of an exported model (with an index when there are several)
META_FILE = "strategy.json"


class Strategy(Protocol):
    dist: DistEnv
    collective_forward: bool
    """True when every forward is a collective (sharded weights): every rank must run each forward, so
    generation runs on all ranks, not only on rank 0."""

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


def save_hf_folder(
    recipe: Recipe,
    folder: Path,
    model: Any,
    state_dict: dict[str, Any] | None,
    tokenizer: Any,
    max_shard_size: str | int = EXPORT_SHARD_SIZE,
) -> None:
    """Rank 0's part of an export: `save_pretrained` with a gathered state dict (None: the model's own).

    For a peft model `save_pretrained` keeps only the adapter weights of the state dict."""
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if not adapter_only(recipe):  # an adapter is small: one file
        kwargs["max_shard_size"] = max_shard_size
    if state_dict is not None:
        # A gathered state dict holds tied weights (embeddings = head) as separate copies: keep the first
        # name only, as the model's own state dict would.
        state_dict = dict(state_dict)
        first: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(param), name) != name:
                state_dict.pop(name.replace("_checkpoint_wrapped_module.", ""), None)
        kwargs["state_dict"] = state_dict
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)
    if recipe.method == "qlora":  # the adapter records how its base was quantized (for the merge)
        from sft.model.quant import write_qlora_adapter_meta

        write_qlora_adapter_meta(folder, recipe.model.name, model)
    elif recipe.method == "lora":
        meta = {"base_model": recipe.model.name, "quantization": None, "method": recipe.method}
        (folder / "sft_adapter.json").write_text(json.dumps(meta, indent=2) + "\n")


def adapter_only(recipe: Recipe) -> bool:
    """LoRA and QLoRA train (so save, gather and export) only the adapter weights."""
    return recipe.method in ("lora", "qlora")


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
