"""Packing: samples into rows of at most `capacity` tokens, with no sample split and none attending another.

Two layouts (`data.packing_mode`):

- rows (the default): the samples of an epoch, in the sampler's order, are packed a window at a time into
  rows as full as they go (best-fit decreasing: longest first, each into the fullest row it fits in), and a
  step takes `micro_batch_size` rows per micro-batch. Within a window of a few thousand samples the rows
  come out all but full (under 1% padding on the built-in chat data); the window keeps the epoch's order
  local and the memory small.
- batch: a step trains exactly the samples an unpacked run would; they are packed among themselves only.
  A micro-batch is as wide as its longest row, so what counts is the token slots (rows x width). On the few
  dozen samples of one step best-fit decreasing leaves its last row short, which is then mostly padding
  (19% on the built-in data at 512 tokens, 8 samples a step); worst-fit decreasing over a fixed number of
  rows (each sample into the emptiest row) gives rows of nearly equal length instead (5%). `pack` tries both
  over the fewest rows the tokens need and a few more, and keeps the layout with the fewest slots.

All of it is deterministic (bench/bench_data.py has the numbers).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence

import numpy as np

EXTRA_ROW_COUNTS = 3  # row counts tried beyond the minimum


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each sample into the fullest row it fits in (the first such row
    on a tie). O(n log n) plus list inserts: rows are kept sorted by free space."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), ascending
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[i], -1))  # the least free space that still fits
        if at == len(free):
            r, room = len(rows), capacity
            rows.append([])
        else:
            room, r = free.pop(at)
        rows[r].append(i)
        bisect.insort(free, (room - lengths[i], r))
    return rows


def pack_in_windows(lengths: Sequence[int], capacity: int, window: int) -> list[list[int]]:
    """Indices into `lengths` packed into full rows, `window` consecutive samples at a time (rows mode)."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit in a row of {capacity}")
    rows: list[list[int]] = []
    for start in range(0, len(lengths), window):
        part = lengths[start : start + window]
        rows += [[start + i for i in row] for row in best_fit(part, capacity)]
    return rows


def fill_rows(lengths: Sequence[int], capacity: int, n_rows: int) -> list[list[int]]:
    """Worst-fit decreasing into `n_rows` rows (more when a sample fits nowhere). Deterministic."""
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    heap = [(0, r) for r in range(n_rows)]  # (load, row): the emptiest row on top
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, r = heap[0]
        if load + lengths[i] > capacity:  # fits in no row: open one
            r, load = len(rows), 0
            rows.append([])
        else:
            heapq.heappop(heap)
        rows[r].append(i)
        heapq.heappush(heap, (load + lengths[i], r))
    return rows


def deal(rows: list[list[int]], groups: int) -> list[list[list[int]]]:
    """Split rows into `groups` micro-batches of (nearly) equal row counts, in order."""
    return [rows[g::groups] for g in range(groups)]


def slots(parts: list[list[list[int]]], lengths: Sequence[int] | np.ndarray, multiple_of: int = 8) -> int:
    """Token slots (real + padding) of micro-batches of packed rows."""
    total = 0
    for part in parts:
        longest = max(sum(lengths[i] for i in row) for row in part)
        total += len(part) * -(-longest // multiple_of) * multiple_of
    return total


def pack(
    lengths: Sequence[int], capacity: int, groups: int = 1, multiple_of: int = 8
) -> list[list[list[int]]]:
    """Indices into `lengths` as `groups` micro-batches of rows, each row's lengths summing to at most
    `capacity`; every micro-batch gets at least one row (given at least `groups` samples)."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit in a row of {capacity}")
    if len(lengths) < groups:
        raise ValueError(f"{len(lengths)} samples cannot fill {groups} micro-batches")
    fewest = max(-(-sum(lengths) // capacity), groups)
    candidates = [
        fill_rows(lengths, capacity, n)
        for n in range(fewest, min(len(lengths), fewest + EXTRA_ROW_COUNTS) + 1)
    ]
    bfd = best_fit(lengths, capacity)
    if len(bfd) >= groups:
        candidates.append(bfd)
    layouts = [deal(rows, groups) for rows in candidates]
    return min(layouts, key=lambda parts: slots(parts, lengths, multiple_of))
