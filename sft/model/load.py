"""Load the base model and tokenizer, and add LoRA adapters when the recipe asks for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sft.config import LoraConfig, ModelConfig
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
    if not getattr(tok, "chat_template", None):
        raise SftError(f"model: the tokenizer of {cfg.name} has no chat template; chat data needs one")
    return tok


def load_model(cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(cfg.name),
            dtype=DTYPES[cfg.dtype],
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
        )
    except OSError as e:
        raise SftError(f"model: could not load {cfg.name}: {str(e).splitlines()[0]}") from None
    # The training forward never uses a KV cache; with the cache on, transformers also skips the
    # packed-sequence mask detection (FACTS.md).
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device)


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
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise SftError(f"lora.target_modules: {e}") from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
