"""How the model is wrapped, stepped, saved and exported: one small class per backend behind `Strategy`.

Imports stay lazy: nothing here is imported before a run starts (recipe validation uses sft/ds_config.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sft.config import Recipe
    from sft.dist import DistEnv
    from sft.strategies.base import Strategy


def build_strategy(recipe: Recipe, dist: DistEnv) -> Strategy:
    name = recipe.strategy.name
    if name == "single":
        from sft.strategies.single import SingleStrategy

        return SingleStrategy(recipe, dist)
    if name == "fsdp2":
        from sft.strategies.fsdp2 import FSDP2Strategy

        return FSDP2Strategy(recipe, dist)
    if name == "deepspeed":
        from sft.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(recipe, dist)
    raise AssertionError(f"unhandled strategy {name}")  # the recipe's Literal makes this unreachable
