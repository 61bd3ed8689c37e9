"""Load the base model and tokenizer, and add LoRA adapters when the recipe asks for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sft.config import LoraConfig, ModelConfig, QuantConfig
from sft.errors import SftError
from sft.model.builtin import builtin_model_dir, is_builtin

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_name(name: str) -> None:
    """Fail fast (no torch work) when a local model path does not exist."""
    if is_builtin(name):
        from sft.model.builtin import _gguf_path

        _gguf_path(name.removeprefix("builtin:"))
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise SftError(
                f"model: {name} has no config.json; point model.name at a Hugging Face model folder"
            )
        return
    # A hub id is "org/name" (or "name"); anything else that looks like a path must exist.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise SftError(f"model: path not found: {name}")


def resolve_model_path(name: str) -> str:
    """A folder to load from: the converted built-in model, a local folder, or else the hub id as given."""
    if is_builtin(name):
        return str(builtin_model_dir(name))
    local = Path(name).expanduser()
    return str(local) if local.exists() else name


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve_model_path(cfg.name), trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok  # a missing chat template is an error only where chat rows are rendered (sft/data/chat.py)


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
            resolve_model_path(cfg.name),
            dtype=DTYPES[cfg.dtype],
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
            **kwargs,
        )
    except OSError as e:
        raise SftError(f"model: could not load {cfg.name}: {str(e).splitlines()[0]}") from None
    # The training forward never uses a KV cache; with the cache on, transformers also skips the
    # packed-sequence mask detection (FACTS.md).
    model.config.use_cache = False
    if quant is not None:
        from sft.model.quant import prepare_for_kbit_training

        prepare_for_kbit_training(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model if quant is not None else model.to(device)


def add_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
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
        peft_model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise SftError(f"lora.target_modules: {e}") from None
    # Trained weights are float32 whatever model.dtype (small updates would round away in bf16): peft upcasts
    # the adapter matrices, this does the same for the full copies of lora.modules_to_save.
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    return peft_model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a packed 4-bit weight counts its values, not its bytes."""
    from sft.model.quant import logical_numel

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    return trainable, total
