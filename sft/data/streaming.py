"""Training rows read as a stream (`data.streaming: true`): for corpora that are not tokenized up front.

Each rank reads its own shard of every source (rows whose index % world_size == rank), in file order, and
tokenizes only those. Sources are read one after the other (concatenation) or interleaved by weight (each
draw picks a source with probability proportional to its weight, from a counter-based generator, so the
sequence of picks is a pure function of the seed). A source that ends starts its next pass.

The position (per source: the row being read, how many of its samples are used, which pass; and the number
of draws) is small JSON, saved with each checkpoint: a resumed run reopens each source at that row and
continues with the very next sample, without tokenizing what came before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from sft.config import DataConfig, DataSource
from sft.data.chat import Sample
from sft.data.prepare import RowTokenizer
from sft.data.sources import RowSource, open_source
from sft.data.stats import DataStats
from sft.errors import SftError


def _uniform(seed: int, draw: int) -> float:
    digest = hashlib.sha256(f"{seed}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class StreamReader:
    def __init__(
        self, specs: list[DataSource], tokenizer: Any, data: DataConfig, seed: int, rank: int, world_size: int
    ) -> None:
        self.sources: list[RowSource] = [open_source(s) for s in specs]
        self.tokenizers = [RowTokenizer(s, tokenizer, data) for s in specs]
        self.stats = DataStats([rt.stats for rt in self.tokenizers])
        weights = [s.weight for s in specs]
        self.weights: list[float] | None = None if weights[0] is None else [float(w or 0) for w in weights]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position: dict[str, Any] = {
            "draws": 0,
            "current": 0,  # the source being read (concatenation)
            "sources": [{"row": 0, "used": 0, "pass": 0} for _ in specs],
        }
        self._iters: list[Iterator[tuple[int, int, Sample]] | None] = [None] * len(specs)

    # ---- position

    def state_dict(self) -> dict[str, Any]:
        return {
            "draws": self.position["draws"],
            "current": self.position["current"],
            "sources": [dict(s) for s in self.position["sources"]],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.sources):
            raise SftError(
                "data: the checkpoint's stream position is for a different list of data.train sources"
            )
        self.position = {
            "draws": state["draws"],
            "current": state["current"],
            "sources": [dict(s) for s in state["sources"]],
        }
        self._iters = [None] * len(self.sources)

    # ---- reading

    def take(self, n: int) -> list[Sample]:
        return [self.next_sample() for _ in range(n)]

    def next_sample(self) -> Sample:
        if self.weights is None:
            return self._next_concatenated()
        u = _uniform(self.seed, self.position["draws"]) * sum(self.weights)
        self.position["draws"] += 1
        src = 0
        while src < len(self.weights) - 1 and u >= self.weights[src]:
            u -= self.weights[src]
            src += 1
        return self._next_from(src, restart=True)  # type: ignore[return-value]

    def _next_concatenated(self) -> Sample:
        tried = 0
        while True:
            src = self.position["current"]
            sample = self._next_from(src, restart=False)
            if sample is not None:
                return sample
            # this source is done for this pass: on to the next one (after the last, a new pass of all)
            self.position["current"] = (src + 1) % len(self.sources)
            tried += 1
            if tried > len(self.sources):
                raise SftError(f"data: the training sources give rank {self.rank} no usable samples")

    def _next_from(self, src: int, restart: bool) -> Sample | None:
        """The next sample of source `src`; at its end, start its next pass (restart) or return None."""
        pos = self.position["sources"][src]
        for attempt in range(2):
            it = self._iters[src]
            if it is None:
                it = self._iters[src] = self._samples(src, pos["row"], pos["used"])
            for row, j, sample in it:
                pos["row"], pos["used"] = row, j + 1
                return sample
            # end of this source's shard: next pass from its first row
            pos.update(row=0, used=0, **{"pass": pos["pass"] + 1})
            self._iters[src] = None
            if not restart:
                return None
            if attempt == 1:
                break
        raise SftError(
            f"data: {self.sources[src].name} gives rank {self.rank} of {self.world_size} no usable samples "
            "(too few rows for this many processes, or every row is bad)"
        )

    def _samples(self, src: int, row: int, used: int) -> Iterator[tuple[int, int, Sample]]:
        """(row index, sample number within the row, sample) of this rank's shard from `row` on, leaving out
        the first `used` samples of that row (already trained before a resume)."""
        rt = self.tokenizers[src]
        for r in self.sources[src].rows(start=row, every=self.world_size, offset=self.rank, streaming=True):
            for j, sample in enumerate(rt.samples(r)):
                if r.number == row and j < used:
                    continue
                yield r.number, j, sample
