"""What the training loop sees of the data: micro-batches for a step, eval batches, and statistics.

The loop asks only `micro_batches(step)` and `eval_batches()`; how rows are read, formatted, tokenized,
packed and ordered stays behind this seam.
"""

from __future__ import annotations

from typing import Any

import torch

from sft.config import Recipe
from sft.data import DataStats, load_samples
from sft.data.chat import Sample
from sft.data.collate import pad_collate
from sft.data.sampler import StepSampler
from sft.errors import SftError


class DataPipeline:
    def __init__(self, recipe: Recipe, tokenizer: Any, rank: int = 0, world_size: int = 1) -> None:
        t = recipe.train
        self.recipe = recipe
        self.rank, self.world_size = rank, world_size
        self.pad_id: int = tokenizer.pad_token_id
        self.train_samples, self.train_stats = load_samples(recipe.data.train, tokenizer, recipe.data)
        self.eval_samples: list[Sample] = []
        self.eval_stats: DataStats | None = None
        if recipe.data.eval:
            self.eval_samples, self.eval_stats = load_samples(recipe.data.eval, tokenizer, recipe.data)
        self.sampler = StepSampler(
            len(self.train_samples),
            t.micro_batch_size,
            t.grad_accum,
            world_size,
            rank,
            recipe.seed,
            recipe.data.shuffle,
        )
        if self.sampler.steps_per_epoch == 0:
            raise SftError(
                f"data: {len(self.train_samples)} training samples do not fill one global batch of "
                f"{self.sampler.global_batch} (micro_batch_size x grad_accum x processes); "
                "lower train.micro_batch_size or train.grad_accum"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def describe(self) -> str:
        s = self.sampler
        return (
            f"train data: {self.train_stats.summary()}; {len(self.eval_samples)} eval samples; "
            f"{s.global_batch} samples per step, {s.steps_per_epoch} steps per epoch, "
            f"{s.dropped_per_epoch} samples left out per epoch"
        )

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for optimizer step `step` (0-based), on the CPU."""
        return [
            self._collate([self.train_samples[i] for i in idx]) for idx in self.sampler.micro_batches(step)
        ]

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the eval set (every rank gets a disjoint slice)."""
        mine = self.eval_samples[self.rank :: self.world_size]
        size = self.recipe.eval.batch_size
        chunks = [mine[i : i + size] for i in range(0, len(mine), size)]
        return [self._collate(c) for c in chunks[: self.recipe.eval.max_batches]]

    def _collate(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        return pad_collate(samples, self.pad_id)
