"""Load the base model and tokenizer, and add LoRA adapters when the recipe asks for them."""

from __future__ import annotations

from typing import Any

import torch

from sft.config import LoraConfig, ModelConfig, QuantConfig
from sft.errors import SftError
from sft.model.attention import resolve_attention
from sft.model.builtin import resolve_model_path

# The recipe's dtype names (model.dtype, strategy.fsdp.*_dtype, quant.storage_dtype) -> torch dtypes.
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "uint8": torch.uint8,
}


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve_model_path(cfg.name), trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok  # a missing chat template is an error only where chat rows are rendered (sft/data/chat.py)


def model_kwargs(cfg: ModelConfig, device_type: str) -> dict[str, Any]:
    """How transformers builds the model, whether it loads weights (from_pretrained) or not (from_config)."""
    return {
        "dtype": DTYPES[cfg.dtype],
        "attn_implementation": resolve_attention(cfg, device_type),
        "trust_remote_code": cfg.trust_remote_code,
    }


def load_model(cfg: ModelConfig, device: torch.device, quant: QuantConfig | None = None) -> torch.nn.Module:
    """The base model on `device`; with `quant`, its linear layers in 4-bit and frozen (QLoRA)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if quant is not None:
        from sft.model.quant import bnb_config

        kwargs["quantization_config"] = bnb_config(quant)
        kwargs["device_map"] = {"": str(device)}  # bitsandbytes quantizes each weight as it lands there
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(cfg.name), revision=cfg.revision, **model_kwargs(cfg, device.type), **kwargs
        )
    except OSError as e:
        raise SftError(f"model: could not load {cfg.name}: {str(e).splitlines()[0]}") from None
    prepare_for_training(model, cfg, quant)
    return model if quant is not None else model.to(device)


def prepare_for_training(model: Any, cfg: ModelConfig, quant: QuantConfig | None) -> None:
    """No KV cache, a frozen 4-bit base, gradient checkpointing: the same for a loaded and an empty model."""
    # The training forward never uses a KV cache; with the cache on, transformers also skips the
    # packed-sequence mask detection (FACTS.md).
    model.config.use_cache = False
    if quant is not None:
        from sft.model.quant import prepare_for_kbit_training

        prepare_for_kbit_training(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def add_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    return train_in_float32(lora_model(model, cfg))


def lora_model(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """peft's LoRA adapters on `model`, initialized by peft, in the base layers' dtype (not yet upcast:
    `train_in_float32` does it, so an empty model's adapters can be captured as peft rounded them)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        modules_to_save=cfg.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)
    except ValueError as e:
        if "lora_dropout" in str(
            e
        ):  # all-linear reaches the fused expert weights of mixture-of-experts models
            raise SftError(
                f"lora.dropout={cfg.dropout}: peft adapts the fused expert weights of {type(model).__name__} "
                "(a mixture of experts) only without dropout; set lora.dropout=0"
            ) from None
        raise SftError(f"lora.target_modules: {e}") from None


def train_in_float32(model: torch.nn.Module) -> torch.nn.Module:
    """Trained weights are float32 whatever model.dtype (small updates would round away in bf16): the adapter
    matrices (as peft's autocast_adapter_dtype would) and the full copies of lora.modules_to_save."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a packed 4-bit weight counts its values, not its bytes."""
    from sft.model.quant import logical_numel

    trainable = sum(logical_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    return trainable, total
