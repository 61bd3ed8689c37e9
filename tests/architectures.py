"""Tiny random-weight configurations of the common decoder architectures (the architecture matrix), each paired
with its family's published chat template (tests/fixtures/templates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# architecture -> (transformers config class name, its own settings, chat template fixture)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", {}, "llama3"),
    "qwen2": ("Qwen2Config", {}, "deepseek_r1_distill"),  # DeepSeek-R1-Distill-Qwen is a Qwen2 model
    "qwen3": ("Qwen3Config", {"head_dim": 16}, "qwen3"),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
        "qwen3",
    ),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16}, "gemma2"),
    "gemma3": (
        "Gemma3TextConfig",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16},
        "gemma3",
    ),
    "mistral": ("MistralConfig", {"sliding_window": 16}, "mistral_nemo"),
    "phi3": ("Phi3Config", {}, "phi3"),
    "granite": ("GraniteConfig", {"embedding_multiplier": 2.0, "logits_scaling": 2.0}, "granite3_3"),
}


def tiny_config(arch: str, tokenizer: Any) -> Any:
    import transformers

    cls_name, own, _ = ARCHITECTURES[arch]
    return getattr(transformers, cls_name)(
        vocab_size=len(tokenizer),
        hidden_size=32,  # small: the 49k-token vocabulary of the real tokenizer dominates the cost anyway
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **own,
    )


def save_tiny_model(arch: str, tokenizer: Any, out: Path, seed: int = 0) -> Path:
    """A model folder (random weights, safetensors) with `tokenizer` saved next to it."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
