"""Merge parameters that vary over the model, as mergekit writes them (no torch here).

A numeric parameter (`weight`, `density`, `t`, `epsilon`) is one of:

    0.5                                  the same everywhere
    [0, 0.5, 1]                          a gradient: evenly spaced anchors from the first decoder layer to
                                         the last, linear in between
    [{filter: self_attn, value: [0, 1]}, {value: 0.5}]
                                         per tensor: the first entry whose `filter` is a substring of the
                                         tensor's name (or that has no filter, or `*`) gives the value

Where a tensor sits, as mergekit 0.1.5 counts it: decoder layer i of n at i / (n − 1) (a single layer at 1);
every other tensor (embeddings, final norm, output head) at 0, so it takes the first anchor.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    """A substring of the tensor name; none (or `*`) matches every tensor."""
    value: float | list[float]


Setting = float | list[float] | list[Conditional]


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def position(name: str, n_layers: int) -> float:
    """Where tensor `name` sits for gradients, 0..1 (see the module docstring)."""
    i = layer_index(name)
    if i is None:
        return 0.0
    return i / (n_layers - 1) if n_layers > 1 else 1.0


def interpolate(values: list[float], at: float) -> float:
    """Piecewise-linear value of evenly spaced anchors at `at` in [0, 1]."""
    if len(values) == 1:
        return values[0]
    x = min(max(at, 0.0), 1.0) * (len(values) - 1)
    i = min(int(x), len(values) - 1)
    j = min(i + 1, len(values) - 1)
    frac = x - i
    return (1 - frac) * values[i] + frac * values[j]


def resolve(setting: Setting | None, name: str, at: float) -> float | None:
    """The value of a setting for tensor `name` at position `at`; None when no filter matches."""
    if setting is None or isinstance(setting, (int, float)):
        return setting
    if not setting:
        return None
    if all(isinstance(v, (int, float)) for v in setting):
        return interpolate([float(v) for v in setting], at)  # type: ignore[arg-type]
    for cond in setting:
        assert isinstance(cond, Conditional)
        if cond.filter in (None, "*") or cond.filter in name:
            return resolve(cond.value, name, at)
    return None


def anchors(setting: Setting | None) -> list[float]:
    """Every number a setting can take at an anchor (for range checks)."""
    if setting is None:
        return []
    if isinstance(setting, (int, float)):
        return [float(setting)]
    out: list[float] = []
    for v in setting:
        out += anchors(v.value) if isinstance(v, Conditional) else [float(v)]
    return out


def describe(setting: Any) -> str:
    if isinstance(setting, list) and setting and isinstance(setting[0], Conditional):
        return "[" + ", ".join(f"{c.filter or '*'}: {c.value}" for c in setting) + "]"
    return f"{setting:g}" if isinstance(setting, float) else str(setting)
