"""Each merge method against results worked out by hand on small tensors, edge cases included."""

from __future__ import annotations

import math

import pytest
import torch

from sft.merge import methods, params

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
    for semantics in ("mergekit", "paper"):
        # 0.65 · 6 = 3.9: int() gives 3 (mergekit), round() 4 (paper)
        kept = 3 if semantics == "mergekit" else 4
        close(
            methods.trim_by_magnitude(T(TAU1), 0.65, semantics),
            [4.0, -3.0, 2.0, 1.0, 0.0, 0.0][:kept] + [0.0] * (6 - kept),
        )
        close(methods.trim_by_magnitude(T(TAU1), 0.0, semantics), [0.0] * 6)
        x = T(TAU1)
        assert methods.trim_by_magnitude(x, 1.0, semantics) is x  # density 1.0 keeps everything, untouched
    close(methods.trim_by_magnitude(T(TAU2), 0.7), [-1.0, -2.0, 3.0, -5.0, 0.0, 0.0])  # int(4.2) = 4


def test_trim_kept_count_mergekit_vs_paper() -> None:
    # mergekit keeps max(1, int(density · n)); the paper rounds (and a tiny density may keep nothing).
    assert methods.kept_count(25, 0.55, "mergekit") == 13 and methods.kept_count(25, 0.55, "paper") == 14
    assert methods.kept_count(10, 0.01, "mergekit") == 1 and methods.kept_count(10, 0.01, "paper") == 0
    x = T([0.5, -3.0, 0.2, 0.1, 0.3, 0.05, 0.4, 0.6, 0.7, 0.8])
    assert int((methods.trim_by_magnitude(x, 0.01, "mergekit") != 0).sum()) == 1
    assert int((methods.trim_by_magnitude(x, 0.01, "paper") != 0).sum()) == 0


def test_trim_ties_at_the_threshold() -> None:
    # Five entries share the 2nd-largest magnitude; density 0.4 of 8 keeps 3.
    x = T([5.0, 1.0, -1.0, 1.0, 0.5, -1.0, 1.0, 0.25])
    paper = methods.trim_by_magnitude(x, 0.4, "paper")
    assert torch.equal(paper, T([5.0, 1.0, -1.0, 1.0, 0.0, -1.0, 1.0, 0.0]))  # every tie kept: 6 entries
    ours = methods.trim_by_magnitude(x, 0.4, "mergekit")
    assert int((ours != 0).sum()) == 3 and ours[0] == 5.0  # exactly k, the largest always among them
    # the ones kept are those of torch's descending argsort, which mergekit takes
    want = torch.zeros(8, dtype=torch.bool)
    want[torch.argsort(x.abs(), descending=True)[:3]] = True
    assert torch.equal(ours != 0, want)


D = 0.7  # keeps 4 of 6 entries under both semantics (int(4.2) = round(4.2) = 4)


def test_ties_by_hand() -> None:
    base = torch.ones(6)
    m1, m2 = base + T(TAU1), base + T(TAU2)
    # Trimmed sums [3, -5, 5, -4, 0, 0] elect signs [+, -, +, -, ., .]; disjoint means: element 0 only τ1
    # agrees (4), element 1 both (-2.5), element 2 both (2.5), element 3 only τ2 (-5), the rest nothing (0).
    for semantics in ("mergekit", "paper"):
        expected = base + T([4.0, -2.5, 2.5, -5.0, 0.0, 0.0])
        close(methods.ties(base, [m1, m2], [1, 1], [D, D], 1.0, True, semantics), expected)
        # Without normalize the agreeing entries are summed; scale multiplies the merged task vector.
        close(
            methods.ties(base, [m1, m2], [1, 1], [D, D], 1.0, False, semantics),
            base + T([4.0, -5.0, 5.0, -5.0, 0, 0]),
        )
        close(
            methods.ties(base, [m1, m2], [1, 1], [D, D], 0.5, True, semantics),
            base + T([2.0, -1.25, 1.25, -2.5, 0, 0]),
        )


def test_ties_exact_cancellation_mergekit_vs_paper() -> None:
    # τ1 = -τ2 on element 0 (sum exactly 0), agreeing elsewhere.
    base = torch.zeros(3)
    t1, t2 = T([0.5, 1.0, -1.0]), T([-0.5, 1.0, -3.0])
    # mergekit elects + for a zero sum: τ1's 0.5 agrees and is the disjoint mean there.
    close(methods.ties(base, [t1, t2], [1, 1], [1.0, 1.0], 1.0, True, "mergekit"), [0.5, 1.0, -2.0])
    # the paper's sign of 0 is 0: nothing agrees, the base (0) is kept.
    close(methods.ties(base, [t1, t2], [1, 1], [1.0, 1.0], 1.0, True, "paper"), [0.0, 1.0, -2.0])


def test_ties_weighted() -> None:
    base = torch.zeros(6)
    # Weighted τ: [8, -6, 4, 2, 0, 0] and [-1, -2, 3, -5, 0, 0]; signs of the sum [+, -, +, -];
    # element 1: (-6 - 2) / (2 + 1); element 2: (4 + 3) / 3; element 3: only τ2 agrees: -5 / 1.
    out = methods.ties(base, [T(TAU1), T(TAU2)], [2, 1], [D, D], 1.0, True)
    close(out, [4.0, -8 / 3, 7 / 3, -5.0, 0.0, 0.0])


def test_ties_density_one_keeps_everything() -> None:
    base = torch.zeros(6)
    out = methods.ties(base, [T(TAU1), T(TAU2)], [1, 1], [1.0, 1.0], 1.0, True)
    # Signs of [3, -5, 5, -4, 0.7, 0.2]; element 4: (0.5 + 0.2) / 2; element 5: only τ2 (0.3) agrees.
    close(out, [4.0, -2.5, 2.5, -5.0, 0.35, 0.3])


def test_ties_of_all_zero_task_vectors_is_the_base() -> None:
    base = torch.randn(3, 5)
    for normalize in (True, False):
        for semantics in ("mergekit", "paper"):
            out = methods.ties(
                base, [base.clone(), base.clone()], [1, 1], [0.5, 0.5], 1.0, normalize, semantics
            )
            assert torch.equal(out, base)
            assert torch.isfinite(out).all()


def test_ties_single_model_density_one_is_the_model() -> None:
    base, model = torch.randn(7), torch.randn(7)
    close(methods.ties(base, [model], [1], [1.0], 1.0, True), model, tol=1e-6)


# ---------------------------------------------------------------- DARE


def test_dare_drop_keeps_or_rescales() -> None:
    delta = torch.randn(200_000)
    gen = methods.seeded_generator(0, 0, "w")
    # paper: every entry is dropped (0) or rescaled by 1/density; about density of them are kept.
    out = methods.dare_drop(delta, 0.3, gen, semantics="paper")
    kept = out != 0
    assert torch.allclose(out[kept], delta[kept] / 0.3)
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    # The rescale keeps the expected sum: E[out] = delta.
    assert abs(out.sum().item() - delta.sum().item()) < 0.05 * delta.abs().sum().item()
    # mergekit: one factor per tensor, which gives back the task vector's L1 norm exactly.
    out = methods.dare_drop(delta, 0.3, methods.seeded_generator(0, 0, "w"))
    assert torch.equal(out != 0, kept)  # the same mask from the same seed
    factor = (out[kept] / delta[kept]).unique()
    assert torch.allclose(factor, factor[:1]) and abs(factor[0].item() - 1 / 0.3) < 0.05
    assert torch.allclose(out.abs().sum(), delta.abs().sum(), rtol=1e-5)
    # rescale off: the kept entries are untouched
    out = methods.dare_drop(delta, 0.3, methods.seeded_generator(0, 0, "w"), rescale=False)
    assert torch.equal(out[kept], delta[kept]) and not out[~kept].any()


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
    out = methods.dare(
        base, [m1, m2], [1.0, 0.5], [0.5, 0.5], 1.0, False, gens, consensus=False, semantics="paper"
    )
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


def test_slerp_parallel_and_antiparallel_fall_back_to_lerp() -> None:
    close(methods.slerp(T([1.0, 2.0]), T([2.0, 4.0]), 0.25), [1.25, 2.5])  # parallel: lerp
    close(methods.slerp(T([1.0, 0.0]), T([-1.0, 0.0]), 0.5), [0.0, 0.0])  # antiparallel: lerp
    # a zero vector counts as orthogonal (mergekit): Ω = 90°, so t = 0.5 gives sin(45°) of the other
    close(methods.slerp(T([0.0, 0.0]), T([3.0, 1.0]), 0.5), [3 * math.sqrt(0.5), math.sqrt(0.5)])
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
    assert params.interpolate(values, position) == pytest.approx(expected)


def test_settings_gradients_and_filters() -> None:
    assert params.position("model.layers.0.mlp.up_proj.weight", 4) == 0.0
    assert params.position("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert params.position("model.layers.0.mlp.up_proj.weight", 1) == 1.0  # a single layer sits at 1
    for outside in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert params.position(outside, 8) == 0.0  # mergekit: the first anchor
    cond = [
        params.Conditional(filter="self_attn", value=[0.0, 1.0]),
        params.Conditional(filter="mlp", value=0.25),
    ]
    assert params.resolve(cond, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.5
    assert params.resolve(cond, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.25
    assert params.resolve(cond, "lm_head.weight", 0.0) is None  # no filter matches: the caller's default
    assert params.resolve([*cond, params.Conditional(value=0.7)], "lm_head.weight", 0.0) == 0.7
    assert params.anchors([*cond, params.Conditional(filter="*", value=0.7)]) == [0.0, 1.0, 0.25, 0.7]


# ---------------------------------------------------------------- Model Stock and DELLA


def test_model_stock_by_hand() -> None:
    base = torch.zeros(2)
    # orthogonal task vectors: cos 0, t = 0: the base
    close(methods.model_stock(base, [T([1.0, 0.0]), T([0.0, 1.0])]), [0.0, 0.0])
    # identical task vectors: cos 1, t = 2·1 / (1 + 1) = 1: their mean
    close(methods.model_stock(base, [T([1.0, 2.0]), T([1.0, 2.0])]), [1.0, 2.0])
    # 60° apart: cos 0.5, t = 1 / 1.5 = 2/3 of the way to the mean [0.75, sqrt(3)/4]
    a, b = T([1.0, 0.0]), T([0.5, math.sqrt(3) / 2])
    close(methods.model_stock(base, [a, b]), [0.5, math.sqrt(3) / 6])
    # opposite: 1 + (N-1) cos = 0: the base is kept rather than dividing by ~0
    close(methods.model_stock(T([1.0, 1.0]), [T([2.0, 1.0]), T([0.0, 1.0])]), [1.0, 1.0])
    # filter-wise: each row its own angle
    rows = methods.model_stock(
        torch.zeros(2, 2), [T([[1.0, 0.0], [1.0, 2.0]]), T([[0.0, 1.0], [1.0, 2.0]])], True
    )
    close(rows, [[0.0, 0.0], [1.0, 2.0]])


def test_della_probabilities_follow_magnitude_rank() -> None:
    # one row of 5: ranks 0..4 give keep probabilities 0.3, 0.35, 0.4, 0.45, 0.5 at density 0.4 ± 0.1
    delta = T([0.1, 0.5, 0.2, 0.4, 0.3]).repeat(40_000, 1)
    out = methods.della_drop(delta, 0.4, 0.1, methods.seeded_generator(0, 0, "d"), semantics="paper")
    kept = (out != 0).float().mean(dim=0)
    assert torch.allclose(kept, T([0.3, 0.5, 0.35, 0.45, 0.4]), atol=0.01)
    # paper: each kept entry divided by its own probability, so E[out] = delta
    assert torch.allclose(out.mean(dim=0), delta[0], rtol=0.03)
    # mergekit: one factor for the tensor restores its L1 norm
    out = methods.della_drop(delta, 0.4, 0.1, methods.seeded_generator(0, 0, "d"))
    assert torch.allclose(out.abs().sum(), delta.abs().sum(), rtol=1e-5)
