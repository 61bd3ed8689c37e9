"""The step sampler and mixtures: the samples of a global step do not depend on how the batch is split; the\norder is a pure function of (seed, epoch); ranks are disjoint and covering; resume needs only the step."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from sft.config import TrainConfig
from sft.data.indexed import IndexedSamples, PackedRows
from sft.data.mixture import Mixture
from sft.data.sampler import StepSampler
from tests.conftest import tiny_recipe


def sampler(
    num_samples: int, micro_batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int
) -> StepSampler:
    train = TrainConfig(micro_batch_size=micro_batch_size, grad_accum=grad_accum)
    return StepSampler(Mixture([num_samples], None, seed), train, world_size, rank)


def step_samples(sampler_args: dict[str, Any], world: int, step: int) -> list[int]:
    out: list[int] = []
    for rank in range(world):
        s = sampler(world_size=world, rank=rank, **sampler_args)
        for mb in s.micro_batches(step):
            out.extend(mb)
    return sorted(out)


def test_global_batch_is_the_same_whatever_the_split() -> None:
    for step in (0, 5, 13):  # 13 is in the second epoch
        a = step_samples({"num_samples": 100, "micro_batch_size": 8, "grad_accum": 1, "seed": 3}, 1, step)
        b = step_samples({"num_samples": 100, "micro_batch_size": 2, "grad_accum": 2, "seed": 3}, 2, step)
        c = step_samples({"num_samples": 100, "micro_batch_size": 1, "grad_accum": 8, "seed": 3}, 1, step)
        assert a == b == c and len(a) == 8


def test_order_is_a_function_of_seed_and_epoch_and_ranks_are_disjoint() -> None:
    s = sampler(num_samples=50, micro_batch_size=5, grad_accum=1, world_size=2, rank=0, seed=1)
    t = sampler(num_samples=50, micro_batch_size=5, grad_accum=1, world_size=2, rank=1, seed=1)
    assert s.steps_per_epoch == 5 and s.dropped_per_epoch == 0
    epoch0 = [i for k in range(5) for mb in s.micro_batches(k) + t.micro_batches(k) for i in mb]
    assert sorted(epoch0) == list(range(50))  # covering, no repeats within an epoch
    again = sampler(num_samples=50, micro_batch_size=5, grad_accum=1, world_size=2, rank=0, seed=1)
    assert [again.micro_batches(k) for k in range(7)] == [s.micro_batches(k) for k in range(7)]
    other = sampler(num_samples=50, micro_batch_size=5, grad_accum=1, world_size=2, rank=0, seed=2)
    assert other.micro_batches(0) != s.micro_batches(0)
    assert s.micro_batches(5) != s.micro_batches(0)  # a new epoch is a new permutation


# ---------------------------------------------------------------- mixtures


def test_concatenation_reads_every_source_once_per_epoch() -> None:
    m = Mixture([5, 3], None, seed=0)
    assert m.epoch_size == 8 and sorted(m.epoch_order(0)) == list(range(8))
    assert m.epoch_order(0) != m.epoch_order(1) and sorted(m.epoch_order(1)) == list(range(8))
    assert Mixture([5, 3], None, seed=0, shuffle=False).epoch_order(3) == list(range(8))


def test_weighted_mixture_is_proportional_deterministic_and_cycles_each_source() -> None:
    sizes = [100, 10]  # source 1 is small: upsampled; source 0 is downsampled
    m = Mixture(sizes, [1.0, 1.0], seed=4, epoch_size=60)
    assert m.counts == [30, 30] and m.epoch_size == 60
    order = m.epoch_order(0)
    assert order == Mixture(sizes, [1.0, 1.0], seed=4, epoch_size=60).epoch_order(0)  # fixed for a seed
    assert order != Mixture(sizes, [1.0, 1.0], seed=5, epoch_size=60).epoch_order(0)
    small = [i - 100 for i in order if i >= 100]
    assert Counter(small) == dict.fromkeys(range(10), 3)  # 3 full passes, each sample once per pass
    # the large source is read without repeats until all of it is used: epochs 0..2 take 90 distinct ones
    large = [
        i
        for e in range(3)
        for i in Mixture(sizes, [1.0, 1.0], seed=4, epoch_size=60).epoch_order(e)
        if i < 100
    ]
    assert len(large) == 90 and len(set(large)) == 90
    assert Mixture([10, 10, 10], [0.5, 0.3, 0.2], epoch_size=10).counts == [5, 3, 2]


@pytest.mark.parametrize("mode", ["rows", "batch"])
def test_pipeline_resume_mid_epoch_gives_the_very_next_batches(
    tiny_model_dir: Path, tmp_path: Path, tokenizer: Any, mode: str
) -> None:
    """Order is a pure function of (seed, epoch, step): a fresh pipeline asked for step k gives exactly what an
    uninterrupted one gives, for each rank, with packing and a weighted mixture; ranks are disjoint."""
    from sft.data.pipeline import DataPipeline

    def pipe(rank: int) -> DataPipeline:
        recipe = tiny_recipe(
            tiny_model_dir,
            tmp_path,
            data__train="[{path: 'builtin:jargon/train', weight: 3}, {path: 'builtin:jargon/eval', weight: 1}]",
            data__epoch_size=200,
            data__packing="true",
            data__packing_mode=mode,
            data__packing_window=64,
            train__grad_accum=2,
        )
        return DataPipeline(recipe, tokenizer, rank, 2)

    whole = [pipe(0), pipe(1)]
    spe = whole[0].steps.steps_per_epoch
    if mode == "batch":
        assert spe == 200 // (4 * 2 * 2)
    steps = list(range(spe + 3))  # into the second epoch
    run = [[w.micro_batches(k) for k in steps] for w in whole]
    for rank in (0, 1):
        resumed = pipe(rank)
        for k in (spe - 1, spe, spe + 2):
            for a, b in zip(resumed.micro_batches(k), run[rank][k], strict=True):
                assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # ranks take disjoint samples of each step, and together the global batch
    per_rank = [w.steps for w in whole]
    assert isinstance(per_rank[0], (IndexedSamples, PackedRows)) and isinstance(
        per_rank[1], (IndexedSamples, PackedRows)
    )
    s0, s1 = per_rank[0].sampler, per_rank[1].sampler
    for k in steps:
        mine, theirs = s0.samples(k), s1.samples(k)
        assert not set(mine) & set(theirs)
        if mode == "batch":
            assert len(mine) == len(theirs) == 8
        else:  # 8 rows each
            assert len(s0.micro_batches(k)[0]) == len(s1.micro_batches(k)[1]) == 4
    # the mixture's shares: 150 of the first source, 50 of the second per epoch
    assert per_rank[0].corpus.mixture.counts == [150, 50]
    assert "samples per epoch: builtin:jargon/train 150, builtin:jargon/eval 50" in whole[0].describe()
