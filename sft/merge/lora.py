"""LoRA into its base, tensor by tensor, QLoRA-aware.

A peft adapter folder holds `adapter_config.json` and `adapter_model.safetensors` with, per adapted module
`M`, tensors `base_model.model.M.lora_A.weight` (r × in) and `...lora_B.weight` (out × r). The merged
weight is W + s · B @ A with s = alpha / r (alpha / √r with rsLoRA); DoRA rescales each output row to its
learned magnitude. Modules listed in `modules_to_save` are stored whole and replace the base tensor.

QLoRA: the model that was trained saw each quantized base weight as dequantize(quantize(W)) cast to the
compute dtype, not W. Folding the adapter into W itself gives a different model; folding it into that
round trip reproduces the trained one. `sft_adapter.json` (written by our trainer) records the
quantization; the round trip uses bitsandbytes' own quantize_4bit / dequantize_4bit, on exactly the weights a
`BitsAndBytesConfig(load_in_4bit=True)` load would quantize (found by letting transformers convert an
empty, meta-device copy of the model).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sft.errors import SftError
from sft.export import ADAPTER_RECORD
from sft.merge.sources import ADAPTER_CONFIG, FolderSource, read_json
from sft.safetensors_io import Checkpoint, TensorSpec

if TYPE_CHECKING:
    import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Adapter-file suffixes -> (role, kind of layer)
_ROLES = {
    ".lora_A.weight": ("a", "linear"),
    ".lora_B.weight": ("b", "linear"),
    ".lora_B.bias": ("bias", "linear"),
    ".lora_magnitude_vector": ("magnitude", "linear"),
    ".lora_magnitude_vector.weight": ("magnitude", "linear"),
    ".lora_embedding_A": ("a", "embedding"),
    ".lora_embedding_B": ("b", "embedding"),
}
# peft options that change what the saved tensors mean; merging them here would be silently wrong.
_UNSUPPORTED_OPTIONS = (
    "target_parameters",  # LoRA on fused mixture-of-experts weights (peft's all-linear on Qwen3-MoE, Mixtral)
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "arrow_config",
    "monteclora_config",
    "velora_config",
    "kasa_config",
    "lora_ga_config",
    "use_qalora",
    "use_bdlora",
)
# Initialisations that also rewrite the base weights during training.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class LoraTarget:
    """One adapted module: adapter tensor names and the scale of B @ A."""

    module: str
    kind: Literal["linear", "embedding"]
    a: str = ""
    b: str = ""
    bias: str | None = None
    magnitude: str | None = None
    scaling: float = 0.0


@dataclass
class Adapter:
    folder: Path
    config: dict[str, Any]
    recorded_base: str | None
    quantization: dict[str, Any] | None
    weights: Checkpoint
    targets: dict[str, LoraTarget]
    """Keyed by the base tensor the delta lands on (`M.weight`)."""
    bias_targets: dict[str, LoraTarget]
    """`M.bias` for adapters trained with lora_bias."""
    replaced: dict[str, str]
    """Base tensor name -> adapter tensor name, for modules_to_save."""
    fan_in_fan_out: bool


def read_adapter(folder: Path, what: str = "adapter") -> Adapter:
    """Parse and check an adapter folder (headers only, no tensor data)."""
    config = read_json(folder / ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise SftError(
            f"{what}: {folder} is a {config.get('peft_type')} adapter; the merge folds LoRA adapters only"
        )
    for key in _UNSUPPORTED_OPTIONS:
        if config.get(key):
            raise SftError(
                f"{what}: {folder / ADAPTER_CONFIG}: '{key}' is set, which this merge does not handle; "
                "use peft's merge_and_unload instead"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise SftError(
            f"{what}: {folder / ADAPTER_CONFIG}: init_lora_weights={init} also changes the base weights; "
            "save the adapter with peft's path_initial_model_for_weight_conversion, then merge"
        )
    if not (folder / ADAPTER_WEIGHTS).is_file():
        found = (
            "adapter_model.bin (a pickle file, not read)" if (folder / "adapter_model.bin").is_file() else ""
        )
        raise SftError(f"{what}: {folder / ADAPTER_WEIGHTS} is missing{'; found ' + found if found else ''}")
    meta = read_json(folder / ADAPTER_RECORD) if (folder / ADAPTER_RECORD).is_file() else {}
    quant = meta.get("quantization")
    if quant is not None:
        _check_quantization(quant, folder / ADAPTER_RECORD)
    weights = Checkpoint(folder, ADAPTER_WEIGHTS)
    targets, replaced = _collect(weights, folder, config)
    linear = {m.module + ".weight": m for m in targets.values()}
    return Adapter(
        folder=folder,
        config=config,
        recorded_base=meta.get("base_model") or config.get("base_model_name_or_path"),
        quantization=quant,
        weights=weights,
        targets=linear,
        bias_targets={m.module + ".bias": m for m in targets.values() if m.bias},
        replaced=replaced,
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
    )


def _check_quantization(quant: Any, where: Path) -> None:
    if not isinstance(quant, dict):
        raise SftError(f"{where}: 'quantization' must be null or a mapping")
    if quant.get("quant_type", "nf4") not in ("nf4", "fp4"):
        raise SftError(
            f"{where}: quantization.quant_type must be nf4 or fp4 (got {quant.get('quant_type')!r})"
        )
    if quant.get("blocksize", 64) not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise SftError(
            f"{where}: quantization.blocksize {quant.get('blocksize')} is not a bitsandbytes block size"
        )
    for key in ("compute_dtype", "quant_storage", "dtype"):
        if key in quant and quant[key] not in ("float32", "bfloat16", "float16", "uint8", "int8"):
            raise SftError(f"{where}: quantization.{key}: unknown dtype {quant[key]!r}")


def _collect(
    weights: Checkpoint, folder: Path, config: dict[str, Any]
) -> tuple[dict[str, LoraTarget], dict[str, str]]:
    targets: dict[str, LoraTarget] = {}
    replaced: dict[str, str] = {}
    for key in weights.tensors:
        name = key.removeprefix(_PREFIX)
        role = next(((suffix, r) for suffix, r in _ROLES.items() if name.endswith(suffix)), None)
        if role is None:
            if "lora_" in name or "token_adapter" in name:
                raise SftError(f"adapter {folder}: tensor {key} is of a kind the merge does not handle")
            # A module saved whole (modules_to_save), or the base weight of an adapted embedding, which
            # peft saves as M.base_layer.weight (it may have been resized with the tokenizer).
            replaced[name.replace(".base_layer.", ".")] = key
            continue
        suffix, (part, kind) = role
        module = name.removesuffix(suffix)
        target = targets.setdefault(module, LoraTarget(module, kind))  # type: ignore[arg-type]
        setattr(target, part, key)
    for module, target in targets.items():
        if not target.a or not target.b:
            raise SftError(f"adapter {folder}: module {module} has lora_A or lora_B but not both")
        if target.magnitude and target.kind == "embedding":
            raise SftError(
                f"adapter {folder}: DoRA on embedding {module} is not handled; use peft's merge_and_unload"
            )
        r = weights.tensors[target.a].shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
        target.scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return targets, replaced


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # Same rule as peft's rank/alpha patterns: the key matches the end of the module name at a dot.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# ---------------------------------------------------------------- the QLoRA round trip


def quantized_weight_names(base_folder: Path, quant: dict[str, Any]) -> set[str]:
    """Names of the weights a 4-bit bitsandbytes load of this model quantizes (its decoder's Linear layers).

    transformers decides that (it skips the output head, tied weights and `_keep_in_fp32_modules`); we let it
    convert a meta-device copy of the model, so no weights are allocated, and collect the converted layers.
    """
    import bitsandbytes as bnb
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    config = AutoConfig.from_pretrained(base_folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
        bnb_4bit_use_double_quant=bool(quant.get("double_quant", False)),
        bnb_4bit_compute_dtype=quant.get("compute_dtype", "float32"),
        bnb_4bit_quant_storage=quant.get("quant_storage", "uint8"),
    )
    skip = HfQuantizer.get_modules_to_not_convert(
        model, qconfig.llm_int8_skip_modules, model._keep_in_fp32_modules
    )
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=qconfig)
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def quant_roundtrip(weight: torch.Tensor, quant: dict[str, Any]) -> torch.Tensor:
    """dequantize(quantize(W)) as a bitsandbytes 4-bit layer computes with it, returned as float32."""
    import bitsandbytes.functional as bnbf
    import torch

    # Quantized from the dtype the base was loaded in: recorded as `dtype` when known, else as stored.
    w = weight.to(getattr(torch, quant["dtype"])) if quant.get("dtype") else weight
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        w = w.float()
    packed, state = bnbf.quantize_4bit(
        w.contiguous(),
        blocksize=int(quant.get("blocksize", 64)),
        compress_statistics=bool(quant.get("double_quant", False)),
        quant_type=quant.get("quant_type", "nf4"),
        quant_storage=getattr(torch, quant.get("quant_storage", "uint8")),
    )
    restored = bnbf.dequantize_4bit(packed, state)
    # The layer casts the dequantized weight to the compute dtype before the matmul.
    return restored.to(getattr(torch, quant.get("compute_dtype", "float32"))).float()


# ---------------------------------------------------------------- the source


class AdapterSource:
    """Looks like the base model with the adapter folded in; computes each tensor when it is read."""

    def __init__(self, label: str, adapter: Adapter, base: FolderSource, roundtrip: bool | None) -> None:
        self.label = label
        self.adapter = adapter
        self.base = base
        self.folder = base.folder
        self.config = base.config
        if roundtrip and adapter.quantization is None:
            raise SftError(
                f"qlora_roundtrip: adapter {label} was not trained with quantization (no 'quantization' in "
                f"{adapter.folder / ADAPTER_RECORD}); remove qlora_roundtrip"
            )
        self.quantization = adapter.quantization if roundtrip in (None, True) else None
        self._check_shapes()
        self.quantized: set[str] = set()
        if self.quantization is not None:
            self.quantized = quantized_weight_names(base.folder, self.quantization)
            missing = sorted(self.quantized - set(base.specs()))
            if missing:
                raise SftError(
                    f"base {base.label}: the 4-bit layer weight {missing[0]} is not in its safetensors files"
                )

    def _check_shapes(self) -> None:
        base_specs = self.base.specs()
        ad = self.adapter
        t = ad.weights.tensors
        for name, target in ad.targets.items():
            if name not in base_specs:
                raise SftError(
                    f"adapter {self.label}: module {target.module} has no tensor {name} in base {self.base.label}"
                )
            a, b = t[target.a].shape, t[target.b].shape
            out_in = (b[0], a[1]) if target.kind == "linear" else (a[1], b[0])
            if target.kind == "linear" and ad.fan_in_fan_out:
                out_in = out_in[::-1]
            if len(a) != 2 or len(b) != 2 or a[0] != b[1] or base_specs[name].shape != out_in:
                raise SftError(
                    f"adapter {self.label}: {target.module}: lora_A {list(a)} and lora_B {list(b)} do not fit "
                    f"{name} {list(base_specs[name].shape)} of base {self.base.label}; is this the adapter's base?"
                )
        for name in ad.bias_targets:
            if name not in base_specs:
                raise SftError(
                    f"adapter {self.label}: trained with lora_bias but the base has no {name} to add it to"
                )
        for name, key in ad.replaced.items():
            if name not in base_specs:
                raise SftError(
                    f"adapter {self.label}: saved tensor {key} has no {name} in base {self.base.label}"
                )
            if t[key].shape != base_specs[name].shape:
                raise SftError(
                    f"adapter {self.label}: saved tensor {name} is {list(t[key].shape)} but the base has "
                    f"{list(base_specs[name].shape)} (resized vocabulary?); use peft's merge_and_unload"
                )

    def specs(self) -> dict[str, TensorSpec]:
        return self.base.specs()

    def read(self, name: str, device: str) -> torch.Tensor:
        ad = self.adapter
        if name in ad.replaced:
            w = ad.weights.read(ad.replaced[name], device)
            if not w.is_floating_point():
                return w
            w = w.float()
        elif name in self.quantized:
            assert self.quantization is not None
            w = quant_roundtrip(self.base.read_stored(name, device), self.quantization)
        else:
            w = self.base.read(name, device)
        if name in ad.targets:
            w = self._fold(w, ad.targets[name], device)
        if name in ad.bias_targets:
            target = ad.bias_targets[name]
            assert target.bias is not None
            w = w + target.scaling * ad.weights.read(target.bias, device).float()
        return w

    def _fold(self, w: torch.Tensor, target: LoraTarget, device: str) -> torch.Tensor:
        ad = self.adapter
        a = ad.weights.read(target.a, device).float()
        b = ad.weights.read(target.b, device).float()
        delta = (b @ a) * target.scaling
        if target.kind == "embedding":
            delta = delta.T  # embeddings store (num_embeddings, dim); B @ A is (dim, num_embeddings)
        elif ad.fan_in_fan_out:
            delta = delta.T
        merged = w + delta
        if target.magnitude is None:
            return merged
        # DoRA: each output row of W + ΔW is rescaled to its learned magnitude m (norm over the input dim).
        m = ad.weights.read(target.magnitude, device).float()
        rows = merged.T if ad.fan_in_fan_out else merged
        factor = (m / rows.norm(dim=1)).view(-1, 1)
        return (factor * rows).T if ad.fan_in_fan_out else factor * rows

    def close(self) -> None:
        self.adapter.weights.close()
        self.base.close()
