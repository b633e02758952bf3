"""Magnitude selection of a task vector: which elements survive pruning.

Functions of a :class:`~mergesearch.methods.inputs.TensorInputs` and a model index.
:func:`window` selects positions [start, end) of the stable ascending order of
|delta_i| as magnitude thresholds (k-th values, from a radix select on the float bits)
and, where a threshold falls inside a run of equal magnitudes, the flat index that
splits the run. The fused kernels (:func:`mergesearch.methods.kernels.combine`) apply
such a window as they read the tensor, so no masked copy of a task vector is made.

The scratch of one window (|delta_i|, the radix histograms) lives in a :class:`Scratch`
for the duration of that window; the inputs hold none of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergesearch.methods import kernels, native, triton_select
from mergesearch.methods.inputs import TensorInputs, work_dtype

RADIX_MIN_NUMEL = 1 << 20
# In a one-shot merge (``kernels.streaming``), from this size the selection reads a
# stored tensor in flat blocks of SELECT_BLOCK elements (|delta| is made per block, once
# per histogram pass), so its float32 scratch is a few blocks, not a few copies of the
# tensor. The thresholds are the same bits either way.
SELECT_BLOCK = 1 << 18
# On an accelerator, from this size a k-th value comes from a sort (a 1-D kthvalue runs in
# one thread block on CUDA: 5 ms at 1M elements on an H100, against 0.12 ms for a sort), and
# from RADIX_MIN_NUMEL from radix passes over 8-bit digits (histograms of 256 bins stay in
# shared memory; the 32768-bin histogram of the CPU path takes global atomics there).
SORT_MIN_NUMEL = 1 << 15


def radix_select_bits(bits: torch.Tensor, k: int, first: list[int] | None = None) -> tuple[int, int, int]:
    """The k-th smallest (0-based) of non-negative int32 values (float bit patterns of
    |x|, which order like the floats), by four passes over 8-, 8-, 8- and 7-bit digits
    from the top, each over the elements still in play. Returns (value's bits, elements
    below it, elements at or below it). ``first`` is the first pass's cumulative
    histogram, when already known (:func:`first_digit_cumsum`)."""
    below, prefix, cand = 0, 0, bits.reshape(-1)
    for shift, width in ((23, 8), (15, 8), (7, 8), (0, 7)):
        digit = (cand >> shift) & ((1 << width) - 1)
        if shift == 23 and first is not None:
            cum = first
        else:
            cum = torch.bincount(digit, minlength=1 << width).cumsum(0).tolist()
        r = k - below
        d = next(j for j, c in enumerate(cum) if c > r)
        before = cum[d - 1] if d else 0
        below += before
        prefix |= d << shift
        if shift == 0:
            return prefix, below, below + cum[d] - before
        cand = cand[digit == d]
    raise AssertionError("unreachable")


def _select_by_sort_and_radix8(device: torch.device) -> bool:
    """Whether selections on ``device`` take the accelerator paths (sort, 8-bit radix)."""
    return device.type != "cpu"


def first_digit_cumsum(bits: torch.Tensor) -> list[int]:
    """The cumulative histogram of the top 8-bit digit (bits 23-30) of ``bits``."""
    return torch.bincount(bits.reshape(-1) >> 23, minlength=256).cumsum(0).tolist()


@dataclass
class Scratch:
    """One model's selection state within one window: whether its histograms come from
    the native kernels (:func:`uses_native`, asked once), |delta| flattened (when made
    whole) and the radix histogram of its kind ("whole", "radix8" or "blocked")."""

    native: bool
    abs: torch.Tensor | None = None
    hist: tuple | None = None

    def kind(self) -> str:
        return self.hist[0] if self.hist is not None else ""


def uses_native(x: TensorInputs, i: int) -> bool:
    """Whether model i's selection histograms come from the native kernels (a large
    stored tensor on the CPU): no float copy of its delta is made at all."""
    raw = x.raw(i)
    return x.numel > SELECT_BLOCK and raw is not None and x.raw_base is not None and native.selects(raw, x.raw_base)


def blocked(x: TensorInputs, i: int, scratch: Scratch | None = None) -> bool:
    """Whether model i's |delta| is read block by block (a large stored tensor in a
    one-shot merge whose float32 delta is not already held)."""
    raw = x.raw(i)
    return (kernels.is_streaming() and x.numel > SELECT_BLOCK and raw is not None and x.raw_base is not None
            and not x.holds_delta(i) and (scratch is None or scratch.abs is None)
            and work_dtype(raw.dtype) == torch.float32)


def abs_delta(x: TensorInputs, i: int, scratch: Scratch) -> torch.Tensor:
    """|delta_i|, flattened (made once per scratch). From a stored tensor it is made in
    one buffer, in place (2.5x faster than three allocating passes on a large tensor)."""
    if scratch.abs is None:
        raw = x.raw(i)
        if raw is not None and not x.holds_delta(i) and x.raw_base is not None:
            a = raw.to(work_dtype(raw.dtype), copy=True)
            a.sub_(x.base)
            scratch.abs = a.abs_().reshape(-1)
        else:
            scratch.abs = x.delta(i).abs().reshape(-1)
    return scratch.abs


def _abs_blocks(x: TensorInputs, i: int):
    """(offset, |delta_i| of the block) over flat blocks of SELECT_BLOCK elements, the
    same bits as :func:`abs_delta` (only for :func:`blocked` models: each block is a
    fresh tensor)."""
    for lo, _, d in x.delta_blocks(i, SELECT_BLOCK):
        yield lo, d.abs_()


def select_abs(x: TensorInputs, i: int, k: int, scratch: Scratch) -> tuple[torch.Tensor, int, int]:
    """The k-th smallest |delta_i| (0-based) with the counts of elements below it
    and at or below it. Large tensors use a radix select on the float bits (a
    histogram of the top 16 bits, then an exact k-th value inside one bucket). On an
    accelerator with triton, Triton kernels (:mod:`triton_select`)."""
    fused = triton_select.selection_source(x, i)
    if fused is not None:  # the same exact k-th value and counts; the histogram kept between candidates
        return triton_select.select_abs(*fused, k, scratch, cached=lambda build: x.cached(
            triton_select.cache_kind(x, i), (x.numel, str(x.device)), build))
    if scratch.native or blocked(x, i, scratch):
        return _select_blocked(x, i, k, scratch)
    a = abs_delta(x, i, scratch)
    if _select_by_sort_and_radix8(a.device) and a.numel() >= SORT_MIN_NUMEL:
        if a.numel() < RADIX_MIN_NUMEL or a.dtype != torch.float32:
            v = torch.sort(a).values[k]
            n = torch.stack([(a < v).sum(), (a <= v).sum()]).tolist()
            return v, n[0], n[1]
        bits = a.view(torch.int32)
        if scratch.kind() != "radix8":
            scratch.hist = ("radix8", first_digit_cumsum(bits))
        vb, below, at = radix_select_bits(bits, k, scratch.hist[1])
        return torch.tensor([vb], dtype=torch.int32).view(torch.float32)[0].to(a.device), below, at
    if a.numel() < RADIX_MIN_NUMEL or a.dtype != torch.float32:
        v = torch.kthvalue(a, k + 1).values
        return v, int((a < v).sum()), int((a <= v).sum())
    if scratch.kind() != "whole":
        top = a.view(torch.int32) >> 16  # non-negative floats order like their bits
        scratch.hist = ("whole", top, torch.bincount(top.reshape(-1), minlength=1 << 15).cumsum(0))
    _, top, cum = scratch.hist
    b = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device), right=True))
    below = int(cum[b - 1]) if b > 0 else 0
    bucket = a[top == b]
    v = torch.kthvalue(bucket, k - below + 1).values
    return v, below + int((bucket < v).sum()), below + int((bucket <= v).sum())


def _select_blocked(x: TensorInputs, i: int, k: int, scratch: Scratch) -> tuple[torch.Tensor, int, int]:
    """:func:`select_abs` over blocks, as a two-level radix select on the float bits
    (non-negative floats order like their bits): the histogram of the top 16 bits,
    summed over blocks, finds the k-th value's bucket; a histogram of the low 16 bits
    of that bucket's elements finds the value itself, and both give the exact counts.
    The first pass keeps each element's top 16 bits (2 bytes an element), so the
    second reads only the bucket's elements again."""
    nat = scratch.native
    raw, raw_base = x.raw(i), x.raw_base
    if scratch.kind() != "blocked" and nat:
        tops, counts = native.abs_top16(raw, raw_base)
        scratch.hist = ("blocked", counts.cumsum(0), tops)
    elif scratch.kind() != "blocked":
        counts = None
        tops = torch.empty(x.numel, dtype=torch.int16, device=raw.device)
        for lo, a in _abs_blocks(x, i):
            top = a.view(torch.int32) >> 16  # at most 0x7F80 for a finite float: fits int16
            c = torch.bincount(top, minlength=1 << 15)
            counts = c if counts is None else counts.add_(c)
            tops[lo:lo + top.numel()] = top
        scratch.hist = ("blocked", counts.cumsum(0), tops)
    _, cum, tops = scratch.hist
    b = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device), right=True))
    below = int(cum[b - 1]) if b > 0 else 0
    if nat:
        cum2 = native.abs_low16(raw, raw_base, tops, b).cumsum(0)
    else:
        where = (tops == b).nonzero().reshape(-1)
        t, base = raw.reshape(-1), raw_base.reshape(-1)
        a = t[where].to(torch.float32)
        a.sub_(base[where].to(torch.float32))  # the bits :func:`_abs_blocks` makes
        cum2 = torch.bincount(a.abs_().view(torch.int32) & 0xFFFF, minlength=1 << 16).cumsum(0)
    r = k - below
    j = int(torch.searchsorted(cum2, torch.tensor([r], device=cum2.device), right=True))
    v = torch.tensor([(b << 16) | j], dtype=torch.int32).view(torch.float32)[0].to(cum.device)
    return v, below + (int(cum2[j - 1]) if j > 0 else 0), below + int(cum2[j])


def nth_position_equal(x: TensorInputs, i: int, value: torch.Tensor, r: int, scratch: Scratch) -> int:
    """The flat index of the r-th element (0-based, in index order) with |delta_i| == value."""
    fused = triton_select.selection_source(x, i)
    if fused is not None:
        j = triton_select.nth_equal(*fused, value, r, scratch)
        if j < 0:
            raise IndexError(f"{x.name}: fewer elements equal to the threshold than counted")
        return j
    if scratch.native:
        j = native.nth_equal(x.raw(i), x.raw_base, value, r,
                             tops=scratch.hist[2] if scratch.kind() == "blocked" else None)
        if j < 0:
            raise IndexError(f"{x.name}: fewer elements equal to the threshold than counted")
        return j
    if not blocked(x, i, scratch):
        return int((abs_delta(x, i, scratch) == value).nonzero().reshape(-1)[r])
    for lo, a in _abs_blocks(x, i):
        eq = a == value
        c = int(eq.sum())
        if r < c:
            return lo + int(eq.nonzero().reshape(-1)[r])
        r -= c
    raise IndexError(f"{x.name}: fewer elements equal to the threshold than counted")


def keep_range(kind: str, n: int, density: float, gamma: float = 0.0) -> tuple[int, int]:
    """Positions [start, end) of the ascending magnitude order that survive pruning."""
    if density >= 1:
        return 0, n
    if kind == "magnitude":
        if density <= 0 or n == 0:
            return n, n
        k = max(1, int(density * n))
        return n - k, n
    keep = int(density * n)  # breadcrumbs: drop the top gamma share, then the smallest
    if keep <= 0:
        return n, n
    n_bot = max(0, n - keep - int(gamma * n))
    return n_bot, n_bot + keep


def window(x: TensorInputs, i: int, start: int, end: int) -> tuple:
    """Select positions [start, end) of the stable ascending order of |delta_i|.

    Returns ``(key, lo, hi, jlo, jhi)``: element e (flat index j) is kept when
    ``(key > lo or (key == lo and j >= jlo)) and (key < hi or (key == hi and j < jhi))``,
    where a key of None stands for |delta_i|. The bounds are magnitude thresholds
    (k-th values) and jlo/jhi split a run of equal magnitudes at a threshold by flat
    index, so exactly ``end - start`` elements are selected."""
    n = x.numel
    zero, inf = x.scalar(0.0), x.scalar(float("inf"))
    as_t = (lambda v: torch.tensor(v, dtype=torch.int64, device=zero.device))
    if start <= 0 and end >= n:
        return None, zero, inf, as_t(0), as_t(n)
    if start >= end:
        return None, inf, inf, as_t(n), as_t(0)
    lo, hi, jlo, jhi = zero, inf, 0, n
    scratch = Scratch(native=uses_native(x, i))
    if start > 0:
        lo, less_lo, _ = select_abs(x, i, start, scratch)
        if less_lo != start:  # drop the first (start - less_lo) elements equal to lo
            jlo = nth_position_equal(x, i, lo, start - less_lo, scratch)
    if end < n:
        hi, less_hi, leq_hi = select_abs(x, i, end - 1, scratch)
        if leq_hi != end:  # keep only the first (end - less_hi) elements equal to hi
            jhi = nth_position_equal(x, i, hi, end - less_hi, scratch)
    return None, lo, hi, as_t(jlo), as_t(jhi)


def kept_window(x: TensorInputs, i: int, kind: str, density: float, gamma: float = 0.0) -> tuple | None:
    """The :func:`window` of model i's elements that pruning ``kind`` ("magnitude" or
    "outliers") keeps at ``density``, or None where it keeps them all (no selection)."""
    start, end = keep_range(kind, x.numel, density, gamma)
    return None if start <= 0 and end >= x.numel else window(x, i, start, end)


def window_mask(key: torch.Tensor, lo, hi, jlo, jhi) -> torch.Tensor:
    idx = torch.arange(key.numel(), device=key.device).reshape(key.shape)
    return ((key > lo) | ((key == lo) & (idx >= jlo))) & ((key < hi) | ((key == hi) & (idx < jhi)))


def apply_window(delta: torch.Tensor, w: tuple) -> torch.Tensor:
    key, lo, hi, jlo, jhi = w
    key = delta.abs() if key is None else key
    return torch.where(window_mask(key, lo, hi, jlo, jhi), delta, 0.0)
