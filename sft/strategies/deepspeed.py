"""DeepSpeed ZeRO stage 1/2/3 with optional CPU offload, launched by torchrun (no pdsh/ssh launcher).

The JSON config comes from ds_configs/ (or the user's) with "auto" filled from the recipe (sft/ds_config.py).
The engine owns clipping and the optimizer step; the recipe's schedule drives the engine's inner torch
optimizer, like any other. Checkpoints are DeepSpeed's own, written inside the folder the atomic checkpoint
gives us; they cannot be resharded for another world size, which is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sft.config import Recipe
from sft.dist import DistEnv, all_reduce_sum, ensure_process_group
from sft.ds_config import fill_config
from sft.errors import SftError
from sft.export import adapter_only, save_hf_folder, save_streamed_hf_folder
from sft.optim import build_optimizer
from sft.paths import extensions_cache_dir
from sft.strategies.base import check_meta, write_meta

TAG = "deepspeed"  # the sub-folder DeepSpeed writes into


def set_extensions_dir() -> None:
    """Compiled DeepSpeed ops (CPU Adam for offload) are built once into a project cache (45-60 s each)
    and reused by every later run and test, unless the user chose TORCH_EXTENSIONS_DIR."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_cache_dir()))


class DeepSpeedStrategy:
    def __init__(self, recipe: Recipe, dist: DistEnv) -> None:
        self.recipe = recipe
        self.dist = dist
        self.stage = recipe.strategy.deepspeed.zero_stage
        self.collective_forward = self.stage == 3  # only ZeRO-3 gathers weights in the forward
        self.engine: Any = None
        set_extensions_dir()
        # DeepSpeed reads these even when the process group exists; one process without torchrun lacks them.
        for key, value in (
            ("RANK", dist.rank),
            ("LOCAL_RANK", dist.local_rank),
            ("WORLD_SIZE", dist.world_size),
        ):
            os.environ.setdefault(key, str(value))
        ensure_process_group(dist)

    def config(self, hidden_size: int | None) -> dict[str, Any]:
        try:
            return fill_config(
                self.recipe, self.dist.world_size, self.dist.device.type == "cuda", hidden_size
            )
        except ValueError as e:
            raise SftError(str(e)) from None

    def build_model(self) -> torch.nn.Module:
        from sft.model import build_model

        if self.stage != 3:  # ZeRO-1/2 keep whole weights on every rank
            return build_model(self.recipe, self.dist.device)
        from transformers import AutoConfig

        from sft.model.load import add_lora
        from sft.model.sharded import checkpoint_folder, partitioned_model

        cfg = self.recipe.model
        hidden = AutoConfig.from_pretrained(checkpoint_folder(cfg), trust_remote_code=cfg.trust_remote_code)
        model = partitioned_model(cfg, self.config(getattr(hidden, "hidden_size", None)), self.dist.device)
        # method=qlora is refused with DeepSpeed (recipe check); peft adds adapters to the partitioned base.
        return add_lora(model, self.recipe.lora) if self.recipe.method == "lora" else model

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        import deepspeed

        config = self.config(getattr(getattr(model, "config", None), "hidden_size", None))
        # The same parameter groups as every other strategy (no weight decay on biases and norms); the
        # optimizer itself is built by DeepSpeed from the filled config.
        groups = [
            {"params": g["params"], "weight_decay": g["weight_decay"]}
            for g in build_optimizer(model, self.recipe.optim).param_groups
        ]
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
        self.engine = engine
        # The schedule sets the learning rate on the torch optimizer inside the engine's ZeRO wrapper.
        return engine, engine.basic_optimizer

    @contextlib.contextmanager
    def accumulating(self, model: torch.nn.Module, last_micro_batch: bool) -> Iterator[None]:
        # We say where the boundary is (the loop steps once per step), instead of DeepSpeed counting calls.
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # ZeRO averages gradients over ranks and by default divides by the accumulation steps; the loss
        # contract wants the plain sum of the shares, so undo the first and turn off the second.
        self.engine.backward(loss * self.dist.world_size, scale_wrt_gas=False)

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> float:
        self.engine.step()  # clips to gradient_clipping (= optim.max_grad_norm), steps, zeroes gradients
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(values, self.dist.device)

    def save_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.engine.save_checkpoint(
            str(folder),
            tag=TAG,
            save_latest=False,  # our own `latest` pointer is the one that counts
            exclude_frozen_parameters=adapter_only(self.recipe),
        )
        write_meta(folder, self.dist, "deepspeed", zero_stage=self.stage)

    def load_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        meta = check_meta(folder, self.dist, "deepspeed", reshardable=False)
        if meta and meta.get("zero_stage") != self.stage:
            raise SftError(
                f"checkpoint {folder} was written with ZeRO stage {meta.get('zero_stage')}; resume with "
                f"strategy.deepspeed.zero_stage={meta.get('zero_stage')}"
            )
        path, _ = self.engine.load_checkpoint(
            str(folder),
            tag=TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,  # the loop restores the schedule
            load_module_strict=not adapter_only(self.recipe),
        )
        if path is None:
            raise SftError(f"checkpoint {folder}: DeepSpeed found no checkpoint in {folder / TAG}")

    def _full(self, param: Any) -> torch.Tensor:
        """One parameter whole on every rank (a collective): the optimizer's fp32 master copy of a trained
        weight (also under bf16, where the module's weights are bf16), the weight itself for a frozen one."""
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:  # a frozen weight has no master copy: gather the weight itself
            with GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                full = param.detach().clone()
        return full

    def export(self, folder: Path, model: Any, tokenizer: Any) -> None:
        module = model.module
        if adapter_only(self.recipe):  # the adapter is small: gathered whole onto rank 0
            state = {}
            for name, param in module.named_parameters():
                if param.requires_grad:
                    full = self._full(param)
                    if self.dist.is_main:
                        state[name] = full.cpu().clone()
            if self.dist.is_main:
                save_hf_folder(self.recipe, folder, module, state, tokenizer)
            return

        # The full model: one tensor at a time, gathered by all ranks, written by rank 0 as it arrives.
        def gather(param: Any) -> torch.Tensor | None:
            full = self._full(param)
            return full.cpu() if self.dist.is_main else None

        tensors = [
            (
                name,
                torch.float32 if param.requires_grad else param.dtype,
                tuple(getattr(param, "ds_shape", param.shape)),
                functools.partial(gather, param),
            )
            for name, param in module.named_parameters()
        ]
        persistent = set(module.state_dict(keep_vars=True))
        tensors += [
            (name, b.dtype, tuple(b.shape), functools.partial(_on_main, b, self.dist.is_main))
            for name, b in module.named_buffers()
            if name in persistent
        ]
        save_streamed_hf_folder(folder, module, tensors, tokenizer, self.dist.is_main)

    def unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        inner: torch.nn.Module = getattr(model, "module", model)  # the engine wraps the model
        return inner


def _on_main(t: torch.Tensor, is_main: bool) -> torch.Tensor | None:
    return t.detach().cpu() if is_main else None


def prebuild_ops(offload: bool = True) -> None:
    """Compile (or load from the cache) the C++ ops a CPU or offload run needs, once, before any launch:
    the shared-memory collectives DeepSpeed's CPU backend loads at start-up, and CPU Adam for offload."""
    set_extensions_dir()
    from deepspeed.accelerator import get_accelerator

    names = ["ShareMemCommBuilder"] if get_accelerator().device_name() == "cpu" else []
    if offload:
        names.append("CPUAdamBuilder")
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None:
            builder.load(verbose=False)
            print(f"[sft] DeepSpeed op {builder.NAME} ready in {os.environ['TORCH_EXTENSIONS_DIR']}")


if __name__ == "__main__":  # python -m sft.strategies.deepspeed: build the ops once (CI set-up)
    prebuild_ops()
