"""QLoRA's frozen 4-bit base (bitsandbytes): settings, preparation for training, eval safety, memory report.

The recipe's `quant` section becomes a transformers `BitsAndBytesConfig`; `load_model` loads the base with it
straight onto the device, and `prepare_for_kbit_training` freezes it and keeps evaluation from corrupting
training. Everything here reads the loaded tensors: the quantization record (which sft/export.py writes
into the adapter record) and the memory report describe the model as it is, not as the recipe asked for it.

No `sft.config` import at run time (it needs pydantic): bench/gpu/bench_qlora.py uses this module on a machine
that has only torch, transformers, peft and bitsandbytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from sft.optim_state import BNB_MIN_8BIT_SIZE, optimizer_state_bytes

if TYPE_CHECKING:
    from sft.config import QuantConfig


def bnb_config(quant: QuantConfig) -> Any:
    """The transformers `BitsAndBytesConfig` for loading a base in 4-bit as the recipe asks."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, quant.storage_dtype),
    )


def linear4bit_layers(model: torch.nn.Module) -> list[Any]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def prepare_for_kbit_training(model: torch.nn.Module) -> None:
    """Freeze the base and make evaluation safe; the adapters added next are the only trainable weights.

    Unlike peft's prepare_model_for_kbit_training this does not upcast the non-quantized weights (embeddings,
    norms, output head) to float32: model.dtype decides their dtype, which on an 8B model with a 128k vocabulary
    saves ~2 GiB. Gradient checkpointing is model.gradient_checkpointing (non-reentrant, so the frozen
    inputs need no requires_grad hook)."""
    for p in model.parameters():
        p.requires_grad_(False)
    disable_cpu_repack(model)


def disable_cpu_repack(model: torch.nn.Module) -> int:
    """Keep 4-bit layers on the kernel that has a backward, whatever mode the next forward runs in.

    On CPUs with AVX512-BF16, bitsandbytes repacks a `Linear4bit` weight for an inference-only kernel
    (`gemv_4bit`) the first time it runs in eval mode on an input without grad, and keeps that layout for
    good: later LoRA gradients through it are silently wrong, `model.train()` does not undo it, and
    unpacking is lossy (FACTS.md). The switch is this per-layer flag; GPUs have no such repack. Returns the
    number of 4-bit layers."""
    layers = linear4bit_layers(model)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def repacked_layers(model: torch.nn.Module) -> list[str]:
    """Names of 4-bit layers whose weight was repacked for CPU inference (should always be empty)."""
    import bitsandbytes as bnb

    # Under FSDP2 the weight is a DTensor shard without state: the layer's own reference is checked too.
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
        and any(
            getattr(state, "packing_format_for_cpu", False)
            for state in (_quant_state(m.weight), getattr(m, "quant_state", None))
        )
    ]


def quantization_record(model: torch.nn.Module) -> dict[str, Any] | None:
    """How the base was quantized, read from its first 4-bit layer, for `sft_adapter.json` (the merge reads it):
    {quant_type, double_quant, blocksize, compute_dtype, quant_storage, dtype}; None when nothing is in 4-bit.
    `dtype` is the dtype the weights were quantized from (and dequantize to): the base's load dtype."""
    layers = linear4bit_layers(model)
    if not layers:
        return None
    layer = layers[0]
    # The layer keeps its own reference too: under FSDP2 the weight becomes a DTensor without `quant_state`.
    state = getattr(layer.weight, "quant_state", None) or layer.quant_state
    compute = layer.compute_dtype or torch.float32
    return {
        "quant_type": state.quant_type,
        "double_quant": bool(state.nested),
        "blocksize": int(state.blocksize),
        "compute_dtype": str(compute).removeprefix("torch."),
        "quant_storage": str(layer.weight.dtype).removeprefix("torch."),
        "dtype": str(state.dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------- memory report


def _quant_state(p: torch.Tensor) -> Any:
    """The bitsandbytes QuantState of a packed 4-bit weight; None for any other tensor."""
    return getattr(p, "quant_state", None) if type(p).__name__ == "Params4bit" else None


def _is_4bit(p: torch.Tensor) -> bool:
    return _quant_state(p) is not None


def logical_numel(p: torch.Tensor) -> int:
    """Parameter count of a weight: a packed 4-bit weight holds two values per byte of uint8 storage."""
    state = _quant_state(p)
    return math.prod(state.shape) if state is not None else _whole_numel(p)


def _whole_numel(t: torch.Tensor) -> int:
    """Elements of the whole tensor: a weight DeepSpeed ZeRO-3 partitioned at construction is empty here and
    keeps its count in `ds_numel`."""
    return int(getattr(t, "ds_numel", t.numel()))


def _quant_state_tensors(state: Any) -> list[torch.Tensor]:
    out = [
        t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)
    ]
    if state.state2 is not None:  # double quant: the scales are themselves quantized
        out += [t for t in (state.state2.absmax, state.state2.code) if isinstance(t, torch.Tensor)]
    return out


def _stored_bytes(params: Sequence[torch.Tensor]) -> int:
    """Bytes these weights really occupy: storage plus 4-bit quantization state, each tensor counted once."""
    seen: set[Any] = set()
    total = 0
    for p in params:
        state = _quant_state(p)
        tensors = [p, *(_quant_state_tensors(state) if state is not None else [])]
        for t in tensors:
            ptr = t.data_ptr()
            key = (ptr, t.device) if ptr else id(t)  # meta and empty tensors have no address
            if key in seen:
                continue
            seen.add(key)
            total += _whole_numel(t) * t.element_size()
    return total


def optimizer_state_plan(trainable: Sequence[torch.Tensor], optim_name: str) -> tuple[int, str]:
    """Bytes of optimizer state the optimizer will allocate for these parameters, and how it is held."""
    total = int(
        optimizer_state_bytes(((_whole_numel(p), p.element_size()) for p in trainable), optim_name, False)
    )
    how = {
        "adamw": "torch AdamW, 2 moments in the parameters' dtype",
        "adamw_8bit": f"bitsandbytes AdamW8bit, 2 moments in 8 bits (tensors under {BNB_MIN_8BIT_SIZE} values: fp32)",
        "paged_adamw": "bitsandbytes PagedAdamW, 2 fp32 moments in paged memory",
        "paged_adamw_8bit": (
            f"bitsandbytes PagedAdamW8bit, 2 moments in 8 bits (tensors under {BNB_MIN_8BIT_SIZE} values: fp32) "
            "in paged memory"
        ),
    }[optim_name]
    if optim_name.startswith("paged"):
        how += (
            " (CUDA unified memory that moves to host RAM under GPU memory pressure; ordinary memory on CPU)"
        )
    return total, how


def memory_report(model: torch.nn.Module, optim_name: str) -> dict[str, Any]:
    """Parameters and bytes measured from the model's tensors, and the optimizer-state plan.

    `base` is the frozen pretrained weights (all weights for full fine-tuning), as loaded: packed 4-bit values
    plus their quantization state for QLoRA, the unquantized rest (embeddings, norms) in model.dtype.
    `*_bf16_bytes` is the same weights at 2 bytes per value; `quantized_*` is the 4-bit layers alone."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    base = [p for p in params if not p.requires_grad] or params
    total = sum(logical_numel(p) for p in params)
    n_trainable = sum(_whole_numel(p) for p in trainable)
    base_values = sum(logical_numel(p) for p in base)
    quantized = [p for p in base if _is_4bit(p)]
    optim_bytes, optim_how = optimizer_state_plan(trainable, optim_name)
    quant = quantization_record(model)
    return {
        "params_total": total,
        "params_trainable": n_trainable,
        "trainable_share": n_trainable / max(total, 1),
        "params_4bit": sum(logical_numel(p) for p in quantized),
        "base_bytes": _stored_bytes(base),
        "base_bf16_bytes": 2 * base_values,
        "quantized_bytes": _stored_bytes(quantized),
        "quantized_bf16_bytes": 2 * sum(logical_numel(p) for p in quantized),
        "base_format": "4-bit " + _describe_quant(quant) if quant else _dtypes(base),
        "trainable_bytes": _stored_bytes(trainable),
        "grad_bytes": sum(_whole_numel(p) * p.element_size() for p in trainable),
        "optimizer": optim_name,
        "optimizer_state_bytes": optim_bytes,
        "optimizer_plan": optim_how,
    }


def _describe_quant(q: dict[str, Any]) -> str:
    return f"{q['quant_type']}{' + double quant' if q['double_quant'] else ''}, {q['compute_dtype']} compute"


def _dtypes(params: Sequence[torch.Tensor]) -> str:
    return "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in params}))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def describe_memory(r: dict[str, Any]) -> str:
    """The report as a few console lines."""
    ratio = r["base_bf16_bytes"] / max(r["base_bytes"], 1)
    lines = [
        "[sft] memory, measured from the loaded tensors:",
        f"  parameters  {r['params_total'] / 1e6:,.1f}M, trainable {r['params_trainable'] / 1e6:,.2f}M "
        f"({r['trainable_share']:.2%})",
        f"  base        {human_bytes(r['base_bytes'])} ({r['base_format']}) vs {human_bytes(r['base_bf16_bytes'])} "
        f"in bf16 ({ratio:.2f}x)",
        f"  trainable   {human_bytes(r['trainable_bytes'])} + gradients {human_bytes(r['grad_bytes'])}",
        f"  optimizer   {human_bytes(r['optimizer_state_bytes'])} planned: {r['optimizer_plan']}",
    ]
    if r["params_4bit"]:
        lines.insert(
            3,
            f"  4-bit part  {human_bytes(r['quantized_bytes'])} for {r['params_4bit'] / 1e6:,.1f}M values vs "
            f"{human_bytes(r['quantized_bf16_bytes'])} in bf16 "
            f"({r['quantized_bf16_bytes'] / max(r['quantized_bytes'], 1):.2f}x)",
        )
    return "\n".join(lines)
