"""Collate samples into a right-padded batch of tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sft.data.chat import IGNORE_INDEX, Sample


def pad_collate(samples: Sequence[Sample], pad_id: int, multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Pad to the longest sample (rounded up to `multiple_of` for friendlier kernels)."""
    longest = max(len(s.input_ids) for s in samples)
    width = -(-longest // multiple_of) * multiple_of
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
