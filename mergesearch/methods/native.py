"""Native CPU merge kernels: ``native.cpp``, built once per machine with the C++ compiler
torch.compile would use, and loaded with ctypes.

On the CPU these replace both the eager torch kernels and TorchInductor's compiled ones
for float32, bfloat16 and float16 tensors: the same arithmetic in the same order, so the
same bits (tests/test_native.py), in one pass over memory with tile-sized temporaries.
They load in milliseconds, where torch.compile costs some 5 s per process, which matters
in a one-shot export and in every worker's start.

The library is built on first use into ``$MERGESEARCH_CACHE/native`` (default
``~/.cache/mergesearch/native``), keyed by the source, the compiler and the CPU's
features, and renamed into place when complete, so concurrent workers never load a
partial file. Without a compiler, or with ``MERGESEARCH_NATIVE=0``, every function here
returns None and the callers keep their torch kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.cpp")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-std=c++17", "-shared", "-fPIC",
         "-pthread"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_MODELS = 64

_lib = None
_tried = False


def enabled() -> bool:
    return os.environ.get("MERGESEARCH_NATIVE", "1") != "0"


def _cache_dir() -> Path:
    return Path(os.environ.get("MERGESEARCH_CACHE", Path.home() / ".cache" / "mergesearch")) / "native"


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    return shutil.which(cxx) if cxx else (shutil.which("g++") or shutil.which("c++"))


def library_path(cxx: str) -> Path:
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), cxx.encode(), " ".join(FLAGS).encode(),
                                     _cpu_features().encode()])).hexdigest()[:16]
    return _cache_dir() / f"mergesearch_native_{key}.so"


def _build(cxx: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "compiler failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def lib():
    """The loaded library, or None (disabled, no compiler, or the build failed: logged once)."""
    global _lib, _tried
    if not enabled():
        return None
    if _lib is not None or _tried:
        return _lib
    _tried = True
    cxx = _compiler()
    if cxx is None:
        log.info("no C++ compiler: the native merge kernels are off (torch kernels instead)")
        return None
    target = library_path(cxx)
    try:
        if not target.exists():
            _build(cxx, target)
        handle = ctypes.CDLL(str(target))
    except Exception as e:  # keep the torch kernels
        log.warning("native merge kernels unavailable (%s); using the torch kernels", e)
        return None
    _declare(handle)
    _lib = handle
    return _lib


def _declare(h) -> None:
    i64, i32, f32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    ptrs = ctypes.POINTER(vp)
    ints = ctypes.POINTER(ctypes.c_int)
    floats = ctypes.POINTER(ctypes.c_float)
    i64s = ctypes.POINTER(ctypes.c_int64)
    h.ms_combine.argtypes = [i64, i64, vp, i32, i32, ptrs, ints, ints, ptrs, ints, floats, ints, floats, floats,
                             i64s, i64s, floats, f32, i32, i32, f32, vp, i32, i32]
    h.ms_combine.restype = i32
    h.ms_weighted_sum.argtypes = [i64, i32, ptrs, ints, floats, f32, i32, vp, i32, i32]
    h.ms_weighted_sum.restype = i32
    h.ms_abs_top16.argtypes = [i64, vp, i32, vp, i32, vp, vp, i32]
    h.ms_abs_top16.restype = i32
    h.ms_abs_low16.argtypes = [i64, vp, i32, vp, i32, vp, i32, vp, i32]
    h.ms_abs_low16.restype = i32
    h.ms_dare_mask.argtypes = [i64, vp, ctypes.c_uint32, vp, vp, i32, vp, i32, vp, i32]
    h.ms_dare_mask.restype = i32
    h.ms_any_nonfinite.argtypes = [i64, vp, i32, i32]
    h.ms_any_nonfinite.restype = i32
    h.ms_sq_dist.argtypes = [i64, vp, i32, vp, i32, vp, i32]
    h.ms_sq_dist.restype = i32
    h.ms_nth_equal.argtypes = [i64, vp, i32, vp, i32, ctypes.c_uint32, i64, vp]
    h.ms_nth_equal.restype = i64


def _ok(t: torch.Tensor | None, dtypes=DTYPES) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype in dtypes and t.is_contiguous()


def _arr(ctype, values):
    return (ctype * len(values))(*values)


def _f32(v) -> float:
    """A weight, bound or factor as the float32 the torch kernels compute with."""
    return float(torch.tensor(float(v), dtype=torch.float32))


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _destination(out: torch.Tensor | None, like: torch.Tensor, out_dtype) -> torch.Tensor:
    """``out`` when the result can be written into it (same size, ``out_dtype``,
    contiguous, on the CPU), else a new tensor of ``like``'s shape."""
    dtype = out_dtype or torch.float32
    if _ok(out) and out.dtype == dtype and out.numel() == like.numel():
        return out
    return torch.empty(like.shape, dtype=dtype)


def combine(raw_base, sources, is_delta, windows, weights, lam, normalize, consensus, divisor, out_dtype=None,
            masks=None, out=None) -> torch.Tensor | None:
    """:func:`kernels.combine` natively, or None where it does not apply (not the CPU, a
    float64 tensor, a non-contiguous input, a window with its own key). The result goes
    into ``out`` when it fits (:func:`_destination`)."""
    k = len(sources)
    if not (1 <= k <= MAX_MODELS and _ok(raw_base)) or (out_dtype is not None and out_dtype not in DTYPES):
        return None
    masks = masks if masks is not None else [None] * k
    for src, delta, win, mk in zip(sources, is_delta, windows, masks):
        if not _ok(src, (torch.float32,) if delta else DTYPES) or src.numel() != raw_base.numel():
            return None
        if win is not None and win[0] is not None:
            return None
        if mk is not None and not (_ok(mk[0], (torch.bool,)) and mk[0].numel() == raw_base.numel()):
            return None
    h = lib()
    if h is None:
        return None
    n = raw_base.numel()
    out = _destination(out, raw_base, out_dtype)
    full = [w is None for w in windows]
    rc = h.ms_combine(
        n, 0, raw_base.data_ptr(), DTYPES[raw_base.dtype], k,
        _arr(ctypes.c_void_p, [s.data_ptr() for s in sources]),
        _arr(ctypes.c_int, [DTYPES[s.dtype] for s in sources]),
        _arr(ctypes.c_int, [int(bool(d)) for d in is_delta]),
        _arr(ctypes.c_void_p, [None if mk is None else mk[0].data_ptr() for mk in masks]),
        _arr(ctypes.c_int, [int(mk is not None and mk[1] is not None) for mk in masks]),
        _arr(ctypes.c_float, [0.0 if mk is None or mk[1] is None else _f32(mk[1]) for mk in masks]),
        _arr(ctypes.c_int, [int(not f) for f in full]),
        _arr(ctypes.c_float, [0.0 if f else _f32(w[1]) for w, f in zip(windows, full)]),
        _arr(ctypes.c_float, [0.0 if f else _f32(w[2]) for w, f in zip(windows, full)]),
        _arr(ctypes.c_int64, [0 if f else int(w[3]) for w, f in zip(windows, full)]),
        _arr(ctypes.c_int64, [0 if f else int(w[4]) for w, f in zip(windows, full)]),
        _arr(ctypes.c_float, [_f32(w) for w in weights]),
        _f32(lam), int(bool(normalize)), int(bool(consensus)), _f32(divisor),
        out.data_ptr(), DTYPES[out.dtype], _threads())
    if rc != 0:
        return None
    return out


def weighted_sum(sources, weights, divisor, normalize, out_dtype=None, out=None) -> torch.Tensor | None:
    """:func:`kernels.weighted_sum` natively, or None where it does not apply."""
    k = len(sources)
    if not (1 <= k <= MAX_MODELS) or any(not _ok(s) or s.numel() != sources[0].numel() for s in sources) \
            or (out_dtype is not None and out_dtype not in DTYPES):
        return None
    h = lib()
    if h is None:
        return None
    out = _destination(out, sources[0], out_dtype)
    rc = h.ms_weighted_sum(sources[0].numel(), k, _arr(ctypes.c_void_p, [s.data_ptr() for s in sources]),
                           _arr(ctypes.c_int, [DTYPES[s.dtype] for s in sources]),
                           _arr(ctypes.c_float, [_f32(w) for w in weights]), _f32(divisor), int(bool(normalize)),
                           out.data_ptr(), DTYPES[out.dtype], _threads())
    return out if rc == 0 else None


def all_finite(t: torch.Tensor) -> bool | None:
    """Whether a tensor holds no NaN or Inf, from its bits in one pass; None where the
    native kernels do not apply."""
    if not _ok(t) or lib() is None:
        return None
    return lib().ms_any_nonfinite(t.numel(), t.data_ptr(), DTYPES[t.dtype], _threads()) == 0


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float] | None:
    """(sum((a - b)^2), sum(b^2)), float32 within tiles of 512, float64 across them; None
    where the native kernels do not apply."""
    if not (_ok(a) and _ok(b) and a.numel() == b.numel()) or lib() is None:
        return None
    out = (ctypes.c_double * 2)()
    lib().ms_sq_dist(a.numel(), a.data_ptr(), DTYPES[a.dtype], b.data_ptr(), DTYPES[b.dtype], out, _threads())
    return out[0], out[1]


def selects(src: torch.Tensor | None, base: torch.Tensor | None) -> bool:
    """Whether |src - base| can be histogrammed natively (and the library loads)."""
    return _ok(src) and _ok(base) and src.numel() == base.numel() and lib() is not None


_POOL: list[torch.Tensor] = []
POOL_BUFFERS = 4


def _in_use(buf: torch.Tensor) -> bool:
    """Whether any tensor other than ``buf`` (a view, a view of a view) still uses its
    memory. Without torch's storage use count, every buffer counts as in use."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return True
    return count(buf.untyped_storage()._cdata) > 2  # buf itself and the wrapper made here


def _scratch(n: int) -> torch.Tensor:
    """An int16 buffer of n elements for the selection's top bits, reused from earlier
    selections once nothing uses it any more: a fresh buffer costs a page fault per 4 KB
    on first touch (about 0.2 ms a MB here), a tenth of a TIES candidate's time."""
    for buf in _POOL:
        if buf.numel() >= n and not _in_use(buf):
            return buf[:n]
    buf = torch.empty(n, dtype=torch.int16)
    free = [b for b in _POOL if not _in_use(b)]
    if len(_POOL) >= POOL_BUFFERS and free:  # replace the smallest free one
        _POOL.remove(min(free, key=torch.Tensor.numel))
    if len(_POOL) < POOL_BUFFERS:
        _POOL.append(buf)
    return buf[:n]


def abs_top16(src: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the top 16 bits of each |src - base| as float32, as int16; their 32768-bin histogram)."""
    n = src.numel()
    tops = _scratch(n)
    counts = torch.empty(1 << 15, dtype=torch.int64)
    lib().ms_abs_top16(n, src.data_ptr(), DTYPES[src.dtype], base.data_ptr(), DTYPES[base.dtype], tops.data_ptr(),
                       counts.data_ptr(), _threads())
    return tops, counts


def abs_low16(src: torch.Tensor, base: torch.Tensor, tops: torch.Tensor, bucket: int) -> torch.Tensor:
    """The 65536-bin histogram of the low 16 bits of |src - base| where ``tops == bucket``."""
    counts = torch.empty(1 << 16, dtype=torch.int64)
    lib().ms_abs_low16(src.numel(), src.data_ptr(), DTYPES[src.dtype], base.data_ptr(), DTYPES[base.dtype],
                       tops.data_ptr(), int(bucket), counts.data_ptr(), _threads())
    return counts


def nth_equal(src: torch.Tensor, base: torch.Tensor, value: torch.Tensor, r: int,
              tops: torch.Tensor | None = None) -> int:
    """The flat index of the r-th element (0-based) with |src - base| == value (float32), or
    -1. ``tops``: :func:`abs_top16`'s top bits of the same elements, to skip other buckets."""
    bits = int(value.detach().to("cpu", torch.float32).reshape(1).view(torch.int32)[0]) & 0xFFFFFFFF
    return int(lib().ms_nth_equal(src.numel(), src.data_ptr(), DTYPES[src.dtype], base.data_ptr(),
                                  DTYPES[base.dtype], bits, int(r), None if tops is None else tops.data_ptr()))


_draws_ok: bool | None = None


def _draws_match_torch() -> bool:
    """Whether the native DARE draws are torch's: masks and generator states compared
    once per process, across the engine's 624-draw refills (another torch could lay
    its generator state out differently; then torch draws)."""
    global _draws_ok
    if _draws_ok is None:
        a, b = torch.Generator().manual_seed(20240), torch.Generator().manual_seed(20240)
        ok = True
        for n in (1000, 3001, 17):
            want = torch.empty(n, dtype=torch.int32).random_(0, 1 << 24, generator=a).lt_(5_000_000)
            got = torch.empty(n, dtype=torch.bool)
            state = b.get_state()
            if lib().ms_dare_mask(n, state.data_ptr(), 5_000_000, got.data_ptr(), None, 0, None, 0, None, 1) != 0:
                ok = False
                break
            b.set_state(state)
            ok = ok and torch.equal(want, got)
        _draws_ok = ok and torch.equal(a.get_state(), b.get_state())
        if not _draws_ok:
            log.info("this torch's CPU generator differs from the native DARE draws: torch draws")
    return _draws_ok


def draws(generator: torch.Generator, src: torch.Tensor | None, base: torch.Tensor | None) -> bool:
    """Whether :func:`dare_mask` applies: a CPU generator, the library, torch's draws."""
    return (generator.device.type == "cpu" and _ok(src) and (base is None or (_ok(base) and base.numel() == src.numel()))
            and lib() is not None and _draws_match_torch())


def dare_mask(generator: torch.Generator, bound: int, src: torch.Tensor, base: torch.Tensor | None,
              norms: bool) -> tuple[torch.Tensor, list[int] | None]:
    """DARE's kept elements (a flat bool tensor: the generator's next draws' low 24 bits
    below ``bound``, as ``random_(0, 2**24)`` draws them; the generator advances as
    torch's would) and, with ``norms``, the exact L1 norms of |src - base| over all and
    over the kept elements, as 512 bins of integer mantissas (:func:`exact_sums`)."""
    n = src.numel()
    keep = torch.empty(n, dtype=torch.bool)
    bins = torch.zeros(512, dtype=torch.int64) if norms else None
    state = generator.get_state()
    rc = lib().ms_dare_mask(n, state.data_ptr(), int(bound), keep.data_ptr(), src.data_ptr(), DTYPES[src.dtype],
                            None if base is None else base.data_ptr(), DTYPES[(base if base is not None else src).dtype],
                            None if bins is None else bins.data_ptr(), _threads())
    if rc != 0:
        raise RuntimeError("native DARE draws: unexpected generator state")
    generator.set_state(state)
    return keep, None if bins is None else bins.tolist()
