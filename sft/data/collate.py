"""Samples -> batch tensors: padded rows, packed rows, or one flat row (flash attention's varlen path).

The layout is chosen once from the recipe (`layouts`): how packed rows become a tensor (`RowCollate`, or
`FlatCollate` for flash attention), and how a step's micro-batches of samples become tensors (`PadSamples`,
or `PackSamples`: the step's samples packed among themselves). Each layout also counts the token slots it
would use, for the padding statistics, without building tensors.

Packed batches carry `position_ids` that restart at 0 for every sample and no `attention_mask`; from those,
transformers builds a block-diagonal causal mask (sdpa, eager; with use_cache=False) or calls flash attention's
variable-length kernel (one flat row), so no sample attends to another. Each sample's first label is already
IGNORE_INDEX, so no sample is predicted from its predecessor and the packed loss equals the unpacked one.
Padding at the end of a packed row has label IGNORE_INDEX and position 0 at every token: each padding token is
then a sequence of its own, attending only to itself, and real tokens never see it (they come before it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from sft.data.chat import IGNORE_INDEX, Sample
from sft.data.pack import pack

if TYPE_CHECKING:
    from sft.config import Recipe

Item = tuple[np.ndarray, np.ndarray]  # (input_ids, labels) of one sample
Batch = dict[str, torch.Tensor]
MULTIPLE_OF = 8  # batch widths are rounded up to this (friendlier kernels)


def as_item(sample: Sample) -> Item:
    return np.asarray(sample.input_ids, dtype=np.int64), np.asarray(sample.labels, dtype=np.int64)


def _width(longest: int, multiple_of: int) -> int:
    return -(-longest // multiple_of) * multiple_of


def pad_collate(
    samples: Sequence[Item], pad_id: int, multiple_of: int = MULTIPLE_OF
) -> dict[str, torch.Tensor]:
    """One sample per row, right-padded to the longest (rounded up to `multiple_of` for friendlier kernels)."""
    width = _width(max(len(ids) for ids, _ in samples), multiple_of)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(samples):
        n = len(ids)
        input_ids[i, :n] = torch.as_tensor(ids)
        labels[i, :n] = torch.as_tensor(lab)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_collate(
    rows: Sequence[Sequence[Item]], pad_id: int, multiple_of: int = MULTIPLE_OF
) -> dict[str, torch.Tensor]:
    """Several samples per row; the batch is as wide as its longest row (rounded up to `multiple_of`)."""
    width = _width(max(sum(len(ids) for ids, _ in row) for row in rows), multiple_of)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ids, lab in row:
            n = len(ids)
            input_ids[r, at : at + n] = torch.as_tensor(ids)
            labels[r, at : at + n] = torch.as_tensor(lab)
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def flat_collate(samples: Sequence[Item]) -> dict[str, torch.Tensor]:
    """All samples in one row of shape (1, total tokens), no padding: flash attention's varlen layout."""
    return pack_collate([samples], pad_id=0, multiple_of=1)


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are not padding: padded batches have an attention mask; in packed rows a padding token
    is a position 0 not followed by position 1 (every real sample has at least two tokens)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    pos = batch.get("position_ids")
    if pos is None:
        return batch["input_ids"].numel()
    following = torch.cat([pos[:, 1:], torch.zeros_like(pos[:, :1])], dim=1)
    return pos.numel() - int(((pos == 0) & (following != 1)).sum())


# ---------------------------------------------------------------- layouts: chosen once from the recipe


class RowsLayout(Protocol):
    """Packed rows (lists of samples) -> one micro-batch."""

    def collate(self, rows: list[list[Item]]) -> Batch: ...

    def slots(self, rows: list[list[int]]) -> int:
        """Token slots (real + padding) of rows given as their samples' lengths."""
        ...


class SamplesLayout(Protocol):
    """A step's micro-batches of samples -> its micro-batch tensors (also for eval batches)."""

    name: str

    def batches(self, groups: list[list[Item]]) -> list[Batch]: ...

    def slots(self, groups: list[list[int]]) -> int:
        """Token slots (real + padding) of the micro-batches given as their samples' lengths."""
        ...


class RowCollate:
    """Rows masked block-diagonally from position ids that restart per sample (sdpa, eager)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def collate(self, rows: list[list[Item]]) -> Batch:
        return pack_collate(rows, self.pad_id)

    def slots(self, rows: list[list[int]]) -> int:
        return len(rows) * _width(max(sum(row) for row in rows), MULTIPLE_OF)


class FlatCollate:
    """All rows' samples in one flat row: flash attention's variable-length kernel, no padding."""

    def collate(self, rows: list[list[Item]]) -> Batch:
        return flat_collate([item for row in rows for item in row])

    def slots(self, rows: list[list[int]]) -> int:
        return sum(map(sum, rows))


class PadSamples:
    """One sample per row, right-padded (`data.packing: false`)."""

    name = "padded rows"

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def batches(self, groups: list[list[Item]]) -> list[Batch]:
        return [pad_collate(g, self.pad_id) for g in groups]

    def slots(self, groups: list[list[int]]) -> int:
        return sum(len(g) * _width(max(g), MULTIPLE_OF) for g in groups)


class PackSamples:
    """A step's samples packed among themselves into rows of at most `capacity` tokens, dealt into as many
    micro-batches as the step has (`packing_mode: batch`; eval batches whenever packing is on)."""

    name = "packed rows"

    def __init__(self, capacity: int, rows: RowsLayout) -> None:
        self.capacity, self.rows = capacity, rows

    def batches(self, groups: list[list[Item]]) -> list[Batch]:
        items = [item for g in groups for item in g]
        parts = pack([len(ids) for ids, _ in items], self.capacity, len(groups))
        return [self.rows.collate([[items[i] for i in row] for row in part]) for part in parts]

    def slots(self, groups: list[list[int]]) -> int:
        lengths = [n for g in groups for n in g]
        parts = pack(lengths, self.capacity, len(groups))
        return sum(self.rows.slots([[lengths[i] for i in row] for row in part]) for part in parts)


def layouts(recipe: Recipe, pad_id: int, flat: bool) -> tuple[RowsLayout, SamplesLayout]:
    """The recipe's collate policy: how rows become tensors, and how a step's samples do."""
    # flash attention (`flat`) takes packed samples as one flat row (its variable-length kernel); sdpa and
    # eager take rows, masked block-diagonally from the position ids.
    rows: RowsLayout = FlatCollate() if flat else RowCollate(pad_id)
    samples: SamplesLayout = (
        PackSamples(recipe.data.max_seq_len, rows) if recipe.data.packing else PadSamples(pad_id)
    )
    return rows, samples
