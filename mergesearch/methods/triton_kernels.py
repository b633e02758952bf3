"""Fused merge kernels in Triton for tensors on an accelerator (the kernels: :mod:`triton_jit`).

On a CUDA device, when triton imports, :func:`mergesearch.methods.kernels.combine` and
``weighted_sum`` run one Triton kernel per tensor: every input read once, the output
written once in its dtype (deltas taken from the stored tensors, DARE masks, magnitude
windows, weights, TIES sign election, the disjoint or normalized sum, lambda, the base).
The magnitude selection's thresholds come from :mod:`mergesearch.methods.triton_select`.

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
MAX_MODELS = 8
BLOCK = 1024  # elements a program of the combine and weighted-sum kernels
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MIN_TRITON = (3, 4)  # tl.histogram's mask
# every launch: no FMA contraction (on CUDA Triton contracts a * b + c by default; the torch
# kernels round the product and the sum apart), so the kernels give the eager kernels' bits
LAUNCH = {"num_warps": 4, "enable_fp_fusion": False}

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
    """Python numbers and 0-d tensors as one tensor on the device, a number converted as
    torch converts it (a float to float32 rounds to nearest). The numbers are copied to
    the device once per distinct set (a copy from the host waits for the device) and the
    tensors put in place by device operations, so a merge does not synchronize here."""
    where = tuple(j for j, v in enumerate(values) if isinstance(v, torch.Tensor))
    plain = tuple(0 if j in where else v for j, v in enumerate(values))
    key = (tuple(v.hex() if isinstance(v, float) else v for v in plain), where, dtype, str(device))  # -0.0 != 0.0
    made = _PACKED.get(key)
    if made is None:
        if len(_PACKED) >= 512:
            _PACKED.clear()
        made = _PACKED[key] = (torch.tensor(plain, dtype=dtype).to(device),
                               torch.tensor(where, dtype=torch.int64).to(device) if where else None)
    fixed, idx = made
    if idx is None:
        return fixed
    out = fixed.clone()
    out[idx] = torch.stack([values[j].detach().reshape(()).to(device=device, dtype=dtype) for j in where])
    return out


_PACKED: dict = {}


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
    if not (1 <= k <= MAX_MODELS and n > 0 and _ok(raw_base, dev) and _scalar_weights(weights)) \
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
    return _launch(lambda: jit().combine_kernel[(cdiv(n, BLOCK),)](
        _arg(dest), base, *srcs, *mks, fp, ip, n, K=k, FLAGS=flags, BASE_KIND=KINDS[raw_base.dtype],
        OUT_KIND=KINDS[dest.dtype], NORMALIZE=bool(normalize), CONSENSUS=bool(consensus), BLOCK=BLOCK, **LAUNCH),
        dev, dest)


def weighted_sum(sources, weights, divisor, normalize, out_dtype=None, out=None) -> torch.Tensor | None:
    """:func:`mergesearch.methods.kernels.weighted_sum` in one Triton kernel, or None."""
    k, dev, n = len(sources), sources[0].device, sources[0].numel()
    if not (1 <= k <= MAX_MODELS and n > 0 and _scalar_weights(weights)) \
            or (out_dtype is not None and out_dtype not in KINDS) \
            or any(not _ok(s, dev) or s.numel() != n for s in sources):
        return None
    flags = 0
    for j, s in enumerate(sources):
        flags |= KINDS[s.dtype] << (6 * j)
    fp = _pack(list(weights) + [divisor], torch.float32, dev)
    dest = _destination(out, sources[0], out_dtype)
    srcs = [_arg(s) for s in sources]
    srcs += [srcs[0]] * (MAX_MODELS - k)
    return _launch(lambda: jit().weighted_sum_kernel[(cdiv(n, BLOCK),)](
        _arg(dest), *srcs, fp, n, K=k, FLAGS=flags, OUT_KIND=KINDS[dest.dtype], NORMALIZE=bool(normalize),
        BLOCK=BLOCK, **LAUNCH), dev, dest)


def _launch(run, device, dest: torch.Tensor) -> torch.Tensor | None:
    """``dest`` after ``run()`` launched a kernel; None, and the Triton kernels off for this
    process, where the launch failed (a kernel this Triton or device cannot build): the
    torch kernels then give the same bits. Running out of memory is not a reason."""
    global _jit
    try:
        with _on(device):
            run()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        _jit = None
        log.warning("Triton merge kernels failed (%s: %s); using the torch kernels", type(e).__name__, e)
        return None
    return dest


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
