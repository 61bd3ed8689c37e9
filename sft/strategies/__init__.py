"""How the model is wrapped, stepped, saved and exported: one small class per backend behind `Strategy`."""

from __future__ import annotations

from sft.config import Recipe
from sft.dist import DistEnv
from sft.strategies.base import Strategy


def build_strategy(recipe: Recipe, dist: DistEnv) -> Strategy:
    name = recipe.strategy.name
    if name == "single":
        from sft.strategies.single import SingleStrategy

        return SingleStrategy(recipe, dist)
    raise AssertionError(f"unhandled strategy {name}")  # the recipe's Literal makes this unreachable
