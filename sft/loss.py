"""Token-level loss. Sums, not means: the loop divides by the global count of trained tokens so a step's
loss is the mean over every trained token of the global batch (DESIGN invariant 2)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from sft.data.chat import IGNORE_INDEX
from sft.data.collate import real_tokens


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss: labels are aligned with inputs, so position t predicts t+1."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a batch, for throughput; packed batches have no attention mask."""
    return real_tokens(batch)


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str) -> torch.Tensor:
    """Sum of next-token cross entropy over the trained tokens of one micro-batch (fp32 accumulation)."""
    device = batch["input_ids"].device
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with autocast(device, precision):
        logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
