"""Each merge method against results worked out by hand on small tensors, edge cases included."""

from __future__ import annotations

import math

import pytest
import torch

from sft.merge import methods

T = torch.tensor


def close(a: torch.Tensor, b: list[float] | torch.Tensor, tol: float = 1e-6) -> None:
    b = b if isinstance(b, torch.Tensor) else T(b)
    assert a.shape == b.shape and torch.allclose(a, b.to(a.dtype), atol=tol, rtol=0), (a, b)


# ---------------------------------------------------------------- linear and task arithmetic


def test_linear_weighted_mean_and_sum() -> None:
    a, b = T([1.0, 2.0]), T([3.0, 6.0])
    close(methods.linear([a, b], [1, 3], normalize=True), [2.5, 5.0])  # (1·1 + 3·3) / 4, (2 + 18) / 4
    close(methods.linear([a, b], [1, 3], normalize=False), [10.0, 20.0])
    close(methods.linear([a, b], [0.5, 0.5], normalize=False), [2.0, 4.0])


def test_task_arithmetic() -> None:
    base = T([1.0, 1.0, 1.0])
    m1, m2 = T([2.0, 1.0, 0.0]), T([1.0, 3.0, 1.0])  # τ1 = [1, 0, -1], τ2 = [0, 2, 0]
    close(methods.task_arithmetic(base, [m1, m2], [1, 0.5], 1.0, False), [2.0, 2.0, 0.0])
    close(methods.task_arithmetic(base, [m1, m2], [1, 0.5], 2.0, False), [3.0, 3.0, -1.0])
    close(
        methods.task_arithmetic(base, [m1, m2], [1, 0.5], 1.0, True), [1 + 1 / 1.5, 1 + 1 / 1.5, 1 - 1 / 1.5]
    )


def test_task_arithmetic_of_all_zero_task_vectors_is_the_base() -> None:
    base = torch.randn(4, 3)
    out = methods.task_arithmetic(base, [base.clone(), base.clone()], [1, 2], 3.0, False)
    assert torch.equal(out, base)


# ---------------------------------------------------------------- TIES

# τ1 keeps 4, -3, 2, 1 at density 4/6; τ2 keeps -1, -2, 3, -5 (the four largest magnitudes of each).
TAU1 = [4.0, -3.0, 2.0, 1.0, 0.5, -0.1]
TAU2 = [-1.0, -2.0, 3.0, -5.0, 0.2, 0.3]


def test_trim_by_magnitude() -> None:
    close(methods.trim_by_magnitude(T(TAU1), 4 / 6), [4.0, -3.0, 2.0, 1.0, 0.0, 0.0])
    close(methods.trim_by_magnitude(T(TAU2), 4 / 6), [-1.0, -2.0, 3.0, -5.0, 0.0, 0.0])
    close(methods.trim_by_magnitude(T(TAU1), 0.0), [0.0] * 6)
    x = T(TAU1)
    assert methods.trim_by_magnitude(x, 1.0) is x  # density 1.0 keeps everything, untouched


def test_ties_by_hand() -> None:
    base = torch.ones(6)
    m1, m2 = base + T(TAU1), base + T(TAU2)
    # Trimmed sums [3, -5, 5, -4, 0, 0] elect signs [+, -, +, -, 0, 0]; disjoint means: element 0 only τ1
    # agrees (4), element 1 both (-2.5), element 2 both (2.5), element 3 only τ2 (-5), the rest nothing (0).
    expected = base + T([4.0, -2.5, 2.5, -5.0, 0.0, 0.0])
    close(methods.ties(base, [m1, m2], [1, 1], [4 / 6, 4 / 6], 1.0, True), expected)
    # Without normalize the agreeing entries are summed; scale multiplies the merged task vector.
    close(
        methods.ties(base, [m1, m2], [1, 1], [4 / 6, 4 / 6], 1.0, False),
        base + T([4.0, -5.0, 5.0, -5.0, 0, 0]),
    )
    close(
        methods.ties(base, [m1, m2], [1, 1], [4 / 6, 4 / 6], 0.5, True),
        base + T([2.0, -1.25, 1.25, -2.5, 0, 0]),
    )


def test_ties_weighted() -> None:
    base = torch.zeros(6)
    # Weighted τ: [8, -6, 4, 2, 0, 0] and [-1, -2, 3, -5, 0, 0]; signs of the sum [+, -, +, -];
    # element 1: (-6 - 2) / (2 + 1); element 2: (4 + 3) / 3; element 3: only τ2 agrees: -5 / 1.
    out = methods.ties(base, [T(TAU1), T(TAU2)], [2, 1], [4 / 6, 4 / 6], 1.0, True)
    close(out, [4.0, -8 / 3, 7 / 3, -5.0, 0.0, 0.0])


def test_ties_density_one_keeps_everything() -> None:
    base = torch.zeros(6)
    out = methods.ties(base, [T(TAU1), T(TAU2)], [1, 1], [1.0, 1.0], 1.0, True)
    # Signs of [3, -5, 5, -4, 0.7, 0.2]; element 4: (0.5 + 0.2) / 2; element 5: only τ2 (0.3) agrees.
    close(out, [4.0, -2.5, 2.5, -5.0, 0.35, 0.3])


def test_ties_of_all_zero_task_vectors_is_the_base() -> None:
    base = torch.randn(3, 5)
    for normalize in (True, False):
        out = methods.ties(base, [base.clone(), base.clone()], [1, 1], [0.5, 0.5], 1.0, normalize)
        assert torch.equal(out, base)
        assert torch.isfinite(out).all()


def test_ties_single_model_density_one_is_the_model() -> None:
    base, model = torch.randn(7), torch.randn(7)
    close(methods.ties(base, [model], [1], [1.0], 1.0, True), model, tol=1e-6)


# ---------------------------------------------------------------- DARE


def test_dare_drop_keeps_or_rescales() -> None:
    delta = torch.randn(200_000)
    out = methods.dare_drop(delta, 0.3, methods.seeded_generator(0, 0, "w"))
    kept = out != 0
    # Every entry is dropped (0) or rescaled by 1/density; about density of them are kept.
    assert torch.allclose(out[kept], delta[kept] / 0.3)
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    # The rescale keeps the expected sum: E[out] = delta.
    assert abs(out.sum().item() - delta.sum().item()) < 0.05 * delta.abs().sum().item()


def test_dare_is_seeded_per_model_and_tensor() -> None:
    delta = torch.randn(1000)

    def run(seed: int, i: int, name: str) -> torch.Tensor:
        return methods.dare_drop(delta, 0.5, methods.seeded_generator(seed, i, name))

    assert torch.equal(run(1, 0, "a"), run(1, 0, "a"))
    assert not torch.equal(run(1, 0, "a"), run(2, 0, "a"))
    assert not torch.equal(run(1, 0, "a"), run(1, 1, "a"))
    assert not torch.equal(run(1, 0, "a"), run(1, 0, "b"))


def test_dare_linear_by_hand() -> None:
    base = T([1.0, 1.0, 1.0, 1.0])
    m1, m2 = T([3.0, 1.0, 5.0, 1.0]), T([1.0, -1.0, 1.0, 2.0])  # τ1 = [2, 0, 4, 0], τ2 = [0, -2, 0, 1]
    gens = [methods.seeded_generator(7, i, "x") for i in range(2)]
    masks = [
        torch.empty(4, dtype=torch.bool).bernoulli_(0.5, generator=methods.seeded_generator(7, i, "x"))
        for i in range(2)
    ]
    out = methods.dare(base, [m1, m2], [1.0, 0.5], [0.5, 0.5], 1.0, False, gens, consensus=False)
    expected = base + masks[0] * T([2.0, 0, 4, 0]) / 0.5 * 1.0 + masks[1] * T([0, -2.0, 0, 1]) / 0.5 * 0.5
    close(out, expected)


def test_dare_density_one_is_task_arithmetic_and_ties() -> None:
    base, m1, m2 = torch.randn(50), torch.randn(50), torch.randn(50)
    gens = [methods.seeded_generator(0, i, "t") for i in range(2)]
    close(
        methods.dare(base, [m1, m2], [0.7, 0.3], [1.0, 1.0], 1.5, False, gens, consensus=False),
        methods.task_arithmetic(base, [m1, m2], [0.7, 0.3], 1.5, False),
        tol=1e-5,
    )
    close(
        methods.dare(base, [m1, m2], [1, 1], [1.0, 1.0], 1.0, True, gens, consensus=True),
        methods.ties(base, [m1, m2], [1, 1], [1.0, 1.0], 1.0, True),
        tol=1e-6,
    )


def test_dare_of_all_zero_task_vectors_is_the_base() -> None:
    base = torch.randn(10)
    gens = [methods.seeded_generator(0, i, "z") for i in range(2)]
    for consensus in (False, True):
        out = methods.dare(base, [base.clone(), base.clone()], [1, 1], [0.3, 0.3], 1.0, True, gens, consensus)
        assert torch.equal(out, base)


# ---------------------------------------------------------------- SLERP


def test_slerp_orthogonal_unit_vectors() -> None:
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    close(methods.slerp(a, b, 0.5), [math.sqrt(0.5), math.sqrt(0.5)])
    close(methods.slerp(a, b, 1 / 3), [math.cos(math.pi / 6), math.sin(math.pi / 6)])  # a third of 90°
    close(methods.slerp(a, b, 0.0), a)
    close(methods.slerp(a, b, 1.0), b)


def test_slerp_keeps_the_norm_of_equal_norm_vectors() -> None:
    a, b = T([2.0, 0.0]), T([0.0, 2.0])
    close(methods.slerp(a, b, 0.5), [math.sqrt(2), math.sqrt(2)])
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    b = b / b.norm() * a.norm()
    assert abs(methods.slerp(a, b, 0.3).norm().item() - a.norm().item()) < 1e-5


def test_slerp_parallel_antiparallel_and_zero_fall_back_to_lerp() -> None:
    close(methods.slerp(T([1.0, 2.0]), T([2.0, 4.0]), 0.25), [1.25, 2.5])  # parallel: lerp
    close(methods.slerp(T([1.0, 0.0]), T([-1.0, 0.0]), 0.5), [0.0, 0.0])  # antiparallel: lerp
    close(methods.slerp(T([0.0, 0.0]), T([3.0, 1.0]), 0.5), [1.5, 0.5])  # zero vector: lerp
    x = torch.randn(5)
    close(methods.slerp(x, x.clone(), 0.7), x)  # identical tensors stay put


def test_slerp_shape_and_dtype() -> None:
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    out = methods.slerp(a, b, 0.4)
    assert out.shape == (4, 6) and out.dtype == torch.float32


@pytest.mark.parametrize(
    ("values", "position", "expected"),
    [
        ([0.3], 0.9, 0.3),
        ([0.0, 1.0], 0.5, 0.5),
        ([0.0, 0.5, 1.0], 0.25, 0.25),
        ([0.0, 1.0, 0.0], 0.5, 1.0),
        ([0.0, 1.0, 0.0], 1.0, 0.0),
    ],
)
def test_layer_gradient(values: list[float], position: float, expected: float) -> None:
    assert methods.interpolate_list(values, position) == pytest.approx(expected)
