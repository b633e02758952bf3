"""The Triton kernels of the fused merge; the host side is :mod:`mergesearch.methods.triton_kernels`.

Every float operation is the eager torch kernel's (:func:`mergesearch.methods.kernels._combine`),
in its order, in float32: launched with ``enable_fp_fusion=False`` (no multiply-add is
contracted into an FMA), divisions by ``div_rn`` (IEEE round to nearest; Triton's ``/`` may
be approximate), and bfloat16 converted through its bits (loads exact, stores rounded to
nearest even with torch's rule), so the interpreter (``TRITON_INTERPRET=1``) and a GPU give
the bits torch gives.

Input kinds (``*_KIND``): 0 float32, 1 bfloat16 passed as its int16 bits, 2 float16.
Per-model flags of :func:`combine_kernel` (``FLAGS``, 6 bits a model, model k at bit 6k):
bits 0-1 the kind, bit 2 the source is a float32 delta (no base subtracted), bit 3 a DARE
mask, bit 4 a DARE factor, bit 5 a magnitude window.
"""

from __future__ import annotations

import triton
import triton.language as tl

F32, BF16, F16 = 0, 1, 2
MAX_MODELS = 8


@triton.jit
def _load_f32(ptr, offs, inb, KIND: tl.constexpr):
    if KIND == 1:  # bfloat16 bits: the top half of a float32
        v = tl.load(ptr + offs, mask=inb, other=0)
        return (v.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        v = tl.load(ptr + offs, mask=inb, other=0.0)
        return v.to(tl.float32)


@triton.jit
def _store(ptr, offs, v, inb, KIND: tl.constexpr):
    if KIND == 1:  # round to nearest even from the bits, NaN as 0x7FC0 (torch's rule)
        u = v.to(tl.int32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
        r = tl.where(v != v, 0x7FC0, r)
        tl.store(ptr + offs, r.to(tl.int16), mask=inb)
    elif KIND == 2:
        tl.store(ptr + offs, v.to(tl.float16), mask=inb)
    else:
        tl.store(ptr + offs, v, mask=inb)


@triton.jit
def _abs_bits(src, base, offs, inb, SRC_KIND: tl.constexpr, BASE_KIND: tl.constexpr):
    """The float32 bits of |src - base| (|src| with no base), which order like the values."""
    d = _load_f32(src, offs, inb, SRC_KIND)
    if BASE_KIND >= 0:
        d = d - _load_f32(base, offs, inb, BASE_KIND)
    return d.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _pick(k: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
    if k == 0:
        return p0
    elif k == 1:
        return p1
    elif k == 2:
        return p2
    elif k == 3:
        return p3
    elif k == 4:
        return p4
    elif k == 5:
        return p5
    elif k == 6:
        return p6
    else:
        return p7


@triton.jit
def _part(src, mk, fp, ip, offs, inb, b, k: tl.constexpr, F: tl.constexpr):
    """Model k's weighted, selected delta: ``_combine``'s part, operation by operation."""
    d = _load_f32(src, offs, inb, F & 3)
    if (F >> 2) & 1 == 0:
        d = d - b
    w = tl.load(fp + 4 * k)
    if (F >> 3) & 1:
        keep = tl.load(mk + offs, mask=inb, other=0) != 0
        if (F >> 4) & 1:
            d = tl.where(keep, d * tl.load(fp + 4 * k + 3), 0.0)
        else:
            d = tl.where(keep, d, 0.0)
    if (F >> 5) & 1:
        lo = tl.load(fp + 4 * k + 1)
        hi = tl.load(fp + 4 * k + 2)
        jlo = tl.load(ip + 2 * k)
        jhi = tl.load(ip + 2 * k + 1)
        key = tl.abs(d)
        sel = ((key > lo) | ((key == lo) & (offs >= jlo))) & ((key < hi) | ((key == hi) & (offs < jhi)))
        p = tl.where(sel & (d != 0.0), d * w, 0.0)
    else:
        p = tl.where(d != 0.0, d * w, 0.0)
    return p


@triton.jit
def _model(k: tl.constexpr, K: tl.constexpr, FLAGS: tl.constexpr, s0, s1, s2, s3, s4, s5, s6, s7,
           m0, m1, m2, m3, m4, m5, m6, m7, fp, ip, offs, inb, b):
    if k < K:
        p = _part(_pick(k, s0, s1, s2, s3, s4, s5, s6, s7), _pick(k, m0, m1, m2, m3, m4, m5, m6, m7), fp, ip,
                  offs, inb, b, k, (FLAGS >> (6 * k)) & 63)
    else:
        p = tl.zeros_like(b)
    return p


@triton.jit
def _add(k: tl.constexpr, K: tl.constexpr, acc, p):
    if k < K:
        acc = acc + p
    return acc


@triton.jit
def _vote(k: tl.constexpr, K: tl.constexpr, p, fp, majority, mixed, div):
    """``_combine``'s sign election step for model k: its part and weight where it agrees."""
    if k < K:
        agree = ((p > 0.0) & (majority > 0.0)) | ((p < 0.0) & (majority < 0.0))
        mixed = mixed + tl.where(agree, p, 0.0)
        div = div + tl.where(agree, tl.load(fp + 4 * k), 0.0)
    return mixed, div


@triton.jit
def combine_kernel(out, base, s0, s1, s2, s3, s4, s5, s6, s7, m0, m1, m2, m3, m4, m5, m6, m7, fp, ip, n,
                   K: tl.constexpr, FLAGS: tl.constexpr, BASE_KIND: tl.constexpr, OUT_KIND: tl.constexpr,
                   NORMALIZE: tl.constexpr, CONSENSUS: tl.constexpr, BLOCK: tl.constexpr):
    """out = base + lam * mixed, one read of every input and one write (see ``_combine``).
    ``fp``: float32 [weight, lo, hi, factor] per model, then lam and the divisor; ``ip``:
    int64 [jlo, jhi] per model."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    b = _load_f32(base, offs, inb, BASE_KIND)
    p0 = _model(0, K, FLAGS, s0, s1, s2, s3, s4, s5, s6, s7, m0, m1, m2, m3, m4, m5, m6, m7, fp, ip, offs, inb, b)
    p1 = _model(1, K, FLAGS, s0, s1, s2, s3, s4, s5, s6, s7, m0, m1, m2, m3, m4, m5, m6, m7, fp, ip, offs, inb, b)
    p2 = _model(2, K, FLAGS, s0, s1, s2, s3, s4, s5, s6, s7, m0, m1, m2, m3, m4, m5, m6, m7, fp, ip, offs, inb, b)
    p3 = _model(3, K, FLAGS, s0, s1, s2, s3, s4, s5, s6, s7, m0, m1, m2, m3, m4, m5, m6, m7, fp, ip, offs, inb, b)
    p4 = _model(4, K, FLAGS, s0, s1, s2, s3, s4, s5, s6, s7, m0, m1, m2, m3, m4, m5, m6, m7, fp, ip, offs, inb, b)
    p5 = _model(5, K, FLAGS, s0, s1, s2, s3, s4, s5, s6, s7, m0, m1, m2, m3, m4, m5, m6, m7, fp, ip, offs, inb, b)
    p6 = _model(6, K, FLAGS, s0, s1, s2, s3, s4, s5, s6, s7, m0, m1, m2, m3, m4, m5, m6, m7, fp, ip, offs, inb, b)
    p7 = _model(7, K, FLAGS, s0, s1, s2, s3, s4, s5, s6, s7, m0, m1, m2, m3, m4, m5, m6, m7, fp, ip, offs, inb, b)
    total = p0
    total = _add(1, K, total, p1)
    total = _add(2, K, total, p2)
    total = _add(3, K, total, p3)
    total = _add(4, K, total, p4)
    total = _add(5, K, total, p5)
    total = _add(6, K, total, p6)
    total = _add(7, K, total, p7)
    if CONSENSUS:
        majority = tl.where(total >= 0.0, 1.0, -1.0)
        mixed = tl.zeros_like(b)
        div = tl.zeros_like(b)
        mixed, div = _vote(0, K, p0, fp, majority, mixed, div)
        mixed, div = _vote(1, K, p1, fp, majority, mixed, div)
        mixed, div = _vote(2, K, p2, fp, majority, mixed, div)
        mixed, div = _vote(3, K, p3, fp, majority, mixed, div)
        mixed, div = _vote(4, K, p4, fp, majority, mixed, div)
        mixed, div = _vote(5, K, p5, fp, majority, mixed, div)
        mixed, div = _vote(6, K, p6, fp, majority, mixed, div)
        mixed, div = _vote(7, K, p7, fp, majority, mixed, div)
        div = div + tl.where(div == 0.0, 1.0, 0.0)
        if NORMALIZE:
            mixed = tl.math.div_rn(mixed, div)
    else:
        mixed = total
        if NORMALIZE:
            mixed = tl.math.div_rn(mixed, tl.load(fp + 4 * K + 1))
    lam = tl.load(fp + 4 * K)
    _store(out, offs, b + mixed * lam, inb, OUT_KIND)


@triton.jit
def _wterm(k: tl.constexpr, K: tl.constexpr, FLAGS: tl.constexpr, acc, s, fp, offs, inb):
    if k < K:
        acc = acc + _load_f32(s, offs, inb, (FLAGS >> (6 * k)) & 3) * tl.load(fp + k)
    return acc


@triton.jit
def weighted_sum_kernel(out, s0, s1, s2, s3, s4, s5, s6, s7, fp, n, K: tl.constexpr, FLAGS: tl.constexpr,
                        OUT_KIND: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum_k w_k * s_k in order (``_weighted_sum``), / divisor with NORMALIZE. ``fp``:
    the weights, then the divisor."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    acc = _load_f32(s0, offs, inb, FLAGS & 3) * tl.load(fp)
    acc = _wterm(1, K, FLAGS, acc, s1, fp, offs, inb)
    acc = _wterm(2, K, FLAGS, acc, s2, fp, offs, inb)
    acc = _wterm(3, K, FLAGS, acc, s3, fp, offs, inb)
    acc = _wterm(4, K, FLAGS, acc, s4, fp, offs, inb)
    acc = _wterm(5, K, FLAGS, acc, s5, fp, offs, inb)
    acc = _wterm(6, K, FLAGS, acc, s6, fp, offs, inb)
    acc = _wterm(7, K, FLAGS, acc, s7, fp, offs, inb)
    if NORMALIZE:
        acc = tl.math.div_rn(acc, tl.load(fp + K))
    _store(out, offs, acc, inb, OUT_KIND)


@triton.jit
def top16_hist_kernel(src, base, hist, n, SRC_KIND: tl.constexpr, BASE_KIND: tl.constexpr, COPIES: tl.constexpr,
                      BLOCK: tl.constexpr):
    """The histogram of the top 16 bits of bits(|src - base|) (32768 bins: the sign bit is
    0), in COPIES copies (program p adds to copy p % COPIES, so a crowded bin takes fewer
    atomic adds at one address)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    u = _abs_bits(src, base, offs, inb, SRC_KIND, BASE_KIND)
    tl.atomic_add(hist + (tl.program_id(0) % COPIES) * 32768 + (u >> 16), 1, mask=inb)


@triton.jit(do_not_specialize=["bucket", "cap"])  # one compilation for every value
def compact_kernel(src, base, counter, out, n, bucket, cap, SRC_KIND: tl.constexpr, BASE_KIND: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Every element whose bits(|src - base|) have the top 16 bits ``bucket``, as the int64
    key (bits << 31) | index, appended to ``out`` (positions from one atomic add a
    program; the order of the programs is arbitrary, the keys are sorted afterwards). At
    most ``cap`` are written; ``counter`` ends at the number found."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    u = _abs_bits(src, base, offs, inb, SRC_KIND, BASE_KIND)
    sel = inb & ((u >> 16) == bucket)
    s = sel.to(tl.int32)
    start = tl.atomic_add(counter, tl.sum(s, axis=0))
    pos = start + tl.cumsum(s, axis=0) - s
    tl.store(out + pos, (u.to(tl.int64) << 31) | offs, mask=sel & (pos < cap))


@triton.jit(do_not_specialize=["prefix"])  # one compilation for every value
def radix_hist_kernel(src, base, hist, n, prefix, SRC_KIND: tl.constexpr, BASE_KIND: tl.constexpr,
                      PSHIFT: tl.constexpr, SHIFT: tl.constexpr, NBITS: tl.constexpr, BLOCK: tl.constexpr,
                      TILES: tl.constexpr):
    """One radix pass of the selection: the histogram of the digit ``(u >> SHIFT) & (2^NBITS - 1)``
    of u = bits(|src - base|) over the elements with ``u >> PSHIFT == prefix`` (all of them
    when PSHIFT is 31), each program over TILES blocks, its counts added to ``hist`` (int32)
    once per nonzero bin."""
    acc = tl.zeros([1 << NBITS], dtype=tl.int32)
    for t in range(TILES):
        offs = (tl.program_id(0).to(tl.int64) * TILES + t) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        u = _abs_bits(src, base, offs, inb, SRC_KIND, BASE_KIND)
        sel = inb
        if PSHIFT < 31:
            sel = sel & ((u >> PSHIFT) == prefix)
        acc += tl.histogram((u >> SHIFT) & ((1 << NBITS) - 1), 1 << NBITS, mask=sel)
    tl.atomic_add(hist + tl.arange(0, 1 << NBITS), acc, mask=acc > 0)


@triton.jit(do_not_specialize=["bits"])  # one compilation for every value
def count_equal_kernel(src, base, counts, n, bits, SRC_KIND: tl.constexpr, BASE_KIND: tl.constexpr,
                       BLOCK: tl.constexpr):
    """counts[p] = how many elements of block p have bits(|src - base|) == bits."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    u = _abs_bits(src, base, offs, inb, SRC_KIND, BASE_KIND)
    tl.store(counts + tl.program_id(0), tl.sum(((u == bits) & inb).to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["lo", "r", "bits"])  # one compilation for every value
def position_equal_kernel(src, base, out, n, lo, r, bits, SRC_KIND: tl.constexpr, BASE_KIND: tl.constexpr,
                          BLOCK: tl.constexpr):
    """out[0] = the flat index of the r-th element (0-based) of [lo, lo + BLOCK) with
    bits(|src - base|) == bits (one program)."""
    offs = lo + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    eq = ((_abs_bits(src, base, offs, inb, SRC_KIND, BASE_KIND) == bits) & inb).to(tl.int32)
    rank = tl.cumsum(eq, axis=0) - eq  # equal elements before each
    hit = (eq != 0) & (rank == r)
    tl.store(out, tl.max(tl.where(hit, offs, -1), axis=0))
