"""The step sampler: the samples of a global step do not depend on how the batch is split."""

from __future__ import annotations

from sft.data.sampler import StepSampler


def step_samples(sampler_args: dict[str, int], world: int, step: int) -> list[int]:
    out: list[int] = []
    for rank in range(world):
        s = StepSampler(world_size=world, rank=rank, **sampler_args)
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
    s = StepSampler(num_samples=50, micro_batch_size=5, grad_accum=1, world_size=2, rank=0, seed=1)
    t = StepSampler(num_samples=50, micro_batch_size=5, grad_accum=1, world_size=2, rank=1, seed=1)
    assert s.steps_per_epoch == 5 and s.dropped_per_epoch == 0
    epoch0 = [i for k in range(5) for mb in s.micro_batches(k) + t.micro_batches(k) for i in mb]
    assert sorted(epoch0) == list(range(50))  # covering, no repeats within an epoch
    again = StepSampler(num_samples=50, micro_batch_size=5, grad_accum=1, world_size=2, rank=0, seed=1)
    assert [again.micro_batches(k) for k in range(7)] == [s.micro_batches(k) for k in range(7)]
    other = StepSampler(num_samples=50, micro_batch_size=5, grad_accum=1, world_size=2, rank=0, seed=2)
    assert other.micro_batches(0) != s.micro_batches(0)
    assert s.micro_batches(5) != s.micro_batches(0)  # a new epoch is a new permutation
