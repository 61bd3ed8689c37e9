"""One process on one device (CPU or one GPU): no wrapping, plain PyTorch."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sft.config import Recipe
from sft.dist import DistEnv
from sft.errors import SftError
from sft.export import save_hf_folder
from sft.optim import build_optimizer
from sft.strategies.base import check_meta, write_meta


class SingleStrategy:
    collective_forward = False

    def __init__(self, recipe: Recipe, dist: DistEnv) -> None:
        if dist.world_size > 1:
            raise SftError(
                f"strategy.name=single runs one process but {dist.world_size} were started; "
                "set strategy.name=fsdp2 or deepspeed, or start one process"
            )
        self.recipe = recipe
        self.dist = dist

    def build_model(self) -> torch.nn.Module:
        from sft.model import build_model

        return build_model(self.recipe, self.dist.device)

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        return model, build_optimizer(model, self.recipe.optim)

    def accumulating(
        self, model: torch.nn.Module, last_micro_batch: bool
    ) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> float:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def save_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # Only what training changes: the adapter for LoRA, everything for full fine-tuning.
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(folder / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        write_meta(folder, self.dist, "single")

    def load_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        check_meta(folder, self.dist, "single", reshardable=True)
        saved = load_file(str(folder / "trainable.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
        if missing or any(n not in params for n in saved):
            raise RuntimeError(
                f"checkpoint {folder} does not match the model (e.g. {(missing or list(saved))[0]})"
            )
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))

    def export(self, folder: Path, model: Any, tokenizer: Any) -> None:
        save_hf_folder(self.recipe, folder, model, None, tokenizer)

    def unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        return model
