"""Fused merge kernels in Triton for tensors on an accelerator (the kernels: :mod:`triton_jit`).

On a CUDA device, when triton imports, :func:`mergesearch.methods.kernels.combine` and
``weighted_sum`` run one Triton kernel per tensor: every input read once, the output
written once in its dtype (deltas taken from the stored tensors, DARE masks, magnitude
windows, weights, TIES sign election, the disjoint or normalized sum, lambda, the base).
The magnitude selection (:mod:`mergesearch.methods.selection`) takes its thresholds from
radix passes over the float32 bits of |delta| computed in the kernel (no float copy of a
delta is made): :data:`DIGITS` gives four passes (8, 8, 8 and 7 bits, histograms of 256
bins in shared memory), the first shared by both ends of a window, and one more pass
(counts per block) where a threshold splits a run of equal magnitudes. A selection is
exact, so its thresholds are those of every other path.

Every result is the eager torch kernel's, bit for bit: the same float32 operations in the
same order, no FMA contraction (launched with ``enable_fp_fusion=False``), IEEE division
(``div_rn``) and torch's bfloat16 rounding (tests/test_triton_kernels.py runs the kernels
under ``TRITON_INTERPRET=1`` against the torch kernels). DARE's masks stay torch's
generator draws (:func:`mergesearch.methods.sparsify.dare_mask`); the kernel reads them.

``MERGESEARCH_TRITON=0`` turns the kernels off; ``MERGESEARCH_TRITON=force`` uses them on
every device and size, and with ``TRITON_INTERPRET=1`` (set before triton is imported) on
CPU tensors, through Triton's interpreter: for tests. Float64 tensors, non-contiguous
inputs, per-row weights and more than :data:`MAX_MODELS` models keep the torch kernels.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

log = logging.getLogger(__name__)

MIN_NUMEL = 1 << 12  # combine and weighted sum on an accelerator from this size
SELECT_MIN_NUMEL = 1 << 15  # the radix selection from this size (smaller ones sort)
MAX_MODELS = 8
BLOCK = 1024  # elements a program of the combine and weighted-sum kernels
HIST_BLOCK, HIST_TILES = 1024, 16  # a histogram program reads up to HIST_TILES blocks
COUNT_BLOCK = 1024  # the block of the tie-position counts
DIGITS = ((23, 8), (15, 8), (7, 8), (0, 7))  # (shift, width) of each radix pass, top first
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MIN_TRITON = (3, 4)  # tl.histogram's mask

_jit = None
_tried = False


def mode() -> str:
    """"off" (``MERGESEARCH_TRITON=0``), "force" (every device and size) or "on" (CUDA)."""
    v = os.environ.get("MERGESEARCH_TRITON", "1")
    return "off" if v == "0" else "force" if v == "force" else "on"


def jit():
    """The kernels' module, or None where triton does not import (logged once)."""
    global _jit, _tried
    if _jit is None and not _tried:
        _tried = True
        try:
            import triton

            if tuple(int(p) for p in triton.__version__.split(".")[:2]) < MIN_TRITON:
                raise ImportError(f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}")
            from mergesearch.methods import triton_jit
            _jit = triton_jit
        except Exception as e:  # no triton, or one that does not load: the torch kernels
            log.info("Triton merge kernels unavailable (%s: %s); using the torch kernels", type(e).__name__, e)
    return _jit


def applies(device, numel: int, min_numel: int = MIN_NUMEL) -> bool:
    """Whether the Triton kernels serve a tensor of ``numel`` elements on ``device``."""
    m = mode()
    if m == "off" or numel >= 1 << 31:
        return False
    dev = torch.device(device)
    if m == "force":
        ok = dev.type != "cpu" or os.environ.get("TRITON_INTERPRET") == "1"
    else:
        ok = dev.type == "cuda" and numel >= min_numel
    return ok and jit() is not None


def _ok(t, device, dtypes=KINDS) -> bool:
    return isinstance(t, torch.Tensor) and t.device == device and t.dtype in dtypes and t.is_contiguous()


def _arg(t: torch.Tensor) -> torch.Tensor:
    """A tensor as the kernels take it: bfloat16 as its int16 bits."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _pack(values, dtype: torch.dtype, device) -> torch.Tensor:
    """Python numbers and 0-d tensors as one tensor on the device (converted as torch
    converts them: a float to float32 rounds to nearest), with no synchronization."""
    if not any(isinstance(v, torch.Tensor) for v in values):
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.stack([v.detach().reshape(()).to(device=device, dtype=dtype) if isinstance(v, torch.Tensor)
                        else torch.tensor(v, dtype=dtype, device=device) for v in values])


def _on(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _destination(out, like: torch.Tensor, out_dtype) -> torch.Tensor:
    dtype = out_dtype or torch.float32
    if _ok(out, like.device) and out.dtype == dtype and out.numel() == like.numel():
        return out
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def _scalar_weights(weights) -> bool:
    return all(not isinstance(w, torch.Tensor) or w.numel() == 1 for w in weights)


def combine(raw_base, sources, is_delta, windows, weights, lam, normalize, consensus, divisor, out_dtype=None,
            masks=None, out=None) -> torch.Tensor | None:
    """:func:`mergesearch.methods.kernels.combine` in one Triton kernel, or None where it
    does not apply (see the module docstring). The result goes into ``out`` when it fits."""
    k, dev, n = len(sources), raw_base.device, raw_base.numel()
    if not (1 <= k <= MAX_MODELS and _ok(raw_base, dev) and _scalar_weights(weights)) \
            or (out_dtype is not None and out_dtype not in KINDS):
        return None
    masks = masks if masks is not None else [None] * k
    flags, fvals, ivals = 0, [], []
    for j, (src, delta, win, mk, w) in enumerate(zip(sources, is_delta, windows, masks, weights)):
        if not _ok(src, dev, (torch.float32,) if delta else KINDS) or src.numel() != n:
            return None
        if win is not None and win[0] is not None:  # a window with its own key
            return None
        if mk is not None and not (_ok(mk[0], dev, (torch.bool,)) and mk[0].numel() == n):
            return None
        factor = mk is not None and mk[1] is not None
        flags |= (KINDS[src.dtype] | int(bool(delta)) << 2 | int(mk is not None) << 3 | int(factor) << 4
                  | int(win is not None) << 5) << (6 * j)
        fvals += [w, 0.0 if win is None else win[1], 0.0 if win is None else win[2], mk[1] if factor else 0.0]
        ivals += [0 if win is None else win[3], 0 if win is None else win[4]]
    fp = _pack(fvals + [lam, divisor], torch.float32, dev)
    ip = _pack(ivals, torch.int64, dev)
    dest = _destination(out, raw_base, out_dtype)
    base = _arg(raw_base)
    srcs = [_arg(s) for s in sources] + [base] * (MAX_MODELS - k)
    mks = [base if mk is None else mk[0].view(torch.uint8) for mk in masks] + [base] * (MAX_MODELS - k)
    with _on(dev):
        jit().combine_kernel[(triton_cdiv(n, BLOCK),)](
            _arg(dest), base, *srcs, *mks, fp, ip, n, K=k, FLAGS=flags, BASE_KIND=KINDS[raw_base.dtype],
            OUT_KIND=KINDS[dest.dtype], NORMALIZE=bool(normalize), CONSENSUS=bool(consensus), BLOCK=BLOCK,
            num_warps=4, enable_fp_fusion=False)
    return dest


def weighted_sum(sources, weights, divisor, normalize, out_dtype=None, out=None) -> torch.Tensor | None:
    """:func:`mergesearch.methods.kernels.weighted_sum` in one Triton kernel, or None."""
    k, dev, n = len(sources), sources[0].device, sources[0].numel()
    if not (1 <= k <= MAX_MODELS and _scalar_weights(weights)) or (out_dtype is not None and out_dtype not in KINDS) \
            or any(not _ok(s, dev) or s.numel() != n for s in sources):
        return None
    flags = 0
    for j, s in enumerate(sources):
        flags |= KINDS[s.dtype] << (6 * j)
    fp = _pack(list(weights) + [divisor], torch.float32, dev)
    dest = _destination(out, sources[0], out_dtype)
    srcs = [_arg(s) for s in sources]
    srcs += [srcs[0]] * (MAX_MODELS - k)
    with _on(dev):
        jit().weighted_sum_kernel[(triton_cdiv(n, BLOCK),)](
            _arg(dest), *srcs, fp, n, K=k, FLAGS=flags, OUT_KIND=KINDS[dest.dtype], NORMALIZE=bool(normalize),
            BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    return dest


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---------------------------------------------------------------- selection

def selection_source(x, i: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(src, base) with |src - base| model i's |delta| as the torch selection computes it
    (base None: src is the float32 delta), or None where the Triton selection does not
    apply. ``x`` is a :class:`mergesearch.methods.inputs.TensorInputs`."""
    if not applies(x.device, x.numel, SELECT_MIN_NUMEL):
        return None
    raw, base = x.raw(i), x.raw_base
    if raw is not None and base is not None and not x.holds_delta(i):
        ok = _ok(raw, raw.device) and _ok(base, raw.device) and raw.numel() == base.numel()
        return (raw, base) if ok else None
    d = x.delta(i)
    return (d, None) if _ok(d, d.device, (torch.float32,)) else None


def hist_tiles(n: int) -> int:
    """Blocks a histogram program reads: a power of two up to HIST_TILES, so that a tensor
    gives about 1024 programs or more (each adds its counts to the global histogram once)."""
    tiles = 1
    while tiles < HIST_TILES and n >= HIST_BLOCK * 1024 * tiles * 2:
        tiles *= 2
    return tiles


def _launch_hist(src, base, prefix: int, pshift: int, shift: int, width: int) -> list[int]:
    n = src.numel()
    hist = torch.zeros(1 << width, dtype=torch.int32, device=src.device)
    tiles = hist_tiles(n)
    grid = (triton_cdiv(n, HIST_BLOCK * tiles),)
    with _on(src.device):
        jit().radix_hist_kernel[grid](
            _arg(src), _arg(base if base is not None else src), hist, n, prefix, SRC_KIND=KINDS[src.dtype],
            BASE_KIND=-1 if base is None else KINDS[base.dtype], PSHIFT=pshift, SHIFT=shift, NBITS=width,
            BLOCK=HIST_BLOCK, TILES=tiles, num_warps=4, enable_fp_fusion=False)
    cum, total = [], 0
    for c in hist.tolist():
        total += c
        cum.append(total)
    return cum


def select_abs(src, base, k: int, scratch) -> tuple[torch.Tensor, int, int]:
    """The k-th smallest (0-based) |src - base| as a float32 0-d tensor on the device, with
    the counts of elements below it and at or below it: one radix pass a digit of
    :data:`DIGITS`, each over the elements whose higher digits are the k-th's. The first
    pass's histogram is kept in ``scratch.hist`` for the window's other end."""
    below, prefix, pshift = 0, 0, 31
    for level, (shift, width) in enumerate(DIGITS):
        if level == 0 and scratch.kind() == "triton":
            cum = scratch.hist[1]
        else:
            cum = _launch_hist(src, base, prefix, pshift, shift, width)
            if level == 0:
                scratch.hist = ("triton", cum)
        r = k - below
        d = next(j for j, c in enumerate(cum) if c > r)
        before = cum[d - 1] if d else 0
        below += before
        prefix, pshift = (prefix << width) | d, shift
    v = torch.tensor([prefix], dtype=torch.int32).view(torch.float32)[0].to(src.device)
    return v, below, below + cum[d] - before


def nth_equal(src, base, value: torch.Tensor, r: int) -> int:
    """The flat index of the r-th element (0-based, in index order) with |src - base| ==
    ``value`` (the same float32 bits), or -1: one counting pass, then one block."""
    n = src.numel()
    bits = int(value.detach().to("cpu", torch.float32).reshape(1).view(torch.int32)[0])
    blocks = triton_cdiv(n, COUNT_BLOCK)
    counts = torch.empty(blocks, dtype=torch.int32, device=src.device)
    kinds = dict(SRC_KIND=KINDS[src.dtype], BASE_KIND=-1 if base is None else KINDS[base.dtype], BLOCK=COUNT_BLOCK)
    b = _arg(base if base is not None else src)
    with _on(src.device):
        jit().count_equal_kernel[(blocks,)](_arg(src), b, counts, n, bits, **kinds, num_warps=4,
                                            enable_fp_fusion=False)
    cum = counts.cumsum(0)
    blk = int(torch.searchsorted(cum, torch.tensor([r], dtype=cum.dtype, device=cum.device), right=True))
    if blk >= blocks:
        return -1
    before = int(cum[blk - 1]) if blk else 0
    pos = torch.empty(1, dtype=torch.int64, device=src.device)
    with _on(src.device):
        jit().position_equal_kernel[(1,)](_arg(src), b, pos, n, blk * COUNT_BLOCK, r - before, bits, **kinds,
                                          num_warps=4, enable_fp_fusion=False)
    return int(pos[0])

