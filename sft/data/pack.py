"""Packing: group one step's samples into rows of at most `capacity` tokens, and the rows into micro-batches.

A micro-batch is as wide as its longest row, so what counts is the token slots (rows x width), not the
number of rows. Best-fit decreasing, the classic choice, fills rows to the brim and leaves the last one short;
on the few dozen samples of one step that short row is mostly padding (19% on the built-in chat data at 512
tokens, 8 samples a step). Worst-fit decreasing over a fixed number of rows (longest first, each sample into
the emptiest row) gives rows of nearly equal length instead (5%). We try best-fit decreasing and worst-fit
decreasing over the fewest rows the tokens need and a few more, and keep the layout with the fewest slots
(bench/bench_data.py has the numbers). All of it is deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

EXTRA_ROW_COUNTS = 3  # row counts tried beyond the minimum


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each sample into the fullest row it fits in."""
    rows: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        best = -1
        for r, load in enumerate(loads):
            if load + lengths[i] <= capacity and (best < 0 or load > loads[best]):
                best = r
        if best < 0:
            rows.append([])
            loads.append(0)
        rows[best].append(i)
        loads[best] += lengths[i]
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


def slots(parts: list[list[list[int]]], lengths: Sequence[int], multiple_of: int = 8) -> int:
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
