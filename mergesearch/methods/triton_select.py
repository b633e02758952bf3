"""The magnitude selection on an accelerator, in Triton kernels (:mod:`triton_jit`).

The k-th smallest |delta_i| (0-based), the counts of elements below it and at or below
it, and the flat index that splits a run of equal magnitudes at a threshold: exactly what
:mod:`mergesearch.methods.selection` defines, so every path gives the same thresholds.
|delta_i| is computed inside the kernels from the stored tensors (no float copy of a
delta is made), as float32 bits, which order like the magnitudes.

Passes over model i's tensor and the base:

1. The histogram of the top 16 bits (32768 bins). It depends on the inputs alone, so it
   is kept between candidates in the inputs' ``FactorCache`` where they have one (its
   nonzero bins and their cumulative counts: a few kB a tensor and model); without one
   (a one-shot merge; the Materializer makes a cache only for methods with factors)
   each candidate makes it again.
2. Per threshold bucket (TIES: one; breadcrumbs: two), the bucket's elements are gathered
   as int64 keys (bits << 31 | index) and sorted: the k-th value, both counts and the tie
   position are read off that sorted run. A bucket spans 1/128 of a binary octave of
   magnitudes, typically well under 1% of the tensor. A crowded bucket (over
   ``COMPACT_MIN`` elements and ``COMPACT_SHARE`` of the tensor) takes two 8-bit radix
   passes over its low 16 bits instead, and a counting pass for a tie position.

So a TIES candidate reads each model once more than the combine does (twice without a
kept histogram), and synchronizes with the host about three times a model. With
``HISTOGRAM = "radix"`` the bucket comes from two radix passes in shared memory
instead of the atomic histogram (three reads of each model a TIES candidate).
"""

from __future__ import annotations

import torch

from mergesearch.methods import triton_kernels as tk

SELECT_MIN_NUMEL = 1 << 15  # on an accelerator, smaller tensors keep the torch selection (a sort)
HIST_BLOCK, HIST_COPIES = 1024, 8  # the top-16 histogram: elements a program, copies of the bins
HIST_COPIES_MIN_NUMEL = 1 << 20  # smaller tensors: one copy
COMPACT_BLOCK = 1024
COMPACT_MIN, COMPACT_SHARE = 1 << 16, 1 / 64  # a bucket is gathered up to max(MIN, SHARE * n) elements
RADIX_BLOCK, RADIX_TILES = 1024, 16  # the crowded-bucket radix passes
COUNT_BLOCK = 1024  # the tie-position counts, one per block
KEY_SHIFT, INDEX_MASK = 31, (1 << 31) - 1
# How a threshold's top-16-bit bucket is found: "atomics" (the 32768-bin histogram, by
# global atomic adds; kept between candidates where the inputs have a FactorCache) or
# "radix" (two passes of 8 and 7 bits in shared memory per threshold, the first shared by a
# window's ends; nothing kept). The same thresholds either way; which is faster on a
# GPU is for scripts/bench_kernels.py (``--histogram``) to tell.
HISTOGRAM = "atomics"


def selection_source(x, i: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(src, base) with |src - base| model i's |delta| as the torch selection computes it
    (base None: src is the float32 delta), or None where the Triton selection does not
    apply. ``x`` is a :class:`mergesearch.methods.inputs.TensorInputs`."""
    if not tk.applies(x.device, x.numel, SELECT_MIN_NUMEL):
        return None
    raw, base = x.raw(i), x.raw_base
    if raw is not None and base is not None and not x.holds_delta(i):
        ok = tk._ok(raw, raw.device) and tk._ok(base, raw.device) and raw.numel() == base.numel()
        return (raw, base) if ok else None
    d = x.delta(i)
    return (d, None) if tk._ok(d, d.device, (torch.float32,)) else None


def cache_kind(x, i: int) -> str:
    """The FactorCache kind of model i's top-16 histogram (one entry per tensor and model)."""
    return f"triton_abs_top16/{x.ids[i]}"


def _args(src, base) -> tuple:
    return tk._arg(src), tk._arg(base if base is not None else src)


def _kinds(src, base) -> dict:
    return {"SRC_KIND": tk.KINDS[src.dtype], "BASE_KIND": -1 if base is None else tk.KINDS[base.dtype]}


def top16(src, base) -> tuple[torch.Tensor, torch.Tensor]:
    """(the nonzero bins of the top-16-bit histogram of bits(|src - base|), their cumulative
    counts), both int64 on the host."""
    n = src.numel()
    copies = HIST_COPIES if n >= HIST_COPIES_MIN_NUMEL else 1  # few programs: one copy (less to zero and add)
    hist = torch.zeros(copies, 1 << 15, dtype=torch.int32, device=src.device)
    with tk._on(src.device):
        tk.jit().top16_hist_kernel[(tk.cdiv(n, HIST_BLOCK),)](
            *_args(src, base), hist, n, **_kinds(src, base), COPIES=copies, BLOCK=HIST_BLOCK, **tk.LAUNCH)
    h = hist.sum(0, dtype=torch.int64).cpu()
    nz = h.nonzero().reshape(-1)
    return nz, h[nz].cumsum(0)


def _gather(src, base, bucket: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sorted keys (bits << 31 | index) of the ``count`` elements in ``bucket``, how
    many the kernel found: ``count`` unless the inputs changed under a kept histogram)."""
    n = src.numel()
    keys = torch.empty(count, dtype=torch.int64, device=src.device)
    counter = torch.zeros(1, dtype=torch.int32, device=src.device)
    with tk._on(src.device):
        tk.jit().compact_kernel[(tk.cdiv(n, COMPACT_BLOCK),)](
            *_args(src, base), counter, keys, n, bucket, count, **_kinds(src, base), BLOCK=COMPACT_BLOCK,
            **tk.LAUNCH)
    return torch.sort(keys).values, counter


def _float(bits: int, device) -> torch.Tensor:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0].to(device)


def _tiles(n: int) -> int:
    """Blocks a radix program reads: a power of two up to RADIX_TILES, leaving about 1024
    programs or more (each adds its counts to the global histogram once)."""
    tiles = 1
    while tiles < RADIX_TILES and n >= RADIX_BLOCK * 1024 * tiles * 2:
        tiles *= 2
    return tiles


def _radix(src, base, prefix: int, pshift: int, shift: int, width: int) -> list[int]:
    """The cumulative histogram of the digit (u >> shift) & (2^width - 1) over the elements
    with u >> pshift == prefix (u = bits(|src - base|))."""
    n = src.numel()
    hist = torch.zeros(1 << width, dtype=torch.int32, device=src.device)
    tiles = _tiles(n)
    with tk._on(src.device):
        tk.jit().radix_hist_kernel[(tk.cdiv(n, RADIX_BLOCK * tiles),)](
            *_args(src, base), hist, n, prefix, **_kinds(src, base), PSHIFT=pshift, SHIFT=shift, NBITS=width,
            BLOCK=RADIX_BLOCK, TILES=tiles, **tk.LAUNCH)
    cum, total = [], 0
    for c in hist.tolist():
        total += c
        cum.append(total)
    return cum


def _run(keys: torch.Tensor, bits: int) -> list[int]:
    """[first, end) of the keys whose value bits are ``bits`` in sorted ``keys``."""
    bounds = torch.tensor([bits << KEY_SHIFT, (bits + 1) << KEY_SHIFT], dtype=torch.int64, device=keys.device)
    return torch.searchsorted(keys, bounds).tolist()


def _bucket(src, base, k: int, scratch, cached) -> tuple[int, int, int]:
    """(the top-16-bit bucket of the k-th smallest bits(|src - base|), the elements in lower
    buckets, the elements in it), from the kept histogram, or by two radix passes (8 and 7 bits)
    (``HISTOGRAM = "radix"``: no atomics on crowded bins; the first pass is shared by the
    window's two ends)."""
    state = scratch.hist[1]
    if HISTOGRAM == "radix" and state["top16"] is None:
        if state["top8"] is None:
            state["top8"] = _radix(src, base, 0, 31, 23, 8)
        cum = state["top8"]
        d = next(b for b, c in enumerate(cum) if c > k)
        below = cum[d - 1] if d else 0
        cum2 = _radix(src, base, d, 23, 16, 7)  # bits 16-22: with bits 23-30, the bucket u >> 16
        d2 = next(b for b, c in enumerate(cum2) if c > k - below)
        before = cum2[d2 - 1] if d2 else 0
        return (d << 7) | d2, below + before, cum2[d2] - before
    if state["top16"] is None:
        def build():
            return top16(src, base)
        state["top16"] = cached(build) if cached is not None else build()
    nz, cum = state["top16"]
    j = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype), right=True))
    below = int(cum[j - 1]) if j else 0
    return int(nz[j]), below, int(cum[j]) - below


def select_abs(src, base, k: int, scratch, cached=None) -> tuple[torch.Tensor, int, int]:
    """The k-th smallest (0-based) |src - base| as a float32 0-d tensor on the device, with
    the counts of elements below it and at or below it. ``scratch`` (a
    :class:`mergesearch.methods.selection.Scratch`) keeps the histograms and the gathered
    buckets for the window's other end and its tie positions; ``cached(build)`` returns
    the top-16 histogram kept between candidates (or builds it)."""
    if scratch.kind() != "triton":
        scratch.hist = ("triton", {"top16": None, "top8": None, "runs": {}})
    runs = scratch.hist[1]["runs"]
    bucket, below, count = _bucket(src, base, k, scratch, cached)
    if count <= max(COMPACT_MIN, int(src.numel() * COMPACT_SHARE)):
        keys = runs.get(bucket)
        if keys is None:
            keys, found = _gather(src, base, bucket, count)
            found, key = torch.cat([found.to(torch.int64), keys[k - below:k - below + 1]]).tolist()
            if found != count:  # a kept histogram that is not these inputs': a bug, not a user error
                raise RuntimeError(f"magnitude selection: {found} elements in bucket {bucket}, {count} counted")
            runs[bucket] = keys
        else:
            key = int(keys[k - below])
        bits = key >> KEY_SHIFT
        first, end = _run(keys, bits)
        return _float(bits, src.device), below + first, below + end
    prefix, pshift = bucket, 16  # a crowded bucket: two radix passes over the low 16 bits
    for shift, width in ((8, 8), (0, 8)):
        cum2 = _radix(src, base, prefix, pshift, shift, width)
        d = next(b for b, c in enumerate(cum2) if c > k - below)
        before = cum2[d - 1] if d else 0
        below += before
        prefix, pshift = (prefix << width) | d, shift
    return _float(prefix, src.device), below, below + cum2[d] - before


def nth_equal(src, base, value: torch.Tensor, r: int, scratch=None) -> int:
    """The flat index of the r-th element (0-based, in index order) with |src - base| ==
    ``value`` (the same float32 bits), or -1: from the gathered bucket when ``scratch``
    holds it, else one counting pass and one block."""
    n = src.numel()
    bits = int(value.detach().to("cpu", torch.float32).reshape(1).view(torch.int32)[0])
    keys = scratch.hist[1]["runs"].get(bits >> 16) if scratch is not None and scratch.kind() == "triton" else None
    if keys is not None:
        first, end = _run(keys, bits)
        return int(keys[first + r]) & INDEX_MASK if 0 <= r < end - first else -1
    blocks = tk.cdiv(n, COUNT_BLOCK)
    counts = torch.empty(blocks, dtype=torch.int32, device=src.device)
    kinds = {**_kinds(src, base), "BLOCK": COUNT_BLOCK}
    with tk._on(src.device):
        tk.jit().count_equal_kernel[(blocks,)](*_args(src, base), counts, n, bits, **kinds, **tk.LAUNCH)
    cum = counts.cumsum(0)
    blk = int(torch.searchsorted(cum, torch.tensor([r], dtype=cum.dtype, device=cum.device), right=True))
    if blk >= blocks:
        return -1
    before = int(cum[blk - 1]) if blk else 0
    pos = torch.empty(1, dtype=torch.int64, device=src.device)
    with tk._on(src.device):
        tk.jit().position_equal_kernel[(1,)](*_args(src, base), pos, n, blk * COUNT_BLOCK, r - before, bits,
                                             **kinds, **tk.LAUNCH)
    return int(pos[0])
