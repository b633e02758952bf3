"""What a merge method sees for one output tensor.

``TensorInputs`` holds the base tensor and, for each model, its tensor or its task
vector (delta = model - base), whichever the caller has. The streamed export fills
it from memory-mapped files; the in-memory :class:`~mergesearch.engine.materialize.Materializer`
from device-resident tensors, mapped host tensors or staged copies of them, as its
placement says. Both go through the same method code, which is what makes in-memory
candidates bit-equal to exported checkpoints.
"""

from __future__ import annotations

import hashlib

import torch

from mergesearch.methods import native


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


def tensor_seed(seed: int, name: str) -> int:
    """The per-tensor random seed: independent of tensor order and of other tensors."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges compute in float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TensorInputs:
    """``base`` and ``tensors`` may be in their storage dtype (e.g. bfloat16): the
    work-dtype views (``base``, ``tensor(i)``, ``delta(i)``) are made on first use,
    while the fused kernels read the raw tensors directly (``raw_base``, ``raw(i)``)."""

    def __init__(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor] | None = None,
        deltas: list[torch.Tensor] | None = None,
        seed: int = 0,
        metrics: list[torch.Tensor | None] | None = None,
        base_metric: torch.Tensor | None = None,
        grams: list[torch.Tensor | None] | None = None,
        out_dtype: torch.dtype | None = None,
    ):
        if tensors is None and deltas is None:
            raise ValueError("TensorInputs needs tensors or deltas")
        self.name = name
        self.raw_base = base
        self._tensors = tensors
        self._deltas = deltas
        self.seed = seed
        self._metrics = metrics
        self._base_metric = base_metric
        self._grams = grams
        # the dtype the caller casts the merged tensor to: methods that compute large
        # tensors in blocks may return it in this dtype already (the same bits)
        self.out_dtype = out_dtype
        # where the merged tensor may be written (e.g. the evaluation model's parameter, in
        # out_dtype): kernels that can write into it do, and return it
        self.out: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self._base_work: torch.Tensor | None = None
        self._tensor_cache: dict[int, torch.Tensor] = {}
        self._delta_cache: dict[int, torch.Tensor] = {}
        self._abs_cache: dict[int, torch.Tensor] = {}
        self._hist_cache: dict[int, tuple] = {}

    @property
    def n(self) -> int:
        return len(self._tensors if self._tensors is not None else self._deltas)

    @property
    def base(self) -> torch.Tensor | None:
        if self.raw_base is None:
            return None
        if self._base_work is None:
            self._base_work = self.raw_base.to(work_dtype(self.raw_base.dtype))
        return self._base_work

    def metric(self, i: int, missing_ok: bool = False) -> torch.Tensor | None:
        """Model i's diagonal metric for this tensor, in the work dtype."""
        m = self._metrics[i] if self._metrics is not None else None
        if m is None:
            if missing_ok:
                return None
            raise ValueError(f"{self.name}: no metric for model {i}")
        return m.to(work_dtype(m.dtype))

    @property
    def base_metric(self) -> torch.Tensor | None:
        m = self._base_metric
        return None if m is None else m.to(work_dtype(m.dtype))

    def gram(self, i: int) -> torch.Tensor | None:
        """Model i's input Gram matrix when this tensor is a linear layer's weight."""
        g = self._grams[i] if self._grams is not None else None
        return None if g is None else g.to(work_dtype(g.dtype))

    def scalar(self, value) -> torch.Tensor:
        """A 0-d tensor in the work dtype on the inputs' device (no conversion pass)."""
        ref = self.raw_base if self.raw_base is not None else (
            self._tensors[0] if self._tensors is not None else self._deltas[0])
        return torch.full((), value, dtype=work_dtype(ref.dtype), device=ref.device)

    @property
    def numel(self) -> int:
        ref = self.raw_base if self.raw_base is not None else (
            self._tensors[0] if self._tensors is not None else self._deltas[0])
        return ref.numel()

    @property
    def shape(self) -> torch.Size:
        ref = self.raw_base if self.raw_base is not None else (
            self._tensors[0] if self._tensors is not None else self._deltas[0])
        return ref.shape

    def raw(self, i: int) -> torch.Tensor | None:
        """Model i's tensor as stored, or None when only its delta was given."""
        return self._tensors[i] if self._tensors is not None else None

    def tensor(self, i: int) -> torch.Tensor:
        if self._tensors is None:
            return self.base + self._deltas[i]
        if i not in self._tensor_cache:
            t = self._tensors[i]
            self._tensor_cache[i] = t.to(work_dtype(t.dtype))
        return self._tensor_cache[i]

    def delta(self, i: int) -> torch.Tensor:
        if self._deltas is not None:
            return self._deltas[i]
        if i not in self._delta_cache:
            self._delta_cache[i] = self.tensor(i) - self.base
        return self._delta_cache[i]

    def abs_delta(self, i: int) -> torch.Tensor:
        """|delta_i|, flattened (computed once). From a stored tensor it is made in one
        buffer, in place (2.5x faster than three allocating passes on a large tensor)."""
        if i not in self._abs_cache:
            if self._tensors is not None and i not in self._delta_cache and self.raw_base is not None:
                a = self._tensors[i].to(work_dtype(self._tensors[i].dtype), copy=True)
                a.sub_(self.base)
                self._abs_cache[i] = a.abs_().reshape(-1)
            else:
                self._abs_cache[i] = self.delta(i).abs().reshape(-1)
        return self._abs_cache[i]

    def delta_blocks(self, i: int, size: int):
        """(lo, hi, delta_i over flat elements [lo, hi)), in the work dtype: the same
        bits as :meth:`delta`, without a whole float copy of a stored tensor."""
        n = self.numel
        whole = self._deltas[i] if self._deltas is not None else self._delta_cache.get(i)
        if whole is None and (self._tensors is None or self.raw_base is None):
            whole = self.delta(i)
        for lo in range(0, n, size):
            hi = min(n, lo + size)
            if whole is not None:
                yield lo, hi, whole.reshape(-1)[lo:hi]
            else:
                t, b = self._tensors[i].reshape(-1)[lo:hi], self.raw_base.reshape(-1)[lo:hi]
                yield lo, hi, t.to(work_dtype(t.dtype)) - b.to(work_dtype(b.dtype))

    def _blocked(self, i: int) -> bool:
        """Whether model i's |delta| is read block by block (a large stored tensor whose
        float32 delta is not already held)."""
        from mergesearch.methods.kernels import is_streaming
        return (is_streaming() and self.numel > SELECT_BLOCK and self._tensors is not None and self.raw_base is not None
                and i not in self._delta_cache and i not in self._abs_cache
                and work_dtype(self._tensors[i].dtype) == torch.float32)

    def _native(self, i: int) -> bool:
        """Whether model i's selection histograms come from the native kernels (a large
        stored tensor on the CPU): no float copy of its delta is made at all."""
        return (self.numel > SELECT_BLOCK and self._tensors is not None and self.raw_base is not None
                and native.selects(self._tensors[i], self.raw_base))

    def _abs_blocks(self, i: int):
        """(offset, |delta_i| of the block) over flat blocks of SELECT_BLOCK elements, the
        same bits as :meth:`abs_delta` (only for :meth:`_blocked` models: each block is a
        fresh tensor)."""
        for lo, _, d in self.delta_blocks(i, SELECT_BLOCK):
            yield lo, d.abs_()

    def select_abs(self, i: int, k: int) -> tuple[torch.Tensor, int, int]:
        """The k-th smallest |delta_i| (0-based) with the counts of elements below it
        and at or below it. Large tensors use a radix select on the float bits (a
        histogram of the top 16 bits, then an exact k-th value inside one bucket)."""
        if self._native(i) or self._blocked(i):
            return self._select_blocked(i, k)
        a = self.abs_delta(i)
        if _select_by_sort_and_radix8(a.device) and a.numel() >= SORT_MIN_NUMEL:
            if a.numel() < RADIX_MIN_NUMEL or a.dtype != torch.float32:
                v = torch.sort(a).values[k]
                n = torch.stack([(a < v).sum(), (a <= v).sum()]).tolist()
                return v, n[0], n[1]
            bits = a.view(torch.int32)
            if self._hist_cache.get(i, ("",))[0] != "radix8":
                self._hist_cache[i] = ("radix8", first_digit_cumsum(bits))
            vb, below, at = radix_select_bits(bits, k, self._hist_cache[i][1])
            return torch.tensor([vb], dtype=torch.int32).view(torch.float32)[0].to(a.device), below, at
        if a.numel() < RADIX_MIN_NUMEL or a.dtype != torch.float32:
            v = torch.kthvalue(a, k + 1).values
            return v, int((a < v).sum()), int((a <= v).sum())
        if self._hist_cache.get(i, ("",))[0] != "whole":
            top = a.view(torch.int32) >> 16  # non-negative floats order like their bits
            self._hist_cache[i] = ("whole", top, torch.bincount(top.reshape(-1), minlength=1 << 15).cumsum(0))
        _, top, cum = self._hist_cache[i]
        b = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device), right=True))
        below = int(cum[b - 1]) if b > 0 else 0
        bucket = a[top == b]
        v = torch.kthvalue(bucket, k - below + 1).values
        return v, below + int((bucket < v).sum()), below + int((bucket <= v).sum())

    def _select_blocked(self, i: int, k: int) -> tuple[torch.Tensor, int, int]:
        """:meth:`select_abs` over blocks, as a two-level radix select on the float bits
        (non-negative floats order like their bits): the histogram of the top 16 bits,
        summed over blocks, finds the k-th value's bucket; a histogram of the low 16 bits
        of that bucket's elements finds the value itself, and both give the exact counts.
        The first pass keeps each element's top 16 bits (2 bytes an element), so the
        second reads only the bucket's elements again."""
        nat = self._native(i)
        if self._hist_cache.get(i, ("",))[0] != "blocked" and nat:
            tops, counts = native.abs_top16(self._tensors[i], self.raw_base)
            self._hist_cache[i] = ("blocked", counts.cumsum(0), tops)
        elif self._hist_cache.get(i, ("",))[0] != "blocked":
            counts = None
            tops = torch.empty(self.numel, dtype=torch.int16, device=self._tensors[i].device)
            for lo, a in self._abs_blocks(i):
                top = a.view(torch.int32) >> 16  # at most 0x7F80 for a finite float: fits int16
                c = torch.bincount(top, minlength=1 << 15)
                counts = c if counts is None else counts.add_(c)
                tops[lo:lo + top.numel()] = top
            self._hist_cache[i] = ("blocked", counts.cumsum(0), tops)
        _, cum, tops = self._hist_cache[i]
        b = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device), right=True))
        below = int(cum[b - 1]) if b > 0 else 0
        if nat:
            cum2 = native.abs_low16(self._tensors[i], self.raw_base, tops, b).cumsum(0)
        else:
            where = (tops == b).nonzero().reshape(-1)
            t, base = self._tensors[i].reshape(-1), self.raw_base.reshape(-1)
            a = t[where].to(torch.float32)
            a.sub_(base[where].to(torch.float32))  # the bits :meth:`_abs_blocks` makes
            cum2 = torch.bincount(a.abs_().view(torch.int32) & 0xFFFF, minlength=1 << 16).cumsum(0)
        r = k - below
        j = int(torch.searchsorted(cum2, torch.tensor([r], device=cum2.device), right=True))
        v = torch.tensor([(b << 16) | j], dtype=torch.int32).view(torch.float32)[0].to(cum.device)
        return v, below + (int(cum2[j - 1]) if j > 0 else 0), below + int(cum2[j])

    def nth_position_equal(self, i: int, value: torch.Tensor, r: int) -> int:
        """The flat index of the r-th element (0-based, in index order) with |delta_i| == value."""
        if self._native(i):
            cached = self._hist_cache.get(i, ("",))
            j = native.nth_equal(self._tensors[i], self.raw_base, value, r,
                                 tops=cached[2] if cached[0] == "blocked" else None)
            if j < 0:
                raise IndexError(f"{self.name}: fewer elements equal to the threshold than counted")
            return j
        if not self._blocked(i):
            return int(self.positions_equal(i, value)[r])
        for lo, a in self._abs_blocks(i):
            eq = a == value
            c = int(eq.sum())
            if r < c:
                return lo + int(eq.nonzero().reshape(-1)[r])
            r -= c
        raise IndexError(f"{self.name}: fewer elements equal to the threshold than counted")

    def release(self, i: int) -> None:
        """Drop model i's float32 delta and selection scratch (the kernels re-read the
        raw tensor), so only one model's temporaries are alive at a time."""
        for cache in (self._delta_cache, self._abs_cache, self._hist_cache, self._tensor_cache):
            cache.pop(i, None)

    def positions_equal(self, i: int, value: torch.Tensor) -> torch.Tensor:
        """Flat indices where |delta_i| == value, ascending."""
        return (self.abs_delta(i) == value).nonzero().reshape(-1)

    @property
    def generator(self) -> torch.Generator:
        """One generator per output tensor, seeded from the recipe seed and the name."""
        if self._generator is None:
            device = self.scalar(0.0).device
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(tensor_seed(self.seed, self.name))
        return self._generator
