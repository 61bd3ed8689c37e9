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

    model = load_model(recipe.model, device)
    if recipe.method == "lora":
        model = add_lora(model, recipe.lora)
    return model
