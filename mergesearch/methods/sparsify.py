"""Sparsification of task vectors: magnitude top-k, DARE drop, breadcrumbs, DELLA.

All functions read the delta of model ``i`` from a :class:`TensorInputs` and return
the sparsified delta in float32 (float64 for float64 inputs). Magnitude selections are
:func:`mergesearch.methods.selection.window` (a radix select of the thresholds), in the
export and the Materializer alike.

Magnitude pruning keeps exactly the requested count. Elements are ordered by
magnitude, and equal magnitudes by flat index (a stable ascending sort); a
threshold that falls inside a run of equal magnitudes keeps the higher indices of
that run. mergekit breaks such ties arbitrarily (an unstable sort), so on tied
magnitudes the two may keep different elements of equal size; without ties the
results are identical.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from mergesearch.errors import MergeSearchError
from mergesearch.methods import native
from mergesearch.methods.inputs import TensorInputs, work_dtype
from mergesearch.methods.selection import apply_window, keep_range, window

_EPS = 1e-7


def rescale_l1(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Scale ``masked`` so its L1 norm equals that of ``delta`` (no-op near zero)."""
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < _EPS or after < _EPS:
        return masked
    return masked * (before / after)


def magnitude(x: TensorInputs, i: int, density: float, rescale: bool) -> torch.Tensor:
    """TIES pruning: keep the ``max(1, int(density * n))`` largest magnitudes."""
    delta = x.delta(i)
    if density >= 1:
        return delta
    masked = apply_window(delta, window(x, i, *keep_range("magnitude", delta.numel(), density)))
    return rescale_l1(delta, masked) if rescale else masked


def magnitude_outliers(x: TensorInputs, i: int, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` share of largest magnitudes, then the smallest,
    keeping ``int(density * n)`` elements (outlier removal shrinks if needed)."""
    delta = x.delta(i)
    if density >= 1:
        return delta
    masked = apply_window(delta, window(x, i, *keep_range("outliers", delta.numel(), density, gamma)))
    return rescale_l1(delta, masked) if rescale else masked


# DARE draws its mask and sums its norms over flat blocks of this many elements, in the
# workers and in the export alike: the CPU generator draws element by element, so the
# mask is the one a whole-tensor draw gives, and the norms are float64 sums in one order.
DARE_BLOCK = 1 << 18


def dare_mask(x: TensorInputs, i: int, density: float, rescale: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DARE's kept elements of model i (a bool tensor of the tensor's shape, drawn with
    probability ``density`` each, as ``torch.bernoulli`` draws them) and, with
    ``rescale``, the factor that restores the task vector's L1 norm (None: no scaling).
    A kept element becomes ``delta * factor``, a dropped one 0. Only a bool per element
    is kept; the block's float temporaries go as it is done.

    On the CPU the two L1 norms are exact (float32 magnitudes summed as integer
    mantissas per binary exponent, :func:`exact_l1_factor`), so the native kernel and the
    torch blocks give the same factor whatever their summation order; on an accelerator
    they are float64 sums."""
    n = x.numel
    raw = x.raw(i)
    ref = raw if raw is not None else x.delta(i)
    cpu = ref.device.type == "cpu"
    # On the CPU, torch.bernoulli(p) keeps an element when 24 bits of the generator's
    # next 32-bit draw, times 2^-24, fall below p (as float32). random_ over [0, 2^24)
    # takes the same draw per element, and r * 2^-24 < p exactly when r < ceil(p * 2^24):
    # the same mask at a third of the cost (tests/test_methods_vs_mergekit.py).
    bound = math.ceil(float(torch.tensor(density, dtype=torch.float32)) * (1 << 24))
    exact = cpu and work_dtype(ref.dtype) == torch.float32
    if cpu:
        src, base = (raw, x.raw_base) if raw is not None and x.raw_base is not None else (x.delta(i), None)
        if native.draws(x.generator, src, base):  # one pass: the draws, then both norms
            keep, bins = native.dare_mask(x.generator, bound, src, base, norms=rescale)
            return keep.reshape(x.shape), exact_l1_factor(bins) if rescale else None
    keep = torch.empty(n, dtype=torch.bool, device=ref.device)
    before = after = None
    bins = [0] * 512
    for lo, hi, d in x.delta_blocks(i, DARE_BLOCK):
        if cpu:
            kept = torch.empty(hi - lo, dtype=torch.int32).random_(0, 1 << 24, generator=x.generator).lt_(bound)
        else:
            kept = torch.bernoulli(torch.full_like(d, density), generator=x.generator) != 0
        keep[lo:hi] = kept
        if rescale and exact:
            for k, c in enumerate(_mantissa_bins(d, kept)):
                bins[k] += c
        elif rescale:
            a = d.abs()
            s0, s1 = a.sum(dtype=torch.float64), a.mul_(kept).sum(dtype=torch.float64)  # |d * m| = |d| * m
            before, after = (s0, s1) if before is None else (before + s0, after + s1)
    keep = keep.reshape(x.shape)
    if rescale and exact:
        return keep, exact_l1_factor(bins)
    if before is None or before < _EPS or after < _EPS:
        return keep, None
    return keep, (before / after).to(work_dtype(ref.dtype))


def _mantissa_bins(d: torch.Tensor, kept: torch.Tensor) -> list[int]:
    """|d| (float32) as integer mantissas summed per biased binary exponent, over all
    elements (bins 0-255) and over the kept ones (256-511). Each bin of a DARE_BLOCK of
    24-bit mantissas stays below 2^42: exact in the float64 weights of bincount."""
    u = d.abs().view(torch.int32)
    e = u >> 23
    m = ((u & 0x7FFFFF) | ((e > 0).to(torch.int32) << 23)).to(torch.float64)
    whole = torch.bincount(e, weights=m, minlength=256)
    kept_part = torch.bincount(e, weights=m.mul_(kept), minlength=256)
    return torch.cat([whole, kept_part]).to(torch.int64).tolist()


def exact_l1_factor(bins: list[int]) -> torch.Tensor | None:
    """DARE's rescale factor from exact L1 norms (:func:`_mantissa_bins`): the norm of
    every element over the norm of the kept ones, correctly rounded to float64, then
    float32; None when either norm is below 1e-7 (no rescale); NaN for a non-finite norm
    (the merge then fails its finite check)."""
    if bins[255] or bins[511]:
        return torch.tensor(float("nan"), dtype=torch.float32)
    before = sum(c << max(e, 1) for e, c in enumerate(bins[:255]))  # in units of 2^-150
    after = sum(c << max(e, 1) for e, c in enumerate(bins[256:511]))
    scale = 1 << 150
    if Fraction(before, scale) < _EPS or Fraction(after, scale) < _EPS:
        return None
    return torch.tensor(before / after, dtype=torch.float64).to(torch.float32)  # int / int: correctly rounded


def apply_dare(delta: torch.Tensor, keep: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """The sparsified task vector of :func:`dare_mask`, as the merge kernels compute it."""
    return torch.where(keep, delta if factor is None else delta * factor, 0.0)


def dare(x: TensorInputs, i: int, density: float, rescale: bool) -> torch.Tensor:
    """DARE: keep each element with probability ``density`` (Bernoulli), rescaled to
    the task vector's L1 norm with ``rescale``."""
    if density >= 1:
        return x.delta(i)
    keep, factor = dare_mask(x, i, density, rescale)
    return apply_dare(x.delta(i), keep, factor)


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
    del probs, order, ranks, rank_norm
    masked = mask.mul_(rows).reshape(delta.shape)
    return rescale_l1(delta, masked) if rescale else masked
