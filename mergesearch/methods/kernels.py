"""The fused combine step of the task-vector family.

``combine`` turns task vectors into the merged tensor in one pass over memory:
select each delta's elements by magnitude (a threshold), weight it, elect signs (TIES), sum the
agreeing parts, normalize, scale by lambda and add to the base. Eagerly that is
some twenty full-tensor passes; compiled by TorchInductor into one fused loop it
runs about 15x faster on large tensors (see docs/BENCHMARKS.md).

On the CPU the native kernel (:mod:`mergesearch.methods.native`) runs first, for every size: the
eager kernel's arithmetic in one C++ loop. Elsewhere, or without it, which torch
implementation runs depends only on the tensor's size (compiled from ``COMPILE_MIN_NUMEL``
elements, when compilation is available). On a CUDA device with triton installed, one
Triton kernel (:mod:`mergesearch.methods.triton_kernels`) runs first, from
``triton_kernels.MIN_NUMEL`` elements. All give the same bits, so the streamed
export and the in-memory Materializer stay bit-equal whichever path each takes. Set
``MERGESEARCH_COMPILE=0`` to never compile, ``MERGESEARCH_NATIVE=0`` to skip the native kernel,
``MERGESEARCH_TRITON=0`` to skip the Triton kernels.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager

import torch

from mergesearch.methods import native, triton_kernels

log = logging.getLogger(__name__)

COMPILE_MIN_NUMEL = 1 << 20
# The eager kernels run over flat chunks of this many elements, so their temporaries
# (some fifteen float32 buffers) are bounded by the chunk, not by the tensor. Every
# operation is elementwise, so the result is the same, bit for bit.
EAGER_CHUNK = 1 << 18
# On the CPU a chunk of 256K elements (1 MB of float32) stays in cache between the passes;
# an accelerator wants fewer, larger launches.
EAGER_CHUNK_ACCEL = 1 << 22

_streaming = False


@contextmanager
def streaming():
    """A one-shot merge (the streamed export): on the CPU, merges without selection or
    sign election run eagerly (loading torch.compile costs some 5 s per process, more than
    it saves once), and selections read large tensors in blocks (bounded memory). A
    long-lived worker keeps the compiled kernels and whole-tensor selections, which are
    faster per candidate. Both give the same bits."""
    global _streaming
    old, _streaming = _streaming, True
    try:
        yield
    finally:
        _streaming = old


def is_streaming() -> bool:
    return _streaming


def eager_chunk(device) -> int:
    return EAGER_CHUNK if torch.device(device).type == "cpu" else EAGER_CHUNK_ACCEL


# Variants of a compiled kernel (flags, model count, grad mode) each compile once; past
# Dynamo's default limit of 8 it would silently fall back to the eager kernel.
RECOMPILE_LIMIT = 64
_compiled = None
_compile_failed = False


def _combine(raw_base: torch.Tensor, sources: list[torch.Tensor], is_delta: list[bool], windows: list[tuple],
             weights: list[float], lam: float, normalize: bool, consensus: bool, divisor: float,
             offset: int = 0, masks: list | None = None) -> torch.Tensor:
    wd = torch.float64 if raw_base.dtype == torch.float64 else torch.float32
    base = raw_base.to(wd)
    parts = []
    idx = torch.arange(offset, offset + base.numel(), device=base.device).reshape(base.shape)
    for k, (src, delta_given, window, w) in enumerate(zip(sources, is_delta, windows, weights)):
        d = src if delta_given else src.to(wd) - base
        if masks is not None and masks[k] is not None:  # DARE: kept elements, L1 factor
            keep_k, factor = masks[k]
            d = torch.where(keep_k, d if factor is None else d * factor, 0.0)
        if window is None:  # everything kept
            parts.append(torch.where(d != 0, d * w, 0.0))
            continue
        key, lo, hi, jlo, jhi = window
        key = d.abs() if key is None else key
        keep = ((key > lo) | ((key == lo) & (idx >= jlo))) & ((key < hi) | ((key == hi) & (idx < jhi)))
        # zero deltas (pruned or not) contribute exactly +0.0, whatever the weight's sign
        parts.append(torch.where(keep & (d != 0), d * w, 0.0))
    if consensus:
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        majority = torch.where(total >= 0, 1.0, -1.0)
        mixed = torch.zeros_like(base)
        div = torch.zeros_like(base)
        for p, w in zip(parts, weights):
            agree = p.sign() == majority
            mixed = mixed + torch.where(agree, p, 0.0)
            div = div + torch.where(agree, w, 0.0)
        div = div + (div == 0).to(div.dtype)
    else:
        mixed = parts[0]
        for p in parts[1:]:
            mixed = mixed + p
        div = divisor
    if normalize:
        mixed = mixed / div
    return base + mixed * lam


def _weighted_sum(sources: list[torch.Tensor], weights: list[float], divisor: float, normalize: bool) -> torch.Tensor:
    wd = torch.float64 if sources[0].dtype == torch.float64 else torch.float32
    out = sources[0].to(wd) * weights[0]
    for t, w in zip(sources[1:], weights[1:]):
        out = out + t.to(wd) * w
    return out / divisor if normalize else out


def _compile_available() -> bool:
    if os.environ.get("MERGESEARCH_COMPILE", "1") == "0":
        return False
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


_compiled_sum = None
# In a one-shot merge on the CPU a weighted sum is a few cache-resident passes eagerly,
# about as fast as the compiled loop, and loading torch.compile costs some 5 s.
def _compile_sum(device) -> bool:
    return torch.device(device).type != "cpu" or not _streaming


def _values(v, dtype: torch.dtype, device) -> torch.Tensor:
    """Weights, lambda and divisors reach the kernels as tensors in the work dtype (the
    same arithmetic as Python floats): a compiled kernel then takes new values without
    recompiling. Python floats would be specialized, then made symbolic after the first
    change, and torch 2.13 computed wrong merges with symbolic floats in this kernel
    (tests/test_kernel_compiled.py)."""
    key = (tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v), dtype, str(device))
    t = _VALUES.get(key)
    if t is None:  # one host-to-device copy per distinct value set, not one per tensor merged
        if len(_VALUES) >= 512:
            _VALUES.clear()
        t = _VALUES[key] = torch.tensor(list(key[0]) if isinstance(key[0], tuple) else key[0], dtype=dtype,
                                        device=device)
    return t


_VALUES: dict = {}


# The compiled kernels also run over flat blocks of this many elements: TorchInductor
# keeps some full-size buffers (the sign election reads every part twice), so a
# whole 49M-element embedding would hold several float32 copies at once.
COMPILED_BLOCK = 1 << 21


def _blocks(n: int, size: int):
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def _flat(t: torch.Tensor | None, lo: int, hi: int):
    return t if t is None or not isinstance(t, torch.Tensor) or t.dim() == 0 else t.reshape(-1)[lo:hi]


def _flat_masks(masks: list | None, lo: int, hi: int) -> list | None:
    return None if masks is None else [mk if mk is None else (_flat(mk[0], lo, hi), mk[1]) for mk in masks]


def _combine_chunked(raw_base, sources, is_delta, windows, weights, lam, normalize, consensus, divisor,
                     out_dtype=None, masks=None):
    """The eager :func:`_combine` over flat chunks of ``EAGER_CHUNK`` elements."""
    n = raw_base.numel()
    chunk = eager_chunk(raw_base.device)
    if n <= chunk:
        return _combine(raw_base, sources, is_delta, windows, weights, lam, normalize, consensus, divisor,
                        masks=masks)
    wd = torch.float64 if raw_base.dtype == torch.float64 else torch.float32
    out = torch.empty(n, dtype=out_dtype or wd, device=raw_base.device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        out[lo:hi] = _combine(_flat(raw_base, lo, hi), [_flat(s, lo, hi) for s in sources], is_delta,
                              [w if w is None else (_flat(w[0], lo, hi), *w[1:]) for w in windows], weights, lam,
                              normalize, consensus,
                              divisor, offset=lo, masks=_flat_masks(masks, lo, hi))
    return out.reshape(raw_base.shape)


def combine_rows(raw_base, sources, is_delta, windows, weights, lam, normalize, consensus, out_dtype=None,
                 masks=None) -> torch.Tensor:
    """:func:`combine` with per-row weights (a refinement's ``row_scales``): ``weights[i]``
    is a float or a vector of one weight per row of the 2-D tensor. Model i's delta at
    row r is weighted by its weight there, the sign election sees the weighted deltas, and
    ``normalize`` divides by the sum of the weights at each element (the agreeing ones under
    consensus). The eager :func:`_combine` over blocks of whole rows, each block a 2-D view
    that the (rows, 1) weights broadcast over: scratch bounded like the eager chunks."""
    wd = torch.float64 if raw_base.dtype == torch.float64 else torch.float32
    rows, cols = raw_base.shape
    out = torch.empty(raw_base.shape, dtype=out_dtype or wd, device=raw_base.device)
    windows = [w if w is None else tuple(w) for w in windows]
    step = max(1, eager_chunk(raw_base.device) // max(cols, 1))

    def block(t, lo, hi):  # rows r0:r1 of a tensor stored flat or 2-D, as (r1 - r0, cols)
        f = _flat(t, lo, hi)
        return f if f is None or not isinstance(f, torch.Tensor) or f.dim() == 0 else f.view(-1, cols)

    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        lo, hi = r0 * cols, r1 * cols
        ws = [w[r0:r1].to(device=raw_base.device, dtype=wd).unsqueeze(-1) if isinstance(w, torch.Tensor) else w
              for w in weights]
        total = sum(ws)
        if isinstance(total, torch.Tensor):  # the normalizer without consensus, per row
            divisor = torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
        else:
            divisor = 1.0 if abs(total) < 1e-8 else total
        out[r0:r1] = _combine(block(raw_base, lo, hi), [block(t, lo, hi) for t in sources], is_delta,
                              [w if w is None else (block(w[0], lo, hi), *w[1:]) for w in windows], ws, lam,
                              normalize, consensus, divisor, offset=lo,
                              masks=None if masks is None else [mk if mk is None else (block(mk[0], lo, hi), mk[1])
                                                                for mk in masks])
    return out


def _weighted_sum_chunked(sources, weights, divisor: float, normalize: bool, out_dtype=None) -> torch.Tensor:
    n = sources[0].numel()
    chunk = eager_chunk(sources[0].device)
    if n <= chunk:
        return _weighted_sum(sources, weights, divisor, normalize)
    wd = torch.float64 if sources[0].dtype == torch.float64 else torch.float32
    out = torch.empty(n, dtype=out_dtype or wd, device=sources[0].device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        out[lo:hi] = _weighted_sum([_flat(s, lo, hi) for s in sources], weights, divisor, normalize)
    return out.reshape(sources[0].shape)


def _compile(fn):
    try:  # the option's name since torch 2.6; older releases call it cache_size_limit
        import torch._dynamo.config as dcfg
        for opt in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, opt):
                setattr(dcfg, opt, max(getattr(dcfg, opt), RECOMPILE_LIMIT))
                break
    except ImportError:
        pass
    return torch.compile(fn, dynamic=True)


def weighted_sum(sources, weights, divisor: float = 1.0, normalize: bool = False, out_dtype=None,
                 out=None) -> torch.Tensor:
    """sum_i w_i * sources_i (in the work dtype), divided by ``divisor`` if normalize.
    A tensor large enough to be computed in blocks is returned in ``out_dtype`` (when
    given), each block cast as it is made: no full-size work-dtype copy is held."""
    global _compiled_sum
    if triton_kernels.applies(sources[0].device, sources[0].numel()):  # one Triton kernel, the same bits
        made = triton_kernels.weighted_sum(list(sources), weights, divisor, normalize, out_dtype=out_dtype, out=out)
        if made is not None:
            return made
    if sources[0].device.type == "cpu":
        made = native.weighted_sum(list(sources), weights, divisor, normalize, out_dtype=out_dtype, out=out)
        if made is not None:
            return made
    wd = torch.float64 if sources[0].dtype == torch.float64 else torch.float32
    args = (list(sources), _values(weights, wd, sources[0].device), _values(divisor, wd, sources[0].device),
            bool(normalize))
    if _compile_sum(sources[0].device) and sources[0].numel() >= COMPILE_MIN_NUMEL and not _compile_failed \
            and _compile_available():
        if _compiled_sum is None:
            _compiled_sum = _compile(_weighted_sum)
        try:
            n = sources[0].numel()
            if n <= COMPILED_BLOCK:
                return _compiled_sum(*args)
            out = torch.empty(n, dtype=out_dtype or wd, device=sources[0].device)
            for lo, hi in _blocks(n, COMPILED_BLOCK):
                out[lo:hi] = _compiled_sum([_flat(t, lo, hi) for t in args[0]], *args[1:])
            return out.reshape(sources[0].shape)
        except Exception as e:
            _disable(e)
    return _weighted_sum_chunked(*args, out_dtype=out_dtype)


def _disable(e: Exception) -> None:
    global _compile_failed
    _compile_failed = True
    log.warning("torch.compile unavailable (%s); using the eager merge kernels", type(e).__name__)


def combine(raw_base, sources, is_delta, windows, weights, lam, normalize, consensus, divisor=1.0,
            out_dtype=None, masks=None, out=None) -> torch.Tensor:
    """base + lam * merge of the selected, weighted deltas (see module docstring).

    ``sources[i]`` is model i's tensor as stored (its delta is taken inside the
    kernel, so bf16 inputs are read once, at 2 bytes an element) or, where
    ``is_delta[i]``, an already sparsified float delta. ``windows[i]`` is the
    selection of model i from :func:`mergesearch.methods.selection.window`.
    ``divisor`` is the normalizer without consensus (the sum of the weights).
    ``masks[i]`` (DARE), when given: (kept elements as bool, L1 factor or None); model
    i's delta is then ``delta * factor`` where kept and 0 elsewhere.
    ``out_dtype``: as in :func:`weighted_sum`. ``out``: a tensor the native kernel may
    write the result into (and return); the other kernels leave it alone."""
    global _compiled
    wd = torch.float64 if raw_base.dtype == torch.float64 else torch.float32
    dev = raw_base.device
    windows = [w if w is None else tuple(w) for w in windows]  # None: everything kept
    if triton_kernels.applies(dev, raw_base.numel()):  # on an accelerator: one Triton kernel, the same bits
        made = triton_kernels.combine(raw_base, list(sources), is_delta, windows, weights, lam, normalize, consensus,
                                      divisor, out_dtype=out_dtype, masks=masks, out=out)
        if made is not None:
            return made
    if dev.type == "cpu":  # the native kernel: the same bits, no compilation, one pass
        made = native.combine(raw_base, list(sources), is_delta, windows, weights, lam, normalize, consensus,
                              divisor, out_dtype=out_dtype, masks=masks, out=out)
        if made is not None:
            return made
    scalars = (_values(weights, wd, dev), _values(lam, wd, dev), bool(normalize), bool(consensus),
               _values(divisor, wd, dev))
    # in a one-shot merge on the CPU, a merge without selection or sign election is a few
    # cache-resident eager passes and needs no torch.compile (some 5 s to load)
    selective = consensus or any(w is not None for w in windows) or dev.type != "cpu" or not _streaming
    if selective and raw_base.numel() >= COMPILE_MIN_NUMEL and not _compile_failed and _compile_available():
        # the compiled kernel takes one form of window: "everything" as bounds
        full = (None, _values(0.0, wd, dev), _values(float("inf"), wd, dev),
                torch.zeros((), dtype=torch.int64, device=dev),
                torch.full((), raw_base.numel(), dtype=torch.int64, device=dev))
        args = (raw_base, list(sources), [bool(b) for b in is_delta], [full if w is None else w for w in windows],
                *scalars)
        if _compiled is None:
            _compiled = _compile(_combine)
        try:
            n = raw_base.numel()
            if n <= COMPILED_BLOCK:
                return _compiled(*args, masks=masks)
            out = torch.empty(n, dtype=out_dtype or wd, device=dev)
            for lo, hi in _blocks(n, COMPILED_BLOCK):
                out[lo:hi] = _compiled(_flat(raw_base, lo, hi), [_flat(t, lo, hi) for t in args[1]], args[2],
                                       [(_flat(w[0], lo, hi), *w[1:]) for w in args[3]], *args[4:], offset=lo,
                                       masks=_flat_masks(masks, lo, hi))
            return out.reshape(raw_base.shape)
        except Exception as e:  # no working compiler toolchain: stay eager from now on
            _disable(e)
    return _combine_chunked(raw_base, list(sources), [bool(b) for b in is_delta], windows, *scalars,
                            out_dtype=out_dtype, masks=masks)
