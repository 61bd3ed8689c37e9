"""`model.attn_implementation`: the attention kernel a model runs with.

`auto` (the default) takes the best one the model class supports on the device: flash attention 3, then 2, on
a GPU where the package is installed; else PyTorch's sdpa; else eager (Gemma 2: its attention soft-capping has
no sdpa path). An explicit choice the model refuses is one line naming what it does support. Resolved from the
model's config.json alone, before any weight is loaded, so the data pipeline can lay out packed batches for it
(flash attention takes one flat row) and the run can say what it chose.
"""

from __future__ import annotations

from typing import Any

from sft.config import ModelConfig
from sft.errors import SftError

FLASH = ("flash_attention_3", "flash_attention_2")
PREFERENCE = ("flash_attention_3", "flash_attention_2", "sdpa", "eager")


def model_class(cfg: ModelConfig) -> Any:
    """The transformers class that will load this model, or None when it is remote code (not inspected)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from sft.model.builtin import resolve_model_path

    config = AutoConfig.from_pretrained(
        resolve_model_path(cfg.name), trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
    )
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def supports(cls: Any, impl: str) -> bool:
    if impl == "eager":
        return True
    if impl == "sdpa":
        return bool(getattr(cls, "_supports_sdpa", False))
    return bool(getattr(cls, "_supports_flash_attn", False))


def installed(impl: str) -> bool:
    """The kernel package is there and usable on this machine (a CUDA GPU; Hopper for version 3)."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    return bool(is_flash_attn_3_available() if impl == "flash_attention_3" else is_flash_attn_2_available())


def resolve_attention(cfg: ModelConfig, device_type: str) -> str | None:
    """The implementation to load the model with (None: remote code, transformers' own default)."""
    choice = cfg.attn_implementation
    cls = model_class(cfg)
    name = getattr(cls, "__name__", cfg.name)
    if choice != "auto":
        if choice in FLASH and (device_type != "cuda" or not installed(choice)):
            raise SftError(
                f"model.attn_implementation={choice} needs a CUDA GPU and its flash-attn package; "
                "use sdpa, or auto (picks flash attention where it is installed)"
            )
        if cls is not None and not supports(cls, choice):
            others = [i for i in PREFERENCE if supports(cls, i) and (i not in FLASH or device_type == "cuda")]
            raise SftError(
                f"model.attn_implementation={choice}: {name} does not support it; use {others[0]} (or auto)"
            )
        return choice
    if cls is None:
        return None
    for impl in PREFERENCE:
        if impl in FLASH and (device_type != "cuda" or not installed(impl)):
            continue
        if supports(cls, impl):
            return impl
    return "eager"
