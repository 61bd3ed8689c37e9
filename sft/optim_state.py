"""Bytes of AdamW state as torch and bitsandbytes hold it: the memory planner (sft/plan.py) and the memory
report of a loaded model (sft/model/quant.py) both count with it. Plain arithmetic, no imports of sft."""

from __future__ import annotations

import math
from collections.abc import Iterable

# bitsandbytes' 8-bit optimizers keep tensors smaller than this in 32-bit state and quantize the rest blockwise
# with one float32 scale per 256 values.
BNB_MIN_8BIT_SIZE = 4096
BNB_OPTIM_BLOCK = 256
ADAM_STEP_BYTES = 4  # torch's AdamW keeps a float32 `step` tensor per parameter


def optimizer_state_bytes(
    tensors: Iterable[tuple[int, float]], optim_name: str, step_counters: bool = True
) -> float:
    """Bytes of AdamW state for trainable tensors given as (values, bytes per value): two moments (torch keeps
    them in the parameter's dtype; bitsandbytes in fp32 or 8 bits with block scales), and torch's step counters."""
    total = 0.0
    for n, itemsize in tensors:
        if optim_name.endswith("_8bit") and n >= BNB_MIN_8BIT_SIZE:
            total += 2 * (n + 4 * math.ceil(n / BNB_OPTIM_BLOCK))
        elif optim_name == "adamw":
            total += 2 * n * itemsize + (ADAM_STEP_BYTES if step_counters else 0)
        else:
            total += 2 * n * 4
    return total
