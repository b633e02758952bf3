"""Sparsification of task vectors: magnitude top-k, DARE drop, breadcrumbs, DELLA.

All functions take the delta of model ``i`` from a :class:`TensorInputs` and return
the sparsified delta in float32 (float64 for float64 inputs). Thresholds come from
``TensorInputs.kth_smallest_abs``, a lookup when the materializer has precomputed
the sorted magnitudes.

Magnitude pruning keeps exactly the requested count. Elements are ordered by
magnitude, and equal magnitudes by flat index (a stable ascending sort); a
threshold that falls inside a run of equal magnitudes keeps the higher indices of
that run. mergekit breaks such ties arbitrarily (an unstable sort), so on tied
magnitudes the two may keep different elements of equal size; without ties the
results are identical.
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


def window_mask(x: TensorInputs, i: int, start: int, end: int) -> torch.Tensor:
    """Mask of the elements at positions [start, end) of the stable ascending order
    of |delta_i|. Only thresholds are looked up; ties are resolved only if present."""
    a = x.delta(i).abs()
    lo = x.kth_smallest_abs(i, start)
    hi = x.kth_smallest_abs(i, end - 1)
    mask = (a >= lo) & (a <= hi)
    less_lo, _ = x.count_abs(i, lo)
    less_hi, leq_hi = x.count_abs(i, hi)
    if less_lo == start and leq_hi == end:
        return mask
    flat, m = a.reshape(-1), mask.reshape(-1)
    if less_lo != start:  # drop the first (start - less_lo) elements equal to lo
        eq = flat == lo
        m &= ~(eq & (eq.cumsum(0) <= start - less_lo))
    if leq_hi != end:  # keep only the first (end - less_hi) elements equal to hi
        eq = flat == hi
        m &= ~(eq & (eq.cumsum(0) > end - less_hi))
    return m.reshape(a.shape)


def magnitude(x: TensorInputs, i: int, density: float, rescale: bool) -> torch.Tensor:
    delta = x.delta(i)
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    masked = torch.where(window_mask(x, i, n - k, n), delta, 0.0)
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
    masked = torch.where(window_mask(x, i, n_bot, n_bot + keep), delta, 0.0)
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
