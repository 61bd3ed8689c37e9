"""Which samples make up each epoch: all sources concatenated, or a weighted mixture.

A weighted epoch takes from source i a share of `epoch_size` proportional to its weight: fewer samples
than it has (a different subset each epoch) or more (it is repeated, every sample once per pass). The
epoch's order is a pure function of (seed, epoch), so resuming at a step needs no stored state.
"""

from __future__ import annotations

import torch


def seeded_permutation(n: int, seed: int) -> list[int]:
    """A permutation of range(n) that depends on the seed alone (the same on every machine and rank)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class Mixture:
    def __init__(
        self,
        sizes: list[int],
        weights: list[float] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        epoch_size: int | None = None,
    ) -> None:
        self.sizes = sizes
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.seed, self.shuffle = seed, shuffle
        if weights is None:
            self.counts = list(sizes)
        else:
            total = epoch_size or sum(sizes)
            self.counts = _apportion(total, weights)
        self.epoch_size = sum(self.counts)
        self._cache: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        """Global sample indices (source start + index) of one epoch, in training order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if len(self.sizes) == 1 and self.counts == self.sizes:  # the common case: one source, whole
            order = (
                seeded_permutation(self.sizes[0], self.seed * 100_003 + epoch)
                if self.shuffle
                else list(range(self.sizes[0]))
            )
        else:
            picked: list[int] = []
            for src, (size, count) in enumerate(zip(self.sizes, self.counts, strict=True)):
                picked += [self.starts[src] + i for i in self._take(src, size, count, epoch)]
            order = (
                [picked[i] for i in seeded_permutation(len(picked), self.seed * 100_003 + epoch)]
                if self.shuffle
                else picked
            )
        self._cache = (epoch, order)
        return order

    def _take(self, src: int, size: int, count: int, epoch: int) -> list[int]:
        """`count` indices of a source for this epoch: consecutive passes over it, each a fresh permutation.

        Pass p of source `src` is the same permutation whichever epoch reads it, so over epochs a source is
        read in full before any of its samples repeats.
        """
        if count == size and not self.shuffle:
            return list(range(size))
        first = epoch * count  # position of this epoch's share in the endless sequence of passes
        out: list[int] = []
        while len(out) < count:
            p, at = divmod(first + len(out), size)
            perm = (
                seeded_permutation(size, (self.seed * 1_000_003 + src) * 7919 + p)
                if self.shuffle
                else list(range(size))
            )
            out += perm[at : at + count - len(out)]
        return out


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights` (largest remainders), each at least 1."""
    norm = sum(weights)
    exact = [total * w / norm for w in weights]
    counts = [max(1, int(x)) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True):
        if sum(counts) >= total:
            break
        counts[i] += 1
    return counts
