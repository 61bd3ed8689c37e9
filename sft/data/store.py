"""Tokenized samples in three flat arrays (token ids, trained flags, offsets): compact in memory, saved as
plain .npy files (no pickle), and memory-mapped when loaded from the cache."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sft.data.chat import IGNORE_INDEX, Sample

FILES = ("ids", "trained", "offsets")


class TokenStore:
    def __init__(self, ids: np.ndarray, trained: np.ndarray, offsets: np.ndarray) -> None:
        self.ids, self.trained, self.offsets = ids, trained, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def ids_labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and aligned labels (IGNORE_INDEX where untrained) of sample i, as int64."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = np.asarray(self.ids[a:b], dtype=np.int64)
        return ids, np.where(self.trained[a:b], ids, IGNORE_INDEX)

    def sample(self, i: int) -> Sample:
        ids, labels = self.ids_labels(i)
        return Sample(ids.tolist(), labels.tolist())

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            np.save(folder / f"{name}.npy", getattr(self, name), allow_pickle=False)

    @classmethod
    def load(cls, folder: Path) -> TokenStore:
        arrays = [np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in FILES]
        return cls(*arrays)


class StoreBuilder:
    """Appends samples into compact arrays (a Python list of ints would take ~9x the memory)."""

    def __init__(self) -> None:
        self.ids = array("i")
        self.trained = array("b")
        self.offsets = array("q", [0])

    def add(self, s: Sample) -> None:
        self.ids.extend(s.input_ids)
        self.trained.extend(t != IGNORE_INDEX for t in s.labels)
        self.offsets.append(len(self.ids))

    def build(self) -> TokenStore:
        return TokenStore(
            np.frombuffer(self.ids, dtype=np.int32).copy(),
            np.frombuffer(self.trained, dtype=np.int8).astype(bool),
            np.frombuffer(self.offsets, dtype=np.int64).copy(),
        )


class ConcatStore:
    """Several sources' stores seen as one: global index = offset of the source + index within it."""

    def __init__(self, stores: Sequence[TokenStore]) -> None:
        self.stores = list(stores)
        self.sizes = [len(s) for s in self.stores]
        self.starts = np.cumsum([0, *self.sizes])
        self.lengths = np.concatenate([s.lengths for s in self.stores]) if self.stores else np.zeros(0, int)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __bool__(self) -> bool:
        return len(self) > 0

    def locate(self, i: int) -> tuple[int, int]:
        src = int(np.searchsorted(self.starts, i, side="right")) - 1
        return src, i - int(self.starts[src])

    def ids_labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        src, j = self.locate(i)
        return self.stores[src].ids_labels(j)

    def sample(self, i: int) -> Sample:
        src, j = self.locate(i)
        return self.stores[src].sample(j)
