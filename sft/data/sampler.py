"""Which samples (or packed rows) each rank trains on at each optimizer step, for data held in memory.

The order is a pure function of (seed, epoch), and the units of global step k are the same whatever the
micro batch, accumulation and world size: step k takes the k-th slice of the global batch's units of the
epoch's order, and each rank takes its micro-batches from that slice (`TrainConfig.rank_share`). So resuming
is just "start at step k", and the loss does not depend on how the global batch is split (DESIGN invariants
2 and 4). Each rank's share of an epoch is disjoint from the others', and together they cover the epoch.

`StepSampler` orders samples (a unit is a sample index); `RowSampler` packs each epoch's samples into rows
first (a unit is a row: a list of sample indices). Both answer the calls of `Sampler`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from sft.config import TrainConfig
from sft.data.mixture import Mixture, seeded_permutation
from sft.data.pack import pack_in_windows


class Sampler(Protocol):
    global_batch: int
    """Units (samples or rows) of one step over all ranks."""

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def dropped_per_epoch(self) -> int:
        """Units left over at the end of the first epoch (too few for a step)."""
        ...

    def total_steps(self, epochs: int) -> int: ...

    def micro_batches(self, step: int) -> list[list[Any]]:
        """This rank's micro-batches of units for optimizer step `step` (0-based)."""
        ...

    def samples(self, step: int) -> list[int]:
        """This rank's sample indices for step `step`, in micro-batch (and row) order."""
        ...

    def epoch_order(self, epoch: int) -> list[int]:
        """The epoch's samples in the mixture's order."""
        ...


class StepSampler:
    def __init__(self, mixture: Mixture, train: TrainConfig, world_size: int = 1, rank: int = 0) -> None:
        self.mixture, self.train = mixture, train
        self.num_samples = mixture.epoch_size
        self.world_size, self.rank = world_size, rank
        self.global_batch = train.global_batch(world_size)
        self.steps_per_epoch = self.num_samples // self.global_batch

    @property
    def dropped_per_epoch(self) -> int:
        """Samples left over at the end of each epoch (a different few each epoch when shuffled)."""
        return self.num_samples - self.steps_per_epoch * self.global_batch

    def epoch_order(self, epoch: int) -> list[int]:
        return self.mixture.epoch_order(epoch)

    def total_steps(self, epochs: int) -> int:
        return epochs * self.steps_per_epoch

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        chunk = self.epoch_order(epoch)[k * self.global_batch : (k + 1) * self.global_batch]
        return self.train.rank_share(chunk, self.world_size, self.rank)

    def samples(self, step: int) -> list[int]:
        return [i for mb in self.micro_batches(step) for i in mb]


class RowSampler:
    """Which packed rows each rank trains on at each step (`data.packing_mode: rows`).

    Each epoch's samples, in the mixture's order for (seed, epoch), are packed into rows of at most
    `capacity` tokens a window at a time; the rows are shuffled with the same seed, and step k of the epoch
    takes the k-th slice of `global_batch` rows, each rank its micro-batches of rows (disjoint, and together
    the slice). Everything is a pure function of (seed, epoch), so resuming is again "start at step k". The
    number of rows differs a little from epoch to epoch, so an epoch's step count is found by packing it
    (a fraction of a second per 100k samples) and kept.
    """

    def __init__(
        self,
        mixture: Mixture,
        lengths: Sequence[int] | np.ndarray,
        capacity: int,
        window: int,
        train: TrainConfig,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        self.mixture, self.lengths = mixture, lengths
        self.capacity, self.window = capacity, window
        self.train, self.world_size, self.rank = train, world_size, rank
        self.global_batch = train.global_batch(world_size)
        self._rows: tuple[int, list[list[int]]] | None = None
        self._row_counts: list[int] = []  # rows of epoch 0, 1, ... as far as packed

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Global sample indices of every row of one epoch, in training order."""
        if self._rows is not None and self._rows[0] == epoch:
            return self._rows[1]
        order = self.mixture.epoch_order(epoch)
        packed = pack_in_windows([int(self.lengths[i]) for i in order], self.capacity, self.window)
        rows = [[order[i] for i in row] for row in packed]
        if self.mixture.shuffle:
            seed = (self.mixture.seed * 100_003 + epoch) * 7 + 1  # not the sample order's permutation
            rows = [rows[i] for i in seeded_permutation(len(rows), seed)]
        self._rows = (epoch, rows)
        return rows

    def epoch_order(self, epoch: int) -> list[int]:
        """The epoch's samples in the order they were packed (the mixture's order)."""
        return self.mixture.epoch_order(epoch)

    def rows_in_epoch(self, epoch: int) -> int:
        while len(self._row_counts) <= epoch:
            self._row_counts.append(len(self.epoch_rows(len(self._row_counts))))
        return self._row_counts[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return self.rows_in_epoch(epoch) // self.global_batch

    @property
    def steps_per_epoch(self) -> int:
        """Steps of the first epoch (later ones may differ by a step or so)."""
        return self.steps_in_epoch(0)

    @property
    def dropped_per_epoch(self) -> int:
        """Rows left over at the end of the first epoch."""
        return self.rows_in_epoch(0) - self.steps_in_epoch(0) * self.global_batch

    def total_steps(self, epochs: int) -> int:
        """Steps in `epochs` epochs (epochs differ by a step or so: their samples pack into different rows)."""
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def micro_batches(self, step: int) -> list[list[list[int]]]:
        """This rank's micro-batches for step `step` (0-based): rows of global sample indices."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            if self.steps_in_epoch(epoch) == 0:
                raise ValueError("an epoch has no step")
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        chunk = self.epoch_rows(epoch)[step * self.global_batch : (step + 1) * self.global_batch]
        return self.train.rank_share(chunk, self.world_size, self.rank)

    def samples(self, step: int) -> list[int]:
        """This rank's sample indices for step `step`, row after row."""
        return [i for mb in self.micro_batches(step) for row in mb for i in row]
