"""Steps over tokenized samples held in memory (memory-mapped from the cache): `IndexedSamples` and
`PackedRows` (see steps.py). Which samples a step takes is the sampler's business (sampler.py), how they
become tensors the layout's (collate.py); nothing to save for a resume but the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sft.config import TrainConfig
from sft.data.collate import Batch, Item, RowsLayout, SamplesLayout
from sft.data.mixture import Mixture
from sft.data.sampler import RowSampler, Sampler, StepSampler
from sft.data.stats import DataStats
from sft.data.steps import PADDING_ESTIMATE_STEPS, Shown
from sft.data.store import ConcatStore
from sft.errors import SftError


@dataclass
class Corpus:
    """The training samples of every source as one indexed store, with their statistics and mixture."""

    store: ConcatStore
    stats: DataStats
    mixture: Mixture
    paths: list[str]

    def item(self, i: int) -> Item:
        return self.store.ids_labels(i)

    def shown(self, i: int) -> Shown:
        return (self.paths[self.store.locate(i)[0]], *self.item(i))

    def describe(
        self, sampler: Sampler, unit: str, layout: str, padding: float, rows: str, eval_samples: int
    ) -> str:
        lines = [
            f"train data: {self.stats.summary()}{rows}; {eval_samples} eval samples; {sampler.global_batch} {unit} "
            f"per step, {sampler.steps_per_epoch} steps per epoch, {sampler.dropped_per_epoch} {unit} left out "
            f"per epoch; {layout}, {padding:.1%} padding",
            *self.stats.template_notes(),
        ]
        if len(self.mixture.counts) > 1:
            shares = ", ".join(f"{p} {n}" for p, n in zip(self.paths, self.mixture.counts, strict=True))
            lines.append(f"  samples per epoch: {shares}")
        return "\n".join(lines + self.stats.report().splitlines()[1:])


S = TypeVar("S", bound=Sampler)


class _InMemory(Generic[S]):
    """What both in-memory modes share: the corpus, the sampler that cuts the steps, the step count, preview,
    the padding estimate, and nothing to save for a resume but the step."""

    def __init__(self, corpus: Corpus, sampler: S, have: str) -> None:
        if sampler.steps_per_epoch == 0:
            raise SftError(
                f"data: {have} do not fill one global batch of {sampler.global_batch} "
                "(micro_batch_size x grad_accum x processes); lower train.micro_batch_size or train.grad_accum"
            )
        self.corpus = corpus
        self.sampler = sampler

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def total_steps(self, epochs: int) -> int:
        return self.sampler.total_steps(epochs)

    def first_samples(self, n: int) -> list[Shown]:
        return [self.corpus.shown(i) for i in self.sampler.samples(0)[:n]]

    def padding_fraction(self, steps: int = PADDING_ESTIMATE_STEPS) -> float:
        real = total = 0
        for step in range(min(steps, self.steps_per_epoch)):
            step_real, step_slots = self._slots(step)
            real, total = real + step_real, total + step_slots
        return 1 - real / max(total, 1)

    def _slots(self, step: int) -> tuple[int, int]:
        """(real tokens, token slots) of this rank's micro-batches of `step`."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


class IndexedSamples(_InMemory[StepSampler]):
    """`train.micro_batch_size` samples per micro-batch, laid out padded or packed per step."""

    def __init__(
        self, corpus: Corpus, train: TrainConfig, layout: SamplesLayout, world_size: int, rank: int
    ) -> None:
        sampler = StepSampler(corpus.mixture, train, world_size, rank)
        super().__init__(corpus, sampler, f"{corpus.mixture.epoch_size} training samples")
        self.layout = layout

    def micro_batches(self, step: int) -> list[Batch]:
        return self.layout.batches(
            [[self.corpus.item(i) for i in mb] for mb in self.sampler.micro_batches(step)]
        )

    def _slots(self, step: int) -> tuple[int, int]:
        lengths = self.corpus.store.lengths
        groups = [[int(lengths[i]) for i in mb] for mb in self.sampler.micro_batches(step)]
        return sum(map(sum, groups)), self.layout.slots(groups)

    def describe(self, eval_samples: int) -> str:
        padding = self.padding_fraction()
        return self.corpus.describe(self.sampler, "samples", self.layout.name, padding, "", eval_samples)


class PackedRows(_InMemory[RowSampler]):
    """Each epoch's samples packed into rows of at most `capacity` tokens; `train.micro_batch_size` rows per
    micro-batch (`packing_mode: rows`)."""

    def __init__(
        self,
        corpus: Corpus,
        train: TrainConfig,
        rows: RowsLayout,
        capacity: int,
        window: int,
        world_size: int,
        rank: int,
    ) -> None:
        sampler = RowSampler(corpus.mixture, corpus.store.lengths, capacity, window, train, world_size, rank)
        super().__init__(corpus, sampler, f"{sampler.rows_in_epoch(0)} packed rows of {capacity} tokens")
        self.rows, self.capacity = rows, capacity

    def micro_batches(self, step: int) -> list[Batch]:
        return [
            self.rows.collate([[self.corpus.item(i) for i in row] for row in mb])
            for mb in self.sampler.micro_batches(step)
        ]

    def _slots(self, step: int) -> tuple[int, int]:
        lengths = self.corpus.store.lengths
        per_mb = [[[int(lengths[i]) for i in row] for row in mb] for mb in self.sampler.micro_batches(step)]
        return sum(sum(map(sum, rows)) for rows in per_mb), sum(self.rows.slots(rows) for rows in per_mb)

    def describe(self, eval_samples: int) -> str:
        rows = f"; {self.sampler.rows_in_epoch(0)} packed rows of <= {self.capacity} tokens"
        padding = self.padding_fraction()
        return self.corpus.describe(self.sampler, "rows", "packed rows", padding, rows, eval_samples)
