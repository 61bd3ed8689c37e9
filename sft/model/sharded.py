"""Models bigger than one device: build the model without its weights, then give each rank only its share.

FSDP2: every rank builds the model on the meta device (LoRA adapters included), `fully_shard` splits it, and
`fill_shards` allocates each rank's shards and fills them from the checkpoint's safetensors files, each rank
reading only the bytes of its own rows into a buffer of its own. No rank ever holds the whole model.
(torch.distributed.checkpoint's Hugging Face reader does the same reads through `safe_open`, which maps the whole
file: every page a rank touches stays in its resident memory until the file is closed, its share twice over.)

- LoRA adapters: peft initializes them on the CPU before moving them next to their (meta) base layer; their
  values are captured as they are registered, so they are exactly what peft gives on a loaded model.
- Buffers (rotary `inv_freq`) are computed at construction (only parameters are on meta) and put back after
  the shards are allocated; tied weights stay one parameter.
- QLoRA: each rank quantizes its own rows of every 4-bit weight (a packed [values, 1] weight sharded on dim 0
  is a contiguous range of the flattened values). Blocks are independent, so a rank reads the rows of whole
  blocks around its range; the small block scales are all-gathered so every rank holds the whole quantization
  state, equal to bitsandbytes' quantization of the whole weight.

ZeRO-3: `partitioned_model` constructs the model inside `deepspeed.zero.Init` (each parameter is partitioned as
soon as its module exists), then every rank reads its own partition of each tensor from the checkpoint.

Tensors are read with sft's streaming safetensors reader (`sft.safetensors_io.Checkpoint`: headers checked, each read
into its own buffer, no memory map).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sft.config import ModelConfig, Recipe
from sft.errors import SftError
from sft.model.load import (
    lora_model,
    model_kwargs,
    prepare_for_training,
    resolve_model_path,
    train_in_float32,
)

SOURCE_ATTR = "sft_weight_source"  # set on an empty model: where `fill_shards` finds its weights
# Wrappers that put a parameter under another name than the checkpoint's (peft's LoRA and modules_to_save
# wrappers, the activation-checkpointing wrapper).
WRAPPERS = (".base_layer", "._checkpoint_wrapped_module", ".original_module", ".modules_to_save.default")


@dataclass
class WeightSource:
    folder: Path
    """The local folder of the checkpoint's safetensors files."""
    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    """Parameters the checkpoint does not hold (LoRA adapters), by name, as peft initialized them."""


# ---------------------------------------------------------------- the checkpoint on disk


def checkpoint_folder(cfg: ModelConfig) -> Path:
    """A local folder with the model's config and safetensors: the built-in model, a local folder, or the hub
    snapshot (downloaded once into the Hugging Face cache, like from_pretrained does)."""
    path = resolve_model_path(cfg.name)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    return Path(snapshot_download(path, revision=cfg.revision, allow_patterns=patterns))


def open_checkpoint(folder: Path) -> Any:
    """The folder's safetensors weights (`model.safetensors` or the shards of the index), headers checked."""
    from sft.safetensors_io import Checkpoint

    return Checkpoint(folder)


def checkpoint_key(name: str) -> str:
    """The checkpoint's name of a model parameter, whatever wraps it (peft, activation checkpointing)."""
    name = name.removeprefix("base_model.model.")
    for wrapper in WRAPPERS:
        name = name.replace(wrapper, "")
    return name


def _check_present(keys: list[str], checkpoint: Any, folder: Path) -> None:
    missing = [k for k in keys if k not in checkpoint.tensors]
    if missing:
        raise SftError(
            f"model: {folder} has no tensor '{missing[0]}' ({len(missing)} missing): its checkpoint names weights "
            "differently from the transformers model; sharded loading reads tensors by name, so load the model "
            "once with transformers and save_pretrained it to rename them"
        )


# ---------------------------------------------------------------- FSDP2: empty model, then each rank's shards


def empty_model(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    """The recipe's trainable model with every parameter on the meta device (no memory), ready for
    `fully_shard`; `fill_shards` gives it its values afterwards."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = recipe.model
    folder = checkpoint_folder(cfg)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    # Parameters on meta, buffers computed for real; building draws no random numbers a loaded model would not.
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        model: Any = AutoModelForCausalLM.from_config(config, **model_kwargs(cfg, device.type))
    model.tie_weights()  # tying is lost when parameters are moved to meta one by one
    quant = recipe.quant if recipe.method == "qlora" else None
    if quant is not None:
        _plan_4bit_layers(model, quant)
    prepare_for_training(model, cfg, quant)
    source = WeightSource(folder)
    if recipe.method in ("lora", "qlora"):
        model, source.initial = _with_initial_values(lambda: lora_model(model, recipe.lora))
        train_in_float32(model)
    setattr(model, SOURCE_ATTR, source)
    return model


def _with_initial_values(
    build: Callable[[], torch.nn.Module],
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Run `build` (peft adding adapters to a meta model) and keep the values its new parameters had on the
    CPU before they were moved to meta, in the dtype they were moved to."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    created: dict[tuple[int, str], torch.Tensor] = {}

    def remember(module: torch.nn.Module, name: str, param: torch.Tensor | None) -> None:
        if param is not None and not param.is_meta:
            created[(id(module), name)] = param

    handle = register_module_parameter_registration_hook(remember)
    try:
        model = build()
    finally:
        handle.remove()
    initial: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            value = created.get((id(module), name))
            if param.is_meta and value is not None:
                initial[f"{module_name}.{name}"] = value.detach().to(param.dtype)
    return model, initial


def fill_shards(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate this rank's shards of an empty model that `fully_shard` split, and fill them: weights from the
    checkpoint (this rank's rows only), adapters as peft initialized them, 4-bit weights quantized by rows."""
    source: WeightSource = getattr(model, SOURCE_ATTR)
    # to_empty re-allocates buffers too: keep the real ones (and where FSDP put them) to put back.
    buffers = [
        (module, name, buf)
        for module in model.modules()
        for name, buf in module.named_buffers(recurse=False)
        if buf is not None
    ]
    model.to_empty(device=device)
    for module, name, buf in buffers:
        module._buffers[name] = buf

    checkpoint = open_checkpoint(source.folder)
    quantized = _quantized_layers(model)
    packed = {id(layer.weight) for layer in quantized.values()}
    from_checkpoint: dict[str, torch.Tensor] = {}
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, the loaded one it starts as)
    dora: list[tuple[torch.Tensor, torch.Tensor]] = []  # (magnitude, its base weight)
    with torch.no_grad():
        for wrapped_name, param in model.named_parameters():
            name = wrapped_name.replace("_checkpoint_wrapped_module.", "")
            if name in source.initial:
                _copy_local(param, source.initial[name])
            elif ".modules_to_save.default." in name:  # peft's trainable copy of a (maybe tied) weight
                original = wrapped_name.replace(".modules_to_save.default.", ".original_module.")
                copies.append((param, model.get_parameter(original)))
            elif ".lora_magnitude_vector." in name:
                dora.append((param, _dora_base_weight(model, wrapped_name)))
            elif id(param) not in packed:
                from_checkpoint[checkpoint_key(name)] = param
        _check_present([*from_checkpoint, *quantized], checkpoint, source.folder)
        for key, weight in from_checkpoint.items():
            local, first = _local(weight), _first_row(weight)
            rows = local.shape[0] if local.ndim else 1
            local.copy_(checkpoint.read_rows(key, first, first + rows).view_as(local))
        for copy, loaded in copies:
            _local(copy).copy_(_local(loaded))
        for magnitude, weight in dora:
            # peft's row norms of W + scaling * B @ A, with B = 0 at first; FSDP2 shards both by rows alike.
            w = _local(weight)
            _local(magnitude).copy_(torch.linalg.norm(w, dim=1).to(w.dtype))
        for key, layer in quantized.items():
            _quantize_rows(layer, checkpoint, key, device)
    checkpoint.close()


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _first_row(param: torch.Tensor) -> int:
    """The first row this rank holds of a parameter FSDP2 sharded on dim 0 (as torch.chunk splits it)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor) or param.ndim == 0:
        return 0
    if tuple(param.placements) != (Shard(0),):
        raise AssertionError(f"expected a parameter sharded on dim 0, got {param.placements}")
    span = math.ceil(param.shape[0] / param.device_mesh.size())
    return min(param.device_mesh.get_local_rank() * span, param.shape[0])


def _copy_local(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's shard of `full` (the whole value, on every rank) into a sharded parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):  # src_data_rank=None: each rank slices its own part, no communication
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
    _local(param).copy_(full)


def _dora_base_weight(model: torch.nn.Module, magnitude_name: str) -> torch.Tensor:
    layer: Any = model.get_submodule(magnitude_name.split(".lora_magnitude_vector.")[0])
    weight: torch.Tensor = layer.get_base_layer().weight
    return weight


# ---------------------------------------------------------------- QLoRA: 4-bit weights quantized by rows


def _plan_4bit_layers(model: Any, quant: Any) -> None:
    """Replace the linear layers transformers would quantize by bitsandbytes 4-bit layers whose packed weight
    ([values, 1], storage dtype) and quantization state are meta tensors of the final shapes."""
    import bitsandbytes as bnb
    from transformers.quantizers import AutoHfQuantizer

    from sft.model.quant import bnb_config

    quantizer = AutoHfQuantizer.from_config(bnb_config(quant), pre_quantized=False)
    # The same layers (and the same skipped ones, like the output head) as from_pretrained quantizes.
    quantizer.preprocess_model(model, device_map=None)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    dtype = model.dtype
    layer: Any
    for layer in model.modules():
        if not isinstance(layer, bnb.nn.Linear4bit):
            continue
        old: Any = layer.weight
        source_cls: Any = layer.source_cls
        if source_cls is not torch.nn.Linear:
            raise SftError(
                f"method=qlora under fsdp2: {source_cls.__name__} layers cannot be quantized by rows"
            )
        values = layer.out_features * layer.in_features
        per_element = 2 * torch.empty((), dtype=old.quant_storage).element_size()  # 4-bit values per element
        if values % per_element:
            raise SftError(
                f"method=qlora under fsdp2: a {layer.out_features}x{layer.in_features} weight does not "
                f"fill whole {old.quant_storage} elements; use another quant.storage_dtype"
            )
        state = _planned_quant_state(layer, old, dtype)
        layer.weight = bnb.nn.Params4bit(
            torch.empty((values // per_element, 1), dtype=old.quant_storage, device="meta"),
            requires_grad=False,
            quant_state=state,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=layer,
            bnb_quantized=True,
        )
        layer.quant_state = state


def _planned_quant_state(layer: Any, weight: Any, dtype: torch.dtype) -> Any:
    """A QuantState of meta tensors shaped as bitsandbytes will make them (the memory report reads it)."""
    from bitsandbytes.functional import QuantState

    meta = torch.device("meta")
    blocks = math.ceil(layer.out_features * layer.in_features / weight.blocksize)
    nested = None
    if weight.compress_statistics:  # double quant: the block scales quantized in blocks of 256
        nested = QuantState(
            absmax=torch.empty(math.ceil(blocks / 256), device=meta),
            code=torch.empty(256, device=meta),
            blocksize=256,
            dtype=torch.float32,
        )
    return QuantState(
        absmax=torch.empty(blocks, dtype=torch.uint8 if nested else torch.float32, device=meta),
        shape=torch.Size([layer.out_features, layer.in_features]),
        dtype=dtype,
        blocksize=weight.blocksize,
        code=torch.empty(16, device=meta),
        quant_type=weight.quant_type,
        offset=torch.empty((), device=meta) if nested else None,
        state2=nested,
    )


def _quantized_layers(model: torch.nn.Module) -> dict[str, Any]:
    """Checkpoint name of the weight -> its 4-bit layer."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return {}
    return {
        checkpoint_key(name.replace("_checkpoint_wrapped_module.", "")) + ".weight": m
        for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def _quantize_rows(layer: Any, checkpoint: Any, key: str, device: torch.device) -> None:
    """Fill this rank's shard of a packed 4-bit weight and give the layer the whole quantization state."""
    from bitsandbytes.functional import QuantState, get_4bit_type, quantize_blockwise

    planned = layer.quant_state
    local = _local(layer.weight)
    world, rank = dist.get_world_size(), dist.get_rank()
    ranges = [shard_values(layer.weight.shape[0], 2 * local.element_size(), r, world) for r in range(world)]
    packed, mine = quantize_values(checkpoint, key, *ranges[rank], planned, device)
    local.copy_(packed.view(local.dtype).view(-1, 1))
    absmax = _gather_varlen(mine, [owned_blocks(a, b, planned.blocksize)[1] for a, b in ranges])
    # As bitsandbytes' quantize_4bit finishes a whole weight (double quant: the scales minus their mean).
    code = get_4bit_type(planned.quant_type, device=absmax.device)
    extra: dict[str, Any] = {}
    if planned.nested:
        offset = absmax.mean()
        absmax, state2 = quantize_blockwise(absmax - offset, blocksize=planned.state2.blocksize)
        extra = {"offset": offset, "state2": state2}
    layer.quant_state = QuantState(
        absmax=absmax,
        shape=planned.shape,
        dtype=planned.dtype,
        blocksize=planned.blocksize,
        code=code,
        quant_type=planned.quant_type,
        **extra,
    )


def shard_values(rows: int, per_element: int, rank: int, world: int) -> tuple[int, int]:
    """The values [a, b) of the flattened weight that rank `rank` holds of a packed [rows, 1] weight (FSDP2
    shards dim 0 as torch.chunk does; each stored element packs `per_element` 4-bit values)."""
    span = math.ceil(rows / world)
    first = min(rank * span, rows)
    return first * per_element, min(first + span, rows) * per_element


def owned_blocks(a: int, b: int, block: int) -> tuple[int, int]:
    """(first, count) of the blocks starting in values [a, b): each block belongs to exactly one rank."""
    first = math.ceil(a / block)
    return first, math.ceil(b / block) - first


def quantize_values(
    checkpoint: Any, key: str, a: int, b: int, planned: Any, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed bytes of values [a, b) of the weight `key`, and the block scales of the blocks starting there,
    as bitsandbytes computes them for the whole weight: the rows of whole blocks around [a, b) are read and
    quantized (blocks are independent), then cut to the range."""
    import bitsandbytes as bnb

    block = planned.blocksize
    first, count = owned_blocks(a, b, block)
    if b <= a:
        return torch.empty(0, dtype=torch.uint8, device=device), torch.empty(0, device=device)
    lo, hi = a // block * block, min(math.ceil(b / block) * block, math.prod(planned.shape))
    width = planned.shape[1]
    rows = checkpoint.read_rows(key, lo // width, math.ceil(hi / width))
    first_value = lo // width * width
    values = rows.reshape(-1)[lo - first_value : hi - first_value].to(device=device, dtype=planned.dtype)
    packed, state = bnb.functional.quantize_4bit(
        values, blocksize=block, quant_type=planned.quant_type, quant_storage=torch.uint8
    )
    skip = first - lo // block
    return packed.view(-1)[(a - lo) // 2 : (b - lo) // 2], state.absmax[skip : skip + count]


def _gather_varlen(mine: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's 1-D piece (rank r's has counts[r] elements) on every rank."""
    padded = torch.zeros(max(counts), dtype=mine.dtype, device=mine.device)
    padded[: mine.numel()] = mine
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


# ---------------------------------------------------------------- DeepSpeed ZeRO-3: constructed partitioned


def partitioned_model(cfg: ModelConfig, ds_config: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The base model constructed inside `deepspeed.zero.Init` (each rank keeps only its partition of every
    parameter), then filled: every rank reads its own partitions from the checkpoint."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    folder = checkpoint_folder(cfg)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # zero.Init partitions over this group
    # No random init (the checkpoint overwrites it); the rotary buffers keep their dtype under zero.Init.
    with (
        torch.random.fork_rng(devices=[]),
        no_init_weights(),
        prevent_arange_dtype_change(),
        deepspeed.zero.Init(config_dict_or_path=ds_config),
    ):
        model: Any = AutoModelForCausalLM.from_config(config, **model_kwargs(cfg, device.type))
    model.tie_weights()  # as transformers does after building under zero.Init
    _fill_partitions(model, folder)
    prepare_for_training(model, cfg, None)
    return model


def _fill_partitions(model: torch.nn.Module, folder: Path) -> None:
    """Every rank reads its own partition of each parameter straight from the checkpoint: no gather, no
    collective, no tensor whole on any rank. DeepSpeed keeps rank r's partition of a parameter as elements
    [r * n, (r + 1) * n) of the flattened tensor, n = ceil(numel / ranks), the last one padded."""
    checkpoint = open_checkpoint(folder)
    names = {id(p): n for n, p in model.named_parameters()}  # a tied weight under its first name
    _check_present([checkpoint_key(n) for n in names.values()], checkpoint, folder)
    param: Any  # DeepSpeed's parameters carry ds_shape, ds_numel and their partition, ds_tensor
    for param in {id(p): p for p in model.parameters()}.values():
        key = checkpoint_key(names[id(param)])
        stored = checkpoint.tensors[key].shape
        if tuple(stored) != tuple(param.ds_shape):
            raise SftError(
                f"model: {folder}: tensor '{key}' has shape {list(stored)}, the model's config makes it "
                f"{list(param.ds_shape)}; the folder's config.json and weights do not belong together"
            )
        share = param.ds_tensor
        group = getattr(param, "ds_process_group", None)
        start = share.ds_numel * dist.get_rank(group)
        stop = min(start + share.ds_numel, param.ds_numel)
        with torch.no_grad():
            share.zero_()  # the padding of the last partition
            if stop > start:
                share[: stop - start].copy_(checkpoint.read_flat(key, start, stop))
    checkpoint.close()
