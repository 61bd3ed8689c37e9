"""Building the model a recipe asks for: base weights, then the method's changes (LoRA adapters).

Importing this package stays light (no torch) so `sft.model.builtin` can be used by config-time code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sft.config import Recipe


def build_model(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    """The trainable model on `device`, before any strategy wraps it."""
    from sft.model.load import add_lora, load_model

    # QLoRA: the same LoRA adapters, over a frozen base loaded in 4-bit.
    model = load_model(recipe.model, device, recipe.quant if recipe.method == "qlora" else None)
    if recipe.method in ("lora", "qlora"):
        model = add_lora(model, recipe.lora)
    if recipe.train.compile:  # after LoRA (it replaces layers' modules), before a strategy shards them
        from sft.model.compile import compile_layers

        compile_layers(model, device)
    if recipe.train.activation_offload:
        from sft.model.offload import offload_activations

        offload_activations(model, device)
    return model
