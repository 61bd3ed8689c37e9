"""PyTorch FSDP2: `fully_shard` per decoder layer and the root, sharded DCP checkpoints, gathered export.

Works on GPUs with NCCL and on CPU with gloo. Parameters, gradients and optimizer state are DTensors sharded
over all ranks (dim 0); a layer's full weights exist only while it runs.

QLoRA (FSDP-QLoRA): a bitsandbytes 4-bit weight is a `Params4bit` of shape [packed values, 1] whose dtype is
`quant.storage_dtype`, a float dtype equal to `model.dtype` (the recipe check requires it), so FSDP2 shards
it along dim 0 like any other weight of the layer. Its quantization state (block scales, code book, shape)
is not sharded: every rank keeps the whole of it on the `Linear4bit` module (`module.quant_state`, a few
bits per 64 values). When FSDP2 all-gathers the packed bytes it puts a plain parameter on the module, and
bitsandbytes' forward re-attaches the module's state to it (`fix_4bit_weight_quant_state_from_module`),
so the full packed weight and its full state meet on every rank. Casting would scramble packed bytes, so
the gathered weights keep the storage dtype (`param_dtype` = storage dtype; autocast sets the compute
dtype); the frozen 4-bit weights are never saved, gathered for export or given to the optimizer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from sft.config import Recipe
from sft.dist import DistEnv, all_reduce_sum, ensure_process_group
from sft.errors import SftError
from sft.export import adapter_only, save_hf_folder, save_streamed_hf_folder
from sft.model.layers import decoder_layers
from sft.model.load import DTYPES
from sft.model.sharded import SOURCE_ATTR, fill_shards
from sft.optim import build_optimizer
from sft.strategies.base import check_meta, write_meta


class FSDP2Strategy:
    collective_forward = True

    def __init__(self, recipe: Recipe, dist: DistEnv) -> None:
        self.recipe = recipe
        self.dist = dist
        self.cfg = recipe.strategy.fsdp
        ensure_process_group(dist)
        self.mesh = init_device_mesh(dist.device.type, (dist.world_size,))

    def build_model(self) -> torch.nn.Module:
        from sft.model.sharded import empty_model

        # On meta: `prepare` shards it, then allocates and fills this rank's shards only.
        return empty_model(self.recipe, self.dist.device)

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        cfg = self.cfg
        param_dtype: str = cfg.param_dtype
        if self.recipe.method == "qlora":
            # Gathered as stored: a cast would turn the packed 4-bit bytes into other numbers. The recipe check
            # allows only auto or this dtype; autocast (train.precision) still decides the compute dtype.
            param_dtype = _prepare_4bit(model, self.recipe.quant.storage_dtype)
        elif param_dtype == "auto":
            param_dtype = "bfloat16" if self.recipe.train.precision == "bf16" else "float32"
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype])
        offload: OffloadPolicy = (
            CPUOffloadPolicy(pin_memory=self.dist.device.type == "cuda")
            if cfg.cpu_offload
            else OffloadPolicy()
        )
        layers = decoder_layers(model)
        if cfg.activation_checkpointing:
            layers = [_checkpointed(model, layer) for layer in layers]
        for layer in layers:
            fully_shard(
                layer,
                mesh=self.mesh,
                reshard_after_forward=cfg.reshard_after_forward,
                mp_policy=mp,
                offload_policy=offload,
            )
        # The root holds embeddings, final norm and the (possibly tied) head; it is needed again right away
        # in the backward, so it stays gathered after the forward.
        fully_shard(model, mesh=self.mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)
        if hasattr(model, SOURCE_ATTR):  # built empty: allocate and read this rank's shards only
            fill_shards(model, torch.device("cpu") if cfg.cpu_offload else self.dist.device)
        # The optimizer is built on the sharded parameters (DTensors), so its state is sharded too.
        return model, build_optimizer(model, self.recipe.optim)

    @contextlib.contextmanager
    def accumulating(self, model: torch.nn.Module, last_micro_batch: bool) -> Iterator[None]:
        assert isinstance(model, FSDPModule)
        # Before the last micro-batch gradients accumulate unsharded on each rank (no reduce-scatter),
        # unless the recipe prefers sharded gradients to less communication.
        model.set_requires_gradient_sync(last_micro_batch or self.cfg.sync_every_micro_batch)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP averages gradients over ranks; the loss contract wants their sum.
        (loss * self.dist.world_size).backward()

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> float:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]
        # Each rank holds a shard of every gradient: the local norms combine into the global one.
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(values, self.dist.device)

    def _options(self, **kw: Any) -> StateDictOptions:
        # LoRA: only the adapter is trained, so only the adapter is saved and gathered.
        return StateDictOptions(ignore_frozen_params=adapter_only(self.recipe), **kw)

    def _state_dicts(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self._options())
        if adapter_only(self.recipe):
            # ignore_frozen_params misses a frozen weight tied to another (a tied output head is listed under
            # its second name only): drop every frozen name, or the checkpoint carries a copy of the embeddings.
            frozen = _frozen_names(model)
            model_sd = {k: v for k, v in model_sd.items() if _fqn(k) not in frozen}
        return model_sd, optim_sd

    def save_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model_sd, optim_sd = self._state_dicts(model, optimizer)
        # Sharded: each rank writes its own shards; the metadata lets any world size read them back.
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder / "dcp")
        write_meta(folder, self.dist, "fsdp2")

    def load_checkpoint(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        check_meta(folder, self.dist, "fsdp2", reshardable=True)
        if not (folder / "dcp" / ".metadata").is_file():
            raise SftError(f"checkpoint {folder} has no dcp/.metadata; it is not an fsdp2 checkpoint")
        # get_state_dict creates the optimizer state (a zero step) so there is something to load into.
        model_sd, optim_sd = self._state_dicts(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=folder / "dcp")
        # Not strict: a LoRA checkpoint holds no frozen weights; the check below still catches a mismatch.
        result = set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=self._options(strict=False),
        )
        frozen = _frozen_names(model)
        missing = [k for k in result.missing_keys if _fqn(k) not in frozen]
        if missing or result.unexpected_keys:
            raise SftError(
                f"checkpoint {folder} does not match the model (e.g. {(missing or result.unexpected_keys)[0]})"
            )

    def export(self, folder: Path, model: Any, tokenizer: Any) -> None:
        if adapter_only(self.recipe):  # the adapter is small: gathered whole onto rank 0
            state: dict[str, Any] = get_model_state_dict(
                model, options=self._options(full_state_dict=True, cpu_offload=True)
            )
            if self.dist.is_main:
                save_hf_folder(self.recipe, folder, model, state, tokenizer)
            return
        # The full model: one tensor at a time, gathered by all ranks, written by rank 0 as it arrives.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()  # a root kept gathered after the last forward holds plain tensors
        tensors = []
        seen: set[int] = set()
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) not in seen:  # a tied weight under its first name, as save_pretrained keeps it
                seen.add(id(t))
                tensors.append((_fqn(name), t.dtype, tuple(t.shape), functools.partial(self._gather, t)))
        save_streamed_hf_folder(folder, model, tensors, tokenizer, self.dist.is_main)

    def _gather(self, t: torch.Tensor) -> torch.Tensor | None:
        """The whole tensor on rank 0 (a collective for a sharded one); None on the other ranks."""
        if isinstance(t, DTensor):  # offloaded shards go to the device first
            t = t.detach().to(self.dist.device).full_tensor()  # type: ignore[attr-defined]
        return t.detach().cpu() if self.dist.is_main else None

    def unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # fully_shard changes the model in place; its forward gathers what it needs


def _prepare_4bit(model: torch.nn.Module, storage_dtype: str) -> str:
    """Check that every 4-bit layer can be sharded and gathered back whole; return the dtype to gather in."""
    from sft.model.quant import disable_cpu_repack, linear4bit_layers

    for layer in linear4bit_layers(model):
        weight, state = layer.weight, getattr(layer, "quant_state", None)
        if weight.dtype != DTYPES[storage_dtype] or weight.ndim != 2 or weight.shape[1] != 1:
            raise SftError(
                f"strategy.fsdp2: a 4-bit weight is {weight.dtype} of shape {tuple(weight.shape)}; FSDP2 shards "
                f"packed weights stored as quant.storage_dtype={storage_dtype}, shape [values, 1]"
            )
        if state is None or state is not getattr(weight, "quant_state", None):
            # bitsandbytes restores a gathered weight's state from the module: it must be the weight's own.
            raise SftError(
                "strategy.fsdp2: a 4-bit layer does not keep its weight's quantization state "
                "(Linear4bit.quant_state); this bitsandbytes version cannot be used with FSDP2"
            )
    disable_cpu_repack(model)  # the flag lives on the module and survives sharding; set it before any forward
    return storage_dtype


def _checkpointed(root: torch.nn.Module, layer: torch.nn.Module) -> torch.nn.Module:
    """Replace `layer` inside `root` by an activation-checkpointing wrapper (before sharding, so the
    recompute in the backward gathers the layer's weights again)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for parent in root.modules():
        for name, child in parent.named_children():
            if child is layer:
                wrapped = checkpoint_wrapper(layer)
                parent.register_module(name, wrapped)
                return wrapped
    raise AssertionError("layer not found in its model")


def _frozen_names(model: torch.nn.Module) -> set[str]:
    """Saved names of the frozen parameters, every name of a tied one included."""
    return {_fqn(n) for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _fqn(name: str) -> str:
    """A parameter's name as saved: without the activation-checkpointing wrapper's prefix."""
    return name.replace("_checkpoint_wrapped_module.", "")
