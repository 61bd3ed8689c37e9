"""The memory planner: the bytes one rank needs for a recipe, from the model's config alone (the model is built
on the meta device: exact parameter shapes, no weights), for every layout (one device, FSDP2, ZeRO-1/2/3,
with offload) and the recipe's method; what fits the devices, and the fastest layout that does.

Model state (`model_state`): parameters, gradients, optimizer state, fp32 master copies and the 4-bit base,
per rank, as each backend lays them out (checked against the bytes each rank's tensors hold in real 2-rank
runs: tests/test_strategies_dist.py). Activations and the loss: per token and decoder layer, from hidden size,
intermediate size, key/value width, method and precision, with coefficients measured on Hugging Face Llama
layers (docs/observability.md); the peak is checked against measured CPU peaks (tests/test_plan.py).

Imports stay light (no torch at import time). The optimizer's bytes are sft/optim_state.py's arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sft.errors import SftError
from sft.optim_state import ADAM_STEP_BYTES, optimizer_state_bytes

if TYPE_CHECKING:
    import torch

    from sft.config import ModelConfig, Recipe

GIB = 1024**3
NF4_BLOCK = 64  # QLoRA's 4-bit weights have one scale per 64 values

# Layouts, fastest first for several ranks (communication grows down the list; offload moves state to the host).
LAYOUTS = ("single", "zero1", "zero2", "fsdp2", "zero3", "fsdp2+offload", "zero2+offload", "zero3+offload")


# ---------------------------------------------------------------- what the model is made of


@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor, as the planner sees it (model.parameters() order, tied weights once)."""

    numel: int
    """Values (a 4-bit weight: its logical values)."""
    rows: int
    """Size of dim 0 of the stored tensor (FSDP2 shards along it)."""
    itemsize: float
    """Bytes per value as stored (0.5 for a packed 4-bit weight)."""
    trainable: bool
    in_layer: bool
    """Inside a decoder layer (FSDP2 shards those one by one; the rest is the root)."""
    matrix: bool = True
    """2-D or more (the optimizer's weight-decay group; DeepSpeed flattens each group)."""
    quant_state: int = 0
    """Bytes of a 4-bit weight's quantization state (block scales, code book), kept whole on every rank."""

    @property
    def bytes(self) -> float:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide activation memory and FLOPs (from the model's text config)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def model_shape(config: Any) -> ModelShape:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return ModelShape(
        hidden=c.hidden_size,
        intermediate=getattr(c, "intermediate_size", 4 * c.hidden_size),
        layers=c.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=c.vocab_size,
    )


def quantized_weight_bytes(numel: int, double_quant: bool, storage_itemsize: int = 1) -> tuple[float, int]:
    """(packed bytes, quantization-state bytes) of one 4-bit weight as bitsandbytes stores it."""
    packed = math.ceil(math.ceil(numel / 2) / storage_itemsize) * storage_itemsize
    blocks = math.ceil(numel / NF4_BLOCK)
    code = 16 * 4
    # double quant: uint8 scales, quantized in turn with float32 scales per 256, their code book and offset
    nested = blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4
    return packed, (nested if double_quant else 4 * blocks) + code


def params_of(model: torch.nn.Module, quantize: Any = None) -> list[ParamInfo]:
    """The parameters of a built (meta or real) model. With `quantize` (the recipe's QuantConfig), the frozen
    weights of linear layers inside decoder layers count as 4-bit, as bitsandbytes loads them for QLoRA."""
    import torch

    from sft.model.layers import decoder_layers

    layer_params: set[int] = set()
    linear_weights: set[int] = set()
    for module in decoder_layers(model, required=False):
        layer_params.update(id(p) for p in module.parameters())
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                linear_weights.add(id(m.weight))
    out: list[ParamInfo] = []
    storage = 1
    if quantize is not None:
        storage = {"uint8": 1, "bfloat16": 2, "float16": 2, "float32": 4}[quantize.storage_dtype]
    for p in model.parameters():  # each tied weight once
        quantized = type(p).__name__ == "Params4bit" or (
            quantize is not None and id(p) in linear_weights and not p.requires_grad
        )
        if quantized:
            state: Any = getattr(p, "quant_state", None)  # a loaded 4-bit weight; None on the meta device
            numel = math.prod(state.shape) if state is not None else p.numel()
            double = quantize.double_quant if quantize is not None else bool(state.nested)
            packed, state_bytes = quantized_weight_bytes(numel, double, storage)
            out.append(
                ParamInfo(numel, int(packed // storage), packed / numel, False, True, True, state_bytes)
            )
            continue
        out.append(
            ParamInfo(
                p.numel(),
                p.shape[0] if p.ndim else 1,
                p.element_size(),
                p.requires_grad,
                id(p) in layer_params,
                p.ndim >= 2,
            )
        )
    return out


def model_config(cfg: ModelConfig) -> tuple[Any, str]:
    """The model's config and, when it is not the model's own, where it came from.

    Read like the weights would be (the built-in model, a local folder, the hub cache, the hub); when that fails
    for a hub id sft bundles (sft/model/bundled_configs: the published architecture numbers of a few well-known
    models), that copy is used and the second value says so and why."""
    from transformers import AutoConfig

    from sft.model.builtin import resolve_model_path
    from sft.model.bundled import BUNDLED_DIR, bundled_config_dir, bundled_models

    try:
        config = AutoConfig.from_pretrained(
            resolve_model_path(cfg.name), trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
        return config, ""
    except OSError as e:
        reason = str(e).splitlines()[0]
        bundled = bundled_config_dir(cfg.name)
        if bundled is None:
            raise SftError(
                f"model: could not read the config of {cfg.name}: {reason} (sft bundles the configs of "
                f"{', '.join(bundled_models())}; or point model.name at a folder with the model's config.json)"
            ) from None
    where = bundled.relative_to(BUNDLED_DIR.parents[2])
    return AutoConfig.from_pretrained(bundled), (
        f"bundled with sft ({where}/config.json: the published architecture numbers), "
        f"as the hub's could not be read: {reason}"
    )


def meta_model(recipe: Recipe, config: Any = None) -> tuple[torch.nn.Module, Any]:
    """The recipe's model (with its LoRA adapters) built on the meta device from the config alone (`config`, or
    else `model_config`'s), and the config."""
    import torch
    from transformers import AutoModelForCausalLM

    from sft.model.load import DTYPES, add_lora

    cfg = recipe.model
    if config is None:
        config, _ = model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    if recipe.method in ("lora", "qlora"):
        if recipe.method == "qlora":
            for p in model.parameters():
                p.requires_grad_(False)
        model = add_lora(model, recipe.lora)
    return model, config


# ---------------------------------------------------------------- model state per rank


@dataclass
class StateBytes:
    """Model state of one rank, in bytes: on the device, and what offload keeps in host memory instead."""

    params: float = 0.0
    quantized: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    master: float = 0.0
    host: float = 0.0

    @property
    def total(self) -> float:
        """Device bytes (host bytes not included)."""
        return self.params + self.quantized + self.grads + self.optimizer + self.master


def _shard(numel: int, rows: int, world: int) -> int:
    """Values of one rank's FSDP2 shard: dim 0 split in ceil(rows / world) rows (the last ranks padded)."""
    return math.ceil(rows / world) * (numel // max(rows, 1))


def _zero_groups(params: Sequence[ParamInfo]) -> list[list[ParamInfo]]:
    """The optimizer's parameter groups (weight decay on matrices, none on the rest), as DeepSpeed flattens them."""
    trainable = [p for p in params if p.trainable]
    groups = [[p for p in trainable if p.matrix], [p for p in trainable if not p.matrix]]
    return [g for g in groups if g]


def _zero12_rank(group: Sequence[ParamInfo], world: int, rank: int) -> tuple[int, int]:
    """(partition values, values of the whole tensors that overlap the partition) of one rank in one group:
    ZeRO-1/2 keep gradients of whole tensors that reach into their partition."""
    total = sum(p.numel for p in group)
    align = 2 * world  # DeepSpeed pads each flat group to a multiple of 2 x world size
    part = math.ceil(total / align) * align // world
    lo, hi = rank * part, (rank + 1) * part
    at, touched = 0, 0
    for p in group:
        if at < hi and at + p.numel > lo:
            touched += p.numel
        at += p.numel
    return part, touched


def model_state(
    params: Sequence[ParamInfo],
    layout: str,
    world_size: int,
    rank: int | None = None,
    optim_name: str = "adamw",
    half_params: bool = False,
    persistence_threshold: int = 0,
) -> StateBytes:
    """Bytes of parameters, gradients, optimizer state, fp32 master weights and the 4-bit base that one rank
    holds after the backward of a step, before its optimizer step, for a layout of LAYOUTS.

    `rank=None` gives the largest rank. `half_params`: DeepSpeed with bf16 casts the module's weights to 2 bytes
    and keeps fp32 master partitions. `persistence_threshold`: ZeRO-3 keeps tensors up to this many values whole
    on every rank (DeepSpeed's stage3_param_persistence_threshold)."""
    if rank is None:
        ranks = range(world_size) if layout.startswith("zero") and world_size <= 1024 else [0]
        return max(
            (
                model_state(params, layout, world_size, r, optim_name, half_params, persistence_threshold)
                for r in ranks
            ),
            key=lambda s: s.total + s.host,
        )
    base, offload = layout.split("+")[0], layout.endswith("+offload")
    floats = [p for p in params if not p.quant_state]
    quant = [p for p in params if p.quant_state]
    trainable = [p for p in floats if p.trainable]
    s = StateBytes()
    if base == "single":
        s.params = sum(p.bytes for p in floats)
        s.quantized = sum(p.bytes + p.quant_state for p in quant)
        s.grads = sum(p.bytes for p in trainable)
        s.optimizer = optimizer_state_bytes(((p.numel, p.itemsize) for p in trainable), optim_name)
    elif base == "fsdp2":
        s.params = sum(_shard(p.numel, p.rows, world_size) * p.itemsize for p in floats)
        s.quantized = sum(
            _shard(p.rows, p.rows, world_size) * (p.bytes / p.rows) + p.quant_state for p in quant
        )
        shards = [(_shard(p.numel, p.rows, world_size), p.itemsize) for p in trainable]
        s.grads = sum(n * size for n, size in shards)
        s.optimizer = optimizer_state_bytes(shards, optim_name)
    elif base in ("zero1", "zero2"):
        size = 2 if half_params else None
        s.params = sum(p.numel * (size or p.itemsize) for p in floats)
        for group in _zero_groups(params):
            part, touched = _zero12_rank(group, world_size, rank)
            s.master += 4 * part
            s.optimizer += 8 * part + ADAM_STEP_BYTES
            s.grads += touched * (size or group[0].itemsize)
    elif base == "zero3":
        size = 2 if half_params else None
        for p in floats:
            itemsize = size or p.itemsize
            s.params += math.ceil(p.numel / world_size) * itemsize
            if p.numel <= persistence_threshold:
                s.params += p.numel * itemsize
            if p.trainable:
                s.master += 4 * math.ceil(p.numel / world_size)
                s.grads += math.ceil(p.numel / world_size) * itemsize
        s.optimizer = 2 * s.master + ADAM_STEP_BYTES * len(_zero_groups(params))
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if offload:  # FSDP2 cpu_offload: shards on the host; ZeRO offload: optimizer (and ZeRO-3 parameters)
        moved = ["grads", "optimizer", "master"] + (
            ["params", "quantized"] if base in ("fsdp2", "zero3") else []
        )
        for key in moved:
            s.host += getattr(s, key)
            setattr(s, key, 0.0)
    return s


# ---------------------------------------------------------------- activations, loss, temporaries


def activation_bytes(
    shape: ModelShape, tokens: int, method: str, lora_dropout: float, precision: str, checkpointing: bool
) -> tuple[float, float]:
    """(bytes kept for the backward, extra bytes of the largest transient) of one micro-batch's forward.

    Floats kept per token and decoder layer, measured on Hugging Face Llama layers in fp32 (sdpa):
    full fine-tuning 7.75 h + 2 kv + 4 i; LoRA/QLoRA 4.25 h + 2 kv + 4 i (frozen linear layers keep no input),
    plus 8.5 h + i with LoRA dropout (each adapter keeps its own dropped-out input and mask); 3.5 h per token
    outside the layers. bf16 autocast keeps 0.65 of that (norms and the residual stream stay fp32).
    Activation checkpointing keeps each layer's input (h) and recomputes one layer at a time in the backward."""
    h, kv, i = shape.hidden, shape.kv_width, shape.intermediate
    if method == "full":
        per_layer = 7.75 * h + 2 * kv + 4 * i
    else:
        per_layer = 4.25 * h + 2 * kv + 4 * i + ((8.5 * h + i) if lora_dropout > 0 else 0.0)
    outside = 3.5 * h
    scale = 0.65 if precision == "bf16" else 1.0
    one_layer = 4 * scale * per_layer * tokens
    if checkpointing:
        return 4 * (h * shape.layers + outside) * tokens, one_layer
    return 4 * scale * (per_layer * shape.layers + outside) * tokens, 0.0


def autocast_copies(
    float_matmul_values: int, layer_matmul_values: int, layers: int, checkpointing: bool
) -> float:
    """bf16 autocast over fp32 weights casts each matmul weight to bf16 and keeps the copy for the backward
    (with checkpointing: the layers' copies only for the layer being recomputed)."""
    if checkpointing:
        return 2.0 * (float_matmul_values - layer_matmul_values + layer_matmul_values / max(layers, 1))
    return 2.0 * float_matmul_values


def loss_bytes(shape: ModelShape, tokens: int, precision: str, impl: str, head_trains: bool) -> float:
    """Bytes the loss adds at its peak, all tokens trained (the worst case). `full` keeps the logits, their
    shifted copy and the log-softmax (fp32; the logits in bf16 under autocast). `chunked` (sft/loss.py) holds
    two chunks of fp32 logits, the trained positions' hidden states and their gradient, and the output head's
    weight gradient when the head trains (computed in the forward)."""
    from sft.loss import LOGITS_CHUNK_BYTES

    logits = 4.0 * tokens * shape.vocab
    if impl == "chunked":
        head = 4.0 * shape.vocab * shape.hidden if head_trains else 0.0
        return 2 * min(LOGITS_CHUNK_BYTES, logits) + 2 * 4.0 * tokens * shape.hidden + head
    return 2.5 * logits if precision == "bf16" else 3.0 * logits


def temporary_bytes(
    params: Sequence[ParamInfo], layout: str, world_size: int, recipe: Recipe, shape: ModelShape
) -> tuple[float, str]:
    """The layout's working buffers at the forward's peak, and what they are."""
    base = layout.split("+")[0]
    gathered = 2 if recipe.train.precision == "bf16" and recipe.strategy.fsdp.param_dtype != "float32" else 4
    layer_values = sum(p.numel for p in params if p.in_layer) // max(shape.layers, 1)
    quant = [p for p in params if p.quant_state]
    dequant = max((p.numel for p in quant), default=0) * 4  # one 4-bit weight dequantized for its matmul
    if base == "fsdp2" and world_size > 1:
        root = sum(p.numel for p in params if not p.in_layer)
        out = gathered * (root + 2 * layer_values)  # the root stays gathered; a layer and the prefetched next
        what = "gathered root and two layers"
        if recipe.train.grad_accum > 1 and not recipe.strategy.fsdp.sync_every_micro_batch:
            out += 4 * sum(p.numel for p in params if p.trainable)
            what += ", unsharded gradients between micro-batches"
        return out + dequant, what
    if base == "zero3" and world_size > 1:
        root = max((p.numel for p in params if not p.in_layer), default=0)
        bucket = 0.9 * shape.hidden**2
        return gathered * (max(root, 2 * layer_values) + bucket), "gathered layers and prefetch bucket"
    if base in ("zero1", "zero2") and world_size > 1:
        bucket = 4.0 * shape.hidden**2 * (2 if base == "zero2" else 1)
        return bucket, "gradient reduce bucket"
    return float(dequant), "dequantized 4-bit weight" if dequant else ""


# ---------------------------------------------------------------- the plan of a recipe


@dataclass
class Row:
    layout: str
    state: StateBytes | None = None
    activations: float = 0.0
    loss: float = 0.0
    temporary: float = 0.0
    temporary_what: str = ""
    peak: float = 0.0
    fits: bool | None = None
    note: str = ""
    """Why this layout cannot run the recipe (then `state` is None)."""


@dataclass
class Plan:
    recipe: Recipe
    world_size: int
    device: str
    """What 'memory' means: a GPU's name, or this host's RAM."""
    device_bytes: float | None
    shape: ModelShape
    params_total: int
    params_trainable: int
    tokens: int
    rows: list[Row] = field(default_factory=list)
    recipe_layout: str = ""
    config_source: str = ""
    """Where the model's config came from when it is not the model's own (the bundled copy), else empty."""

    def row(self, layout: str) -> Row:
        return next(r for r in self.rows if r.layout == layout)

    def recommended(self) -> Row | None:
        """The fastest layout that fits (LAYOUTS order), or None."""
        usable = [r for r in self.rows if r.state is not None and r.fits]
        return min(usable, key=lambda r: LAYOUTS.index(r.layout)) if usable else None


def layout_of(recipe: Recipe) -> str:
    s = recipe.strategy
    if s.name == "single":
        return "single"
    if s.name == "fsdp2":
        return "fsdp2+offload" if s.fsdp.cpu_offload else "fsdp2"
    ds = s.deepspeed
    return f"zero{ds.zero_stage}" + ("+offload" if ds.offload_optimizer or ds.offload_params else "")


def recipe_with_layout(recipe: Recipe, layout: str) -> Recipe:
    """The recipe run with another layout (ValueError naming why it cannot be)."""
    from pydantic import ValidationError

    from sft.config import Recipe

    raw = recipe.model_dump(mode="json")
    base, offload = layout.split("+")[0], layout.endswith("+offload")
    s = raw["strategy"]
    if base == "single":
        s["name"] = "single"
    elif base == "fsdp2":
        s["name"] = "fsdp2"
        s["fsdp"]["cpu_offload"] = offload
        if recipe.method == "qlora":  # FSDP2 shards float storage only (the recipe check asks for this)
            raw["quant"]["storage_dtype"] = recipe.model.dtype
    else:
        s["name"] = "deepspeed"
        ds = s["deepspeed"]
        ds.update(
            zero_stage=int(base[-1]), offload_optimizer=offload, offload_params=offload and base == "zero3"
        )
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise ValueError(str(e.errors()[0]["msg"]).removeprefix("Value error, ")) from None


def make_plan(
    recipe: Recipe,
    world_size: int,
    device: str,
    device_bytes: float | None,
    layouts: Sequence[str] = LAYOUTS,
) -> Plan:
    """Bytes per rank of the recipe under each layout (the recipe's own first), from the meta-device model."""
    config, config_source = model_config(recipe.model)
    model, _ = meta_model(recipe, config)
    quant = recipe.quant if recipe.method == "qlora" else None
    params = params_of(model, quant)
    shape = model_shape(config)
    matmul_values = _matmul_values(model, quant is not None)
    tokens = recipe.train.micro_batch_size * recipe.data.max_seq_len
    plan = Plan(
        recipe=recipe,
        world_size=world_size,
        device=device,
        device_bytes=device_bytes,
        shape=shape,
        params_total=sum(p.numel for p in params),
        params_trainable=sum(p.numel for p in params if p.trainable),
        tokens=tokens,
        recipe_layout=layout_of(recipe),
        config_source=config_source,
    )
    order = [plan.recipe_layout, *[x for x in layouts if x != plan.recipe_layout]]
    for layout in order:
        if layout == "single" and world_size > 1:
            plan.rows.append(Row(layout, note=f"one process, not {world_size}"))
            continue
        try:
            r = recipe if layout == plan.recipe_layout else recipe_with_layout(recipe, layout)
        except ValueError as e:
            plan.rows.append(Row(layout, note=str(e)))
            continue
        plan.rows.append(_row(r, layout, params, shape, world_size, tokens, matmul_values, device_bytes))
    return plan


def _row(
    recipe: Recipe,
    layout: str,
    params: Sequence[ParamInfo],
    shape: ModelShape,
    world_size: int,
    tokens: int,
    matmul_values: tuple[int, int],
    device_bytes: float | None,
) -> Row:
    t = recipe.train
    half = recipe.strategy.name == "deepspeed" and t.precision == "bf16"
    from sft.ds_config import persistence_threshold

    state = model_state(
        params, layout, world_size, None, recipe.optim.name, half, persistence_threshold(shape.hidden)
    )
    checkpointing = recipe.model.gradient_checkpointing or recipe.strategy.fsdp.activation_checkpointing
    saved, transient = activation_bytes(
        shape, tokens, recipe.method, recipe.lora.dropout, t.precision, checkpointing
    )
    # Weights kept in fp32 and cast per matmul by autocast: one device (FSDP2 and DeepSpeed gather or hold
    # bf16 weights already, unless FSDP2 is told to gather fp32).
    fp32_weights = layout == "single" or (
        layout.startswith("fsdp2") and recipe.strategy.fsdp.param_dtype == "float32"
    )
    if t.precision == "bf16" and fp32_weights and recipe.model.dtype == "float32":
        saved += autocast_copies(*matmul_values, shape.layers, checkpointing)
    head_trains = recipe.method == "full" or "lm_head" in recipe.lora.modules_to_save
    loss = loss_bytes(shape, tokens, t.precision, t.loss_impl, head_trains)
    temp, what = temporary_bytes(params, layout, world_size, recipe, shape)
    grads_in_forward = state.grads if t.grad_accum > 1 else 0.0
    forward = state.total - state.grads + grads_in_forward + saved + transient + loss + temp
    backward = state.total + temp + saved / max(shape.layers, 1)
    peak = max(forward, backward)
    fits = None if device_bytes is None else peak <= device_bytes
    return Row(layout, state, saved + transient, loss, temp, what, peak, fits)


def _matmul_values(model: torch.nn.Module, quantized_layers: bool) -> tuple[int, int]:
    """(values of every float linear weight, of those inside decoder layers): the output head counts even when
    tied to the embeddings; with `quantized_layers` (QLoRA) the layers' frozen 4-bit weights do not."""
    import torch

    from sft.model.layers import decoder_layers

    in_layers = {id(m) for layer in decoder_layers(model, required=False) for m in layer.modules()}
    total = layer = 0
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        inside = id(m) in in_layers
        if quantized_layers and inside and not m.weight.requires_grad:
            continue
        total += m.weight.numel()
        layer += m.weight.numel() if inside else 0
    return total, layer


# ---------------------------------------------------------------- devices, the table, the check before a run


def local_devices(device_choice: str = "auto", local_ranks: int | None = None) -> tuple[str, float]:
    """(what, bytes per rank) of this machine: a GPU's memory, or on a machine without one the host RAM now
    available, shared by the ranks started here (`local_ranks`, default torchrun's LOCAL_WORLD_SIZE)."""
    import os

    import torch

    if device_choice != "cpu" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0)))
        return props.name, float(props.total_memory)
    import psutil

    local = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    available = psutil.virtual_memory().available
    where = "host RAM available" + (f" / {local} ranks" if local > 1 else "")
    return where, available / local


def gib(n: float, unit: int = GIB) -> str:
    return f"{n / unit:.2f}"


def format_plan(plan: Plan) -> str:
    r = plan.recipe
    s = plan.shape
    unit, unit_name = (GIB, "GiB") if max((x.peak for x in plan.rows), default=0) >= GIB else (2**20, "MiB")
    lines = [
        f"plan for {r.model.name}: {plan.params_total / 1e6:,.1f}M parameters, "
        f"{plan.params_trainable / 1e6:,.2f}M trained ({r.method}); {s.layers} layers, hidden {s.hidden}, "
        f"vocabulary {s.vocab}",
        f"  {plan.world_size} rank(s); micro-batch {r.train.micro_batch_size} x {r.data.max_seq_len} tokens; "
        f"precision {r.train.precision}; loss {r.train.loss_impl}; activation checkpointing "
        f"{'on' if r.model.gradient_checkpointing or r.strategy.fsdp.activation_checkpointing else 'off'}",
        f"  memory per rank: {plan.device}"
        + (f", {gib(plan.device_bytes)} GiB" if plan.device_bytes is not None else ""),
        *([f"  model config: {plan.config_source}"] if plan.config_source else []),
        "",
        f"{unit_name} per rank   | params | 4-bit | grads | optim | master | activ. | loss  | temp  | peak   | host  | fits",
        "---------------|--------|-------|-------|-------|--------|--------|-------|-------|--------|-------|-----",
    ]
    for row in plan.rows:
        name = row.layout + (" *" if row.layout == plan.recipe_layout else "")
        if row.state is None:
            lines.append(f"{name:<14} | cannot run this recipe: {row.note}")
            continue
        st = row.state
        fits = "?" if row.fits is None else ("yes" if row.fits else "NO")
        cells = [st.params, st.quantized, st.grads, st.optimizer, st.master, row.activations, row.loss]
        cells += [row.temporary, row.peak, st.host]
        widths = [6, 5, 5, 5, 6, 6, 5, 5, 6, 5]
        numbers = " | ".join(f"{gib(c, unit):>{w}}" for c, w in zip(cells, widths, strict=True))
        lines.append(f"{name:<14} | {numbers} | {fits}")
    lines += ["", "* the recipe's layout; temp: " + _temp_legend(plan), "", advice(plan)]
    return "\n".join(lines)


def _temp_legend(plan: Plan) -> str:
    seen = {r.temporary_what for r in plan.rows if r.temporary_what}
    return "; ".join(sorted(seen)) or "none"


def advice(plan: Plan) -> str:
    """The recommendation, and why."""
    own = plan.row(plan.recipe_layout)
    best = plan.recommended()
    if plan.device_bytes is None:
        return "no device memory given (--gpu, --gpu-memory): nothing marked as fitting"
    if best is None:
        text = (
            "nothing fits: turn on model.gradient_checkpointing, lower train.micro_batch_size or data.max_seq_len, "
            "use more ranks, or method=qlora"
        )
    else:
        faster = [
            r
            for r in plan.rows
            if r.state is not None and LAYOUTS.index(r.layout) < LAYOUTS.index(best.layout)
        ]
        text = (
            f"recommended: {best.layout}, the fastest layout that fits "
            f"({gib(best.peak)} of {gib(plan.device_bytes)} GiB)"
        )
        if faster:
            text += "; faster ones do not: " + "; ".join(
                f"{r.layout} needs {gib(r.peak)} GiB" for r in faster
            )
    if own.state is None:
        text += f"\nthe recipe's {own.layout} cannot run here: {own.note}"
    elif best is not None and own.layout != best.layout:
        text += (
            f"\nthe recipe's {own.layout} "
            + ("fits too" if own.fits else "does not fit")
            + f" ({gib(own.peak)} GiB)"
        )
    return text


def check_fits(recipe: Recipe, world_size: int, local_ranks: int | None = None) -> None:
    """Before any weight is loaded: refuse a recipe whose planned peak exceeds this machine's memory per rank
    (`--force` skips this). One SftError line that says what is needed, what there is, and what would fit."""
    device, device_bytes = local_devices(recipe.train.device, local_ranks)
    plan = make_plan(recipe, world_size, device, device_bytes)
    own = plan.row(plan.recipe_layout)
    if own.fits is not False or own.state is None:  # a layout that cannot run at all fails on its own
        return
    best = plan.recommended()
    hint = f"strategy {best.layout} fits ({gib(best.peak)} GiB)" if best else advice(plan).split(": ", 1)[1]
    raise SftError(
        f"plan: {plan.recipe_layout} needs {gib(own.peak)} GiB per rank (model state {gib(own.state.total if own.state else 0)}, "
        f"activations {gib(own.activations)}, loss {gib(own.loss)}) but {device} is {gib(device_bytes)} GiB; "
        f"{hint}; see `sft plan`, or add --force to try anyway"
    )


def parse_bytes(text: str) -> float:
    """'80GiB', '24GB', '512MiB' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|MiB|MB|TiB|TB)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise SftError(f"--gpu-memory {text!r}: use a size such as 80GiB, 24GB or 512MiB")
    scale = {"gib": GIB, "gb": 1e9, "mib": 2**20, "mb": 1e6, "tib": 1024 * GIB, "tb": 1e12}
    return float(m.group(1)) * scale[m.group(2).lower()]


def device_from_args(
    gpu: str | None, gpu_memory: str | None, device_choice: str, gpus: int | None
) -> tuple[str, float | None]:
    """`sft plan`'s device: --gpu NAME, --gpu-memory SIZE, or this machine's (its GPU, or host RAM)."""
    from sft.gpus import GPUS, gpu_by_key

    if gpu is not None:
        found = gpu_by_key(gpu)
        if found is None:
            raise SftError(
                f"--gpu {gpu}: unknown; known: {', '.join(g.key for g in GPUS)} (or give --gpu-memory)"
            )
        return found.name, float(found.memory_bytes)
    if gpu_memory is not None:
        return "a GPU", parse_bytes(gpu_memory)
    return local_devices(device_choice, gpus)
