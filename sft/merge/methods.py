"""The merge methods as plain tensor math, one output tensor at a time.

Inputs are float32 tensors of one name taken from each model (and the base). Notation: θᵢ are the
fine-tuned tensors, wᵢ their weights, τᵢ = θᵢ − base their task vectors, λ the global `scale`.

- linear:           Σ wᵢ θᵢ  (divided by Σ wᵢ when normalized)
- task arithmetic:  base + λ Σ wᵢ τᵢ  (Σ wᵢ τᵢ / Σ wᵢ when normalized)
- TIES:             trim each τᵢ to its top `density` fraction by magnitude; elect the sign of Σ wᵢ τᵢ per
                    element; average (or sum) only the wᵢ τᵢ that agree with it: the disjoint mean
- DARE:             drop each τᵢ element with probability 1 − density and rescale the rest by 1/density;
                    then combine linearly (dare_linear) or by sign election as in TIES (dare_ties)
- SLERP:            spherical interpolation of two tensors seen as flat vectors; linear when (anti)parallel
"""

from __future__ import annotations

import hashlib
import math

import torch


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
        delta.div_(sum(weights))
    return delta.mul_(scale).add_(base)


# Below, task vectors are temporaries of our own, so they are updated in place: the merge holds a few
# tensors of one name at a time, and in-place updates keep that number small.


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = round(density · n) entries of largest magnitude (ties at the threshold are kept too)."""
    if int(density * delta.numel() + 0.5) >= delta.numel():
        return delta
    return _trim_(delta.clone(), density)


def _trim_(delta: torch.Tensor, density: float) -> torch.Tensor:
    n = delta.numel()
    k = int(density * n + 0.5)
    if k >= n:
        return delta
    if k <= 0:
        return delta.zero_()
    magnitude = delta.abs()
    # The k-th largest is the (n − k + 1)-th smallest.
    threshold = magnitude.view(-1).kthvalue(n - k + 1).values
    return delta.mul_(magnitude.ge_(threshold))


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` and rescale the kept ones by 1/density."""
    return _drop_(delta.clone(), density, generator)


def _drop_(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return delta
    # The mask is drawn on the CPU so the same seed gives the same model on any device.
    keep = torch.empty(delta.shape, dtype=torch.bool).bernoulli_(density, generator=generator)
    return delta.mul_(keep.to(delta.device)).div_(density)


def _sign_consensus_(weighted: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """TIES merge of already weighted task vectors wᵢτᵢ: elect a sign per element by total mass, then
    sum the entries that agree with it, divided by the weights of the agreeing models when normalizing.
    Consumes `weighted` (entries are zeroed where they disagree, then dropped from the list)."""
    elected = torch.zeros_like(weighted[0])
    for d in weighted:
        elected.add_(d)
    elected.sign_()
    total = torch.zeros_like(elected)
    agreeing_weight = torch.zeros_like(elected) if normalize else None
    for w in weights:
        d = weighted.pop(0)  # dropped as soon as it is counted
        # 1.0 where the entry's sign is the elected one. A zero entry (trimmed, dropped) only "agrees" where
        # the elected sign is 0 too, and there it adds nothing to the total, which stays 0.
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
) -> torch.Tensor:
    weighted = [_trim_(t - base, d).mul_(w) for t, w, d in zip(tensors, weights, densities, strict=True)]
    return _sign_consensus_(weighted, weights, normalize).mul_(scale).add_(base)


def dare(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    scale: float,
    normalize: bool,
    generators: list[torch.Generator],
    consensus: bool,
) -> torch.Tensor:
    """DARE: random drop and rescale of each task vector, then linear (consensus=False) or TIES combination."""
    if consensus:
        dropped = [
            _drop_(t - base, d, g).mul_(w)
            for t, w, d, g in zip(tensors, weights, densities, generators, strict=True)
        ]
        return _sign_consensus_(dropped, weights, normalize).mul_(scale).add_(base)
    delta = torch.zeros_like(base)
    for t, w, d, g in zip(tensors, weights, densities, generators, strict=True):
        delta.add_(_drop_(t - base, d, g), alpha=w)
    if normalize:
        delta.div_(sum(weights))
    return delta.mul_(scale).add_(base)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation from a (t=0) to b (t=1), treating each tensor as one flat vector.

    The angle comes from the normalized vectors; the interpolation uses the tensors themselves, so norms
    are interpolated too. Falls back to linear interpolation when a vector is zero or the two are
    (anti)parallel, where the spherical formula divides by sin(Ω) ≈ 0.
    """
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()  # float64 for an accurate angle
    na, nb = float(a64.norm()), float(b64.norm())
    cos = float(torch.dot(a64, b64)) / (na * nb) if na > 0 and nb > 0 else 1.0
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


def interpolate_list(values: list[float], position: float) -> float:
    """Piecewise-linear value of evenly spaced anchors at `position` in [0, 1] (mergekit-style gradients)."""
    if len(values) == 1:
        return values[0]
    x = min(max(position, 0.0), 1.0) * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    frac = x - i
    return values[i] * (1 - frac) + values[i + 1] * frac
