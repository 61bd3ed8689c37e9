"""The merge methods as plain tensor math, one output tensor at a time.

Inputs are float32 tensors of one name taken from each model (and the base). Notation: θᵢ are the
fine-tuned tensors, wᵢ their weights, τᵢ = θᵢ − base their task vectors, λ the global `scale`.

- linear:           Σ wᵢ θᵢ  (divided by Σ wᵢ when normalized)
- task arithmetic:  base + λ Σ wᵢ τᵢ  (Σ wᵢ τᵢ / Σ wᵢ when normalized)
- TIES:             trim each τᵢ to its top `density` fraction by magnitude; elect the sign of Σ wᵢ τᵢ per
                    element; average (or sum) only the wᵢ τᵢ that agree with it: the disjoint mean
- DARE:             drop each τᵢ element with probability 1 − density and rescale what is kept; then
                    combine linearly (dare_linear) or by sign election as in TIES (dare_ties)
- DELLA:            as DARE, but an element's keep probability grows with its magnitude rank in its row
- Model Stock:      move from the base towards the average of the models by a factor set by the angle
                    between their task vectors
- SLERP:            spherical interpolation of two tensors seen as flat vectors; linear when (anti)parallel

Two semantics where mergekit (0.1.5) and the papers differ, chosen by `semantics` (docs/merge.md):

| | mergekit (default) | paper |
| --- | --- | --- |
| TIES: entries kept | exactly k = max(1, int(density · n)); equal magnitudes at the threshold are cut to k | k = round(density · n); equal magnitudes at the threshold all kept |
| TIES: sign where Σ wᵢ τᵢ is exactly 0 | + (the positive entries are merged) | 0 (the base is kept) |
| DARE / DELLA: rescale of what is kept | to the task vector's L1 norm (whole tensor) | 1 / keep probability, per element |
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch

Semantics = Literal["mergekit", "paper"]


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights, strict=True):
        out.add_(t, alpha=w)
    if normalize:
        out.div_(sum(weights))
    return out


def task_arithmetic(
    base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], scale: float, normalize: bool
) -> torch.Tensor:
    delta = torch.zeros_like(base)
    for t, w in zip(tensors, weights, strict=True):
        delta.add_(t - base, alpha=w)
    if normalize:
        delta.div_(_divisor(sum(weights)))
    return delta.mul_(scale).add_(base)


def _divisor(total: float) -> float:
    # A weight sum of (almost) zero is not divided by, as in mergekit.
    return total if abs(total) >= 1e-8 else 1.0


# Below, task vectors are temporaries of our own, so they are updated in place: the merge holds a few
# tensors of one name at a time, and in-place updates keep that number small.


def trim_by_magnitude(delta: torch.Tensor, density: float, semantics: Semantics = "mergekit") -> torch.Tensor:
    """TIES' trim: keep the entries of largest magnitude (how many, and ties: see the module docstring)."""
    if density >= 1:
        return delta
    return _trim_(delta.clone(), density, semantics)


def kept_count(n: int, density: float, semantics: Semantics) -> int:
    """How many of n entries TIES keeps at `density`."""
    if density >= 1:
        return n
    if semantics == "paper":
        return min(n, int(density * n + 0.5))
    return 0 if density <= 0 or n == 0 else max(1, int(density * n))


def _trim_(delta: torch.Tensor, density: float, semantics: Semantics) -> torch.Tensor:
    n = delta.numel()
    k = kept_count(n, density, semantics)
    if k >= n:
        return delta
    if k <= 0:
        return delta.zero_()
    magnitude = delta.abs()
    flat = magnitude.view(-1)
    # The k-th largest is the (n − k + 1)-th smallest.
    threshold = flat.kthvalue(n - k + 1).values
    if semantics == "paper":
        return delta.mul_(magnitude.ge_(threshold))
    above = flat > threshold
    at = flat == threshold
    missing = k - int(above.sum())
    if int(at.sum()) > missing:
        # More equal magnitudes at the threshold than places left: keep exactly k, the ones mergekit keeps
        # (the first k of torch's descending argsort, which breaks ties by its own order).
        keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
        keep[torch.argsort(flat, descending=True)[:k]] = True
    else:
        keep = above.logical_or_(at)
    return delta.mul_(keep.view(delta.shape))


def _rescale_(
    delta: torch.Tensor,
    kept: torch.Tensor,
    probability: torch.Tensor | float,
    rescale: bool,
    semantics: Semantics,
) -> torch.Tensor:
    """Zero the dropped entries of `delta` (in place) and rescale the kept ones (module docstring)."""
    if not rescale:
        return delta.mul_(kept)
    if semantics == "paper":
        return delta.mul_(kept).div_(probability)
    before = float(delta.abs().sum())
    delta.mul_(kept)
    after = float(delta.abs().sum())
    if before < 1e-7 or after < 1e-7:  # nothing to match (mergekit's epsilon)
        return delta
    return delta.mul_(before / after)


def dare_drop(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator,
    rescale: bool = True,
    semantics: Semantics = "mergekit",
) -> torch.Tensor:
    """Keep each entry with probability `density` and rescale the kept ones."""
    return _drop_(delta.clone(), density, generator, rescale, semantics)


def _drop_(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool, semantics: Semantics
) -> torch.Tensor:
    if density >= 1:
        return delta
    # The mask is drawn on the CPU so the same seed gives the same model on any device.
    keep = torch.empty(delta.shape, dtype=torch.bool).bernoulli_(density, generator=generator)
    return _rescale_(delta, keep.to(delta.device), density, rescale, semantics)


def della_drop(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: bool = True,
    semantics: Semantics = "mergekit",
) -> torch.Tensor:
    """DELLA's MagPrune: keep probabilities from density − ε (smallest magnitude of a row) to density + ε
    (largest), by magnitude rank within each row (a 1-D tensor is one row); then rescale."""
    return _della_(delta.clone(), density, epsilon, generator, rescale, semantics)


def _della_(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: bool,
    semantics: Semantics,
) -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    # Rank 0 for the smallest magnitude of a row, width − 1 for the largest (ties by sort order).
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).float()
    position = ranks.div_(width - 1) if width > 1 else ranks.fill_(0.5)
    probability = position.mul_(2 * epsilon).add_(density - epsilon).view(delta.shape)
    keep = torch.bernoulli(probability.cpu(), generator=generator).to(torch.bool)
    return _rescale_(delta, keep.to(delta.device), probability, rescale, semantics)


def _sign_consensus_(
    weighted: list[torch.Tensor], weights: list[float], normalize: bool, semantics: Semantics
) -> torch.Tensor:
    """TIES merge of already weighted task vectors wᵢτᵢ: elect a sign per element by total mass, then
    sum the entries that agree with it, divided by the weights of the agreeing models when normalizing.
    Consumes `weighted` (entries are zeroed where they disagree, then dropped from the list)."""
    elected = torch.zeros_like(weighted[0])
    for d in weighted:
        elected.add_(d)
    if semantics == "paper":
        elected.sign_()  # 0 where the sum is exactly 0: nothing agrees there but zeros, the base is kept
    else:
        elected = torch.where(elected >= 0, 1.0, -1.0)  # mergekit: a zero sum elects +
    total = torch.zeros_like(elected)
    agreeing_weight = torch.zeros_like(elected) if normalize else None
    for w in weights:
        d = weighted.pop(0)  # dropped as soon as it is counted
        # 1.0 where the entry's sign is the elected one. A zero entry (trimmed, dropped) agrees only where
        # the elected sign is 0 (paper semantics), and there it adds nothing to the total, which stays 0.
        agree = d.sign().eq_(elected)
        total.add_(d.mul_(agree))
        if agreeing_weight is not None:
            agreeing_weight.add_(agree, alpha=w)
        del d, agree
    if agreeing_weight is not None:
        # Where no model agrees the total is 0 too; dividing by 1 keeps it 0.
        total.div_(agreeing_weight.masked_fill_(agreeing_weight == 0, 1.0))
    return total


def ties(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    scale: float,
    normalize: bool,
    semantics: Semantics = "mergekit",
) -> torch.Tensor:
    weighted = [
        _trim_(t - base, d, semantics).mul_(w) for t, w, d in zip(tensors, weights, densities, strict=True)
    ]
    return _sign_consensus_(weighted, weights, normalize, semantics).mul_(scale).add_(base)


def _combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    scale: float,
    normalize: bool,
    consensus: bool,
    semantics: Semantics,
) -> torch.Tensor:
    """Sparsified task vectors into the merged tensor: by sign election (TIES) or linearly."""
    if consensus:
        weighted = [d.mul_(w) for d, w in zip(deltas, weights, strict=True)]
        return _sign_consensus_(weighted, weights, normalize, semantics).mul_(scale).add_(base)
    total = torch.zeros_like(base)
    for w in weights:
        total.add_(deltas.pop(0), alpha=w)
    if normalize:
        total.div_(_divisor(sum(weights)))
    return total.mul_(scale).add_(base)


def dare(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    scale: float,
    normalize: bool,
    generators: list[torch.Generator],
    consensus: bool,
    rescale: bool = True,
    semantics: Semantics = "mergekit",
) -> torch.Tensor:
    """DARE: random drop and rescale of each task vector, then linear (consensus=False) or TIES combination."""
    dropped = [
        _drop_(t - base, d, g, rescale, semantics)
        for t, d, g in zip(tensors, densities, generators, strict=True)
    ]
    return _combine(base, dropped, weights, scale, normalize, consensus, semantics)


def della(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    epsilons: list[float],
    scale: float,
    normalize: bool,
    generators: list[torch.Generator],
    consensus: bool,
    rescale: bool = True,
    semantics: Semantics = "mergekit",
) -> torch.Tensor:
    """DELLA: magnitude-ranked random drop (MagPrune) and rescale, then TIES (consensus) or linear combination."""
    dropped = [
        _della_(t - base, d, e, g, rescale, semantics)
        for t, d, e, g in zip(tensors, densities, epsilons, generators, strict=True)
    ]
    return _combine(base, dropped, weights, scale, normalize, consensus, semantics)


def model_stock(base: torch.Tensor, tensors: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): base + t · (mean of the models − base), with t = N cos θ / (1 + (N − 1) cos θ)
    and cos θ the mean cosine between pairs of task vectors; per tensor, or per row with `filter_wise`.
    Where 1 + (N − 1) cos θ is ~0 the base is kept."""
    rows = (lambda x: x.reshape(1, -1) if x.dim() < 2 else x) if filter_wise else (lambda x: x.reshape(1, -1))
    b = rows(base)
    deltas = [rows(t) - b for t in tensors]
    norms = [d.norm(dim=-1) for d in deltas]
    cosines = [
        ((deltas[i] * deltas[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(len(deltas))
        for j in range(i + 1, len(deltas))
    ]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    mean = torch.stack([rows(x) for x in tensors]).mean(dim=0)
    return (t * mean + (1 - t) * b).reshape(base.shape)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation from a (t=0) to b (t=1), treating each tensor as one flat vector.

    The angle comes from the normalized vectors; the interpolation uses the tensors themselves, so norms
    are interpolated too. Linear interpolation when the two are (anti)parallel (|cos Ω| > dot_threshold),
    where the spherical formula divides by sin(Ω) ≈ 0. As in mergekit, a zero vector (norm ≤ 1e-8) counts
    as orthogonal to everything (cos Ω = 0).
    """
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()  # float64 for an accurate angle
    na, nb = float(a64.norm()), float(b64.norm())
    cos = float(torch.dot(a64, b64)) / ((na if na > 1e-8 else 1.0) * (nb if nb > 1e-8 else 1.0))
    del a64, b64
    cos = min(max(cos, -1.0), 1.0)
    if abs(cos) > dot_threshold:
        return torch.lerp(a, b, t)
    omega = math.acos(cos)
    s = math.sin(omega)
    return torch.mul(a, math.sin((1 - t) * omega) / s).add_(b, alpha=math.sin(t * omega) / s)


def seeded_generator(seed: int, model_index: int, tensor_name: str) -> torch.Generator:
    """A generator that depends only on (seed, model, tensor): the same model whatever the tensor order."""
    digest = hashlib.sha256(f"{seed}:{model_index}:{tensor_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
