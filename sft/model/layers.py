"""The model's decoder layers: the repeated blocks that FSDP2 shards and `train.compile` compiles one by one."""

from __future__ import annotations

import torch

from sft.errors import SftError


def decoder_layers(model: torch.nn.Module, *, required: bool = True) -> list[torch.nn.Module]:
    """The classes a Hugging Face model lists as not to be split (`_no_split_modules`), also inside wrappers.

    With `required` (sharding, compiling) a model without any is an error; the planner takes an empty list."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers and required:
        raise SftError(
            f"found no decoder layers in {type(model).__name__} (no _no_split_modules); this model cannot be "
            "sharded (strategy.name=fsdp2) or compiled (train.compile=true) layer by layer"
        )
    return layers
