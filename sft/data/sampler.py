"""Which samples each rank trains on at each optimizer step.

The order is a pure function of (seed, epoch), and the samples of global step k are the same whatever the
micro batch, accumulation and world size: step k takes the k-th slice of `global_batch` indices of the
epoch's order, and each rank takes its micro-batches from that slice. So resuming is just "start at
step k", and the loss does not depend on how the global batch is split (DESIGN invariants 2 and 4).
Each rank's share of an epoch is disjoint from the others', and together they cover the epoch.
"""

from __future__ import annotations

from sft.data.mixture import Mixture


class StepSampler:
    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        grad_accum: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        mixture: Mixture | None = None,
    ) -> None:
        self.mixture = mixture or Mixture([num_samples], None, seed, shuffle)
        self.num_samples = self.mixture.epoch_size
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.steps_per_epoch = self.num_samples // self.global_batch

    @property
    def dropped_per_epoch(self) -> int:
        """Samples left over at the end of each epoch (a different few each epoch when shuffled)."""
        return self.num_samples - self.steps_per_epoch * self.global_batch

    def epoch_order(self, epoch: int) -> list[int]:
        return self.mixture.epoch_order(epoch)

    def micro_batches(self, step: int) -> list[list[int]]:
        """Sample indices of each of this rank's micro-batches for optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        chunk = self.epoch_order(epoch)[k * self.global_batch : (k + 1) * self.global_batch]
        m, w, r = self.micro_batch_size, self.world_size, self.rank
        return [chunk[(a * w + r) * m : (a * w + r + 1) * m] for a in range(self.grad_accum)]
