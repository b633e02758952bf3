"""Sparsification of task vectors: magnitude top-k, DARE drop, breadcrumbs, DELLA.

All functions take the delta of model ``i`` from a :class:`TensorInputs` and return
the sparsified delta in float32 (float64 for float64 inputs). Thresholds come from
``TensorInputs.kth_smallest_abs``, a lookup when the materializer has precomputed
the sorted magnitudes.

Tie rule for magnitude pruning: every element whose magnitude equals the k-th
largest is kept, so with exactly tied magnitudes more than k elements can survive.
On continuous (float32) weights ties have probability zero and the kept count is
exactly ``max(1, int(density * n))``.
"""

from __future__ import annotations

import torch

from mergesearch.errors import MergeSearchError
from mergesearch.methods.inputs import TensorInputs

_EPS = 1e-7


def rescale_l1(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Scale ``masked`` so its L1 norm equals that of ``delta`` (no-op near zero)."""
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < _EPS or after < _EPS:
        return masked
    return masked * (before / after)


def magnitude(x: TensorInputs, i: int, density: float, rescale: bool) -> torch.Tensor:
    delta = x.delta(i)
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    threshold = x.kth_smallest_abs(i, n - k)
    masked = torch.where(delta.abs() >= threshold, delta, 0.0)
    return rescale_l1(delta, masked) if rescale else masked


def magnitude_outliers(x: TensorInputs, i: int, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` share of largest magnitudes, then the smallest,
    keeping ``int(density * n)`` elements (outlier removal shrinks if needed)."""
    delta = x.delta(i)
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    if keep <= 0:
        return torch.zeros_like(delta)
    n_top = int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    lo = x.kth_smallest_abs(i, n_bot)
    hi = x.kth_smallest_abs(i, n_bot + keep - 1)
    a = delta.abs()
    masked = torch.where((a >= lo) & (a <= hi), delta, 0.0)
    return rescale_l1(delta, masked) if rescale else masked


def dare(x: TensorInputs, i: int, density: float, rescale: bool) -> torch.Tensor:
    """DARE: keep each element with probability ``density`` (Bernoulli)."""
    delta = x.delta(i)
    if density >= 1:
        return delta
    probs = torch.full_like(delta, density)
    mask = torch.bernoulli(probs, generator=x.generator)
    masked = delta * mask
    return rescale_l1(delta, masked) if rescale else masked


def della(x: TensorInputs, i: int, density: float, epsilon: float, rescale: bool) -> torch.Tensor:
    """DELLA MagPrune: keep probability grows linearly with the magnitude rank within
    each row, from ``density - epsilon`` to ``density + epsilon``."""
    delta = x.delta(i)
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeSearchError(
            f"della: density {density} +/- epsilon {epsilon} must stay inside (0, 1) (tensor {x.name})"
        )
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    order = torch.argsort(rows.abs(), dim=1)
    ranks = order.argsort(dim=1).to(delta.dtype) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    mask = torch.bernoulli(probs, generator=x.generator)
    masked = (rows * mask).reshape(delta.shape)
    return rescale_l1(delta, masked) if rescale else masked
