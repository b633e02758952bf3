// mergesearch's native CPU kernels (built on first use by mergesearch/methods/native.py).
//
// The fused combine of the task-vector family, the weighted sum, and the two histogram
// passes of the magnitude selection, over float32 / bfloat16 / float16 tensors. Each is
// the same arithmetic, in the same order, as the eager torch kernels in kernels.py and
// selection.py, so it gives the same bits (tests/test_native.py): every float operation is
// float32 IEEE with no contraction (built with -ffp-contract=off, no fast-math).
//
// Work is split into contiguous ranges, one per thread; each range is processed in tiles
// of TILE elements, converted to float32 once, so the loops over a tile vectorize and no
// temporary is larger than a tile.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

enum Dtype { F32 = 0, BF16 = 1, F16 = 2 };
constexpr int64_t TILE = 512;
constexpr int MAX_MODELS = 64;
constexpr int64_t MIN_PER_THREAD = 1 << 15;

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// elements [lo, lo + len) of a tensor of dtype dt, as float32 (exact for every dtype)
void load(const void* p, int dt, int64_t lo, int64_t len, float* out) {
  if (dt == F32) {
    std::memcpy(out, static_cast<const float*>(p) + lo, len * sizeof(float));
  } else if (dt == BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(p) + lo;
    for (int64_t j = 0; j < len; ++j) out[j] = bits_to_float(static_cast<uint32_t>(s[j]) << 16);
  } else {
    const _Float16* s = static_cast<const _Float16*>(p) + lo;
    for (int64_t j = 0; j < len; ++j) out[j] = static_cast<float>(s[j]);
  }
}

// float32 to the output dtype, rounding to nearest even (as torch casts)
void store(const float* v, int dt, int64_t lo, int64_t len, void* p) {
  if (dt == F32) {
    std::memcpy(static_cast<float*>(p) + lo, v, len * sizeof(float));
  } else if (dt == BF16) {
    uint16_t* d = static_cast<uint16_t*>(p) + lo;
    for (int64_t j = 0; j < len; ++j) {
      uint32_t u = float_to_bits(v[j]);
      d[j] = std::isnan(v[j]) ? 0x7FC0 : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
  } else {
    _Float16* d = static_cast<_Float16*>(p) + lo;
    for (int64_t j = 0; j < len; ++j) d[j] = static_cast<_Float16>(v[j]);
  }
}

template <class F>
void parallel(int64_t n, int nthreads, F&& body) {
  int t = static_cast<int>(std::min<int64_t>(std::max(1, nthreads), std::max<int64_t>(1, n / MIN_PER_THREAD)));
  if (t <= 1) {
    body(0, 0, n);
    return;
  }
  std::vector<std::thread> pool;
  int64_t step = (n + t - 1) / t;
  step = (step + TILE - 1) / TILE * TILE;
  for (int r = 0; r < t; ++r) {
    int64_t lo = r * step, hi = std::min(n, lo + step);
    if (lo >= hi) break;
    pool.emplace_back([&body, r, lo, hi] { body(r, lo, hi); });
  }
  for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

int ms_version() { return 1; }

// out = base + lam * mixed, where model k's part is
//   d_k = src_k - base (or src_k itself, a float32 delta, when is_delta[k]);
//   with a mask: d_k = keep_k ? d_k * factor_k : 0 (no factor: d_k where kept);
//   p_k = (selected_k and d_k != 0) ? d_k * w_k : 0, selected by the magnitude window
//   (|d_k| > lo or (|d_k| == lo and index >= jlo)) and (|d_k| < hi or (|d_k| == hi and index < jhi)),
//   or everything without a window;
// mixed = sum_k p_k (divided by divisor when normalize), or with consensus the sum of the
// parts whose sign is that of sum_k p_k (divided by the sum of their weights, 1 if none).
// ``offset`` is the flat index of element 0 (windows index the whole tensor).
int ms_combine(int64_t n, int64_t offset, const void* base, int base_dt, int k_models, const void* const* srcs,
               const int* src_dt, const int* is_delta, const uint8_t* const* keep, const int* has_factor,
               const float* factor, const int* has_window, const float* wlo, const float* whi, const int64_t* jlo,
               const int64_t* jhi, const float* weights, float lam, int normalize, int consensus, float divisor,
               void* out, int out_dt, int nthreads) {
  if (k_models < 1 || k_models > MAX_MODELS) return 1;
  parallel(n, nthreads, [&](int, int64_t start, int64_t stop) {
    std::vector<float> buf(static_cast<size_t>(TILE) * (k_models + 4));
    float* b = buf.data();
    float* total = b + TILE;
    float* mixed = total + TILE;
    float* div = mixed + TILE;
    float* parts = div + TILE;
    for (int64_t lo = start; lo < stop; lo += TILE) {
      const int64_t len = std::min(TILE, stop - lo);
      load(base, base_dt, lo, len, b);
      for (int k = 0; k < k_models; ++k) {
        float* d = parts + k * TILE;
        load(srcs[k], src_dt[k], lo, len, d);
        if (!is_delta[k])
          for (int64_t j = 0; j < len; ++j) d[j] = d[j] - b[j];
        if (keep[k] != nullptr) {
          const uint8_t* m = keep[k] + lo;
          if (has_factor[k]) {
            const float f = factor[k];
            for (int64_t j = 0; j < len; ++j) d[j] = m[j] ? d[j] * f : 0.0f;
          } else {
            for (int64_t j = 0; j < len; ++j) d[j] = m[j] ? d[j] : 0.0f;
          }
        }
        const float w = weights[k];
        if (has_window[k]) {
          const float l = wlo[k], h = whi[k];
          const int64_t a0 = jlo[k], a1 = jhi[k], base_idx = offset + lo;
          for (int64_t j = 0; j < len; ++j) {
            const float a = std::fabs(d[j]);
            const int64_t idx = base_idx + j;
            const bool sel = ((a > l) | ((a == l) & (idx >= a0))) & ((a < h) | ((a == h) & (idx < a1)));
            d[j] = (sel & (d[j] != 0.0f)) ? d[j] * w : 0.0f;
          }
        } else {
          for (int64_t j = 0; j < len; ++j) d[j] = d[j] != 0.0f ? d[j] * w : 0.0f;
        }
      }
      if (consensus) {
        for (int64_t j = 0; j < len; ++j) total[j] = parts[j];
        for (int k = 1; k < k_models; ++k)
          for (int64_t j = 0; j < len; ++j) total[j] = total[j] + parts[k * TILE + j];
        for (int64_t j = 0; j < len; ++j) {
          total[j] = total[j] >= 0.0f ? 1.0f : -1.0f;  // the majority sign
          mixed[j] = 0.0f;
          div[j] = 0.0f;
        }
        for (int k = 0; k < k_models; ++k) {
          const float w = weights[k];
          const float* p = parts + k * TILE;
          for (int64_t j = 0; j < len; ++j) {
            const float s = p[j] > 0.0f ? 1.0f : (p[j] < 0.0f ? -1.0f : 0.0f);
            const bool agree = s == total[j];
            mixed[j] = mixed[j] + (agree ? p[j] : 0.0f);
            div[j] = div[j] + (agree ? w : 0.0f);
          }
        }
        for (int64_t j = 0; j < len; ++j) {
          div[j] = div[j] + (div[j] == 0.0f ? 1.0f : 0.0f);
          if (normalize) mixed[j] = mixed[j] / div[j];
        }
      } else {
        for (int64_t j = 0; j < len; ++j) mixed[j] = parts[j];
        for (int k = 1; k < k_models; ++k)
          for (int64_t j = 0; j < len; ++j) mixed[j] = mixed[j] + parts[k * TILE + j];
        if (normalize)
          for (int64_t j = 0; j < len; ++j) mixed[j] = mixed[j] / divisor;
      }
      for (int64_t j = 0; j < len; ++j) total[j] = b[j] + mixed[j] * lam;
      store(total, out_dt, lo, len, out);
    }
  });
  return 0;
}

// out = sum_k w_k * src_k (in order), divided by divisor when normalize
int ms_weighted_sum(int64_t n, int k_models, const void* const* srcs, const int* src_dt, const float* weights,
                    float divisor, int normalize, void* out, int out_dt, int nthreads) {
  if (k_models < 1 || k_models > MAX_MODELS) return 1;
  parallel(n, nthreads, [&](int, int64_t start, int64_t stop) {
    std::vector<float> buf(2 * TILE);
    float* acc = buf.data();
    float* v = acc + TILE;
    for (int64_t lo = start; lo < stop; lo += TILE) {
      const int64_t len = std::min(TILE, stop - lo);
      load(srcs[0], src_dt[0], lo, len, acc);
      const float w0 = weights[0];
      for (int64_t j = 0; j < len; ++j) acc[j] = acc[j] * w0;
      for (int k = 1; k < k_models; ++k) {
        load(srcs[k], src_dt[k], lo, len, v);
        const float w = weights[k];
        for (int64_t j = 0; j < len; ++j) acc[j] = acc[j] + v[j] * w;
      }
      if (normalize)
        for (int64_t j = 0; j < len; ++j) acc[j] = acc[j] / divisor;
      store(acc, out_dt, lo, len, out);
    }
  });
  return 0;
}

// The first pass of the magnitude selection: for every element the top 16 bits of
// |src - base| as a float32 (non-negative floats order like their bits), into ``tops``,
// and their histogram (32768 bins) into ``counts``.
int ms_abs_top16(int64_t n, const void* src, int src_dt, const void* base, int base_dt, int16_t* tops,
                 int64_t* counts, int nthreads) {
  std::vector<std::vector<int64_t>> local(std::max(1, nthreads), std::vector<int64_t>(1 << 15, 0));
  parallel(n, nthreads, [&](int r, int64_t start, int64_t stop) {
    float a[TILE], b[TILE];
    // two interleaved 32-bit histograms per tile run (added to the 64-bit one per tile):
    // consecutive elements often share a bin, and one histogram would chain the updates
    std::vector<uint32_t> h(2 << 15, 0);
    int64_t* c = local[r].data();
    for (int64_t lo = start; lo < stop; lo += TILE) {
      const int64_t len = std::min(TILE, stop - lo);
      load(src, src_dt, lo, len, a);
      load(base, base_dt, lo, len, b);
      int16_t* t = tops + lo;
      for (int64_t j = 0; j < len; ++j)  // vectorized
        t[j] = static_cast<int16_t>(float_to_bits(std::fabs(a[j] - b[j])) >> 16);
      int64_t j = 0;
      for (; j + 1 < len; j += 2) {
        h[t[j]] += 1;
        h[(1 << 15) + t[j + 1]] += 1;
      }
      if (j < len) h[t[j]] += 1;
      if (((lo - start) / TILE) % 4096 == 4095 || lo + TILE >= stop) {  // at most 2M counts a bin
        for (int v = 0; v < (1 << 15); ++v) {
          c[v] += static_cast<int64_t>(h[v]) + h[(1 << 15) + v];
          h[v] = h[(1 << 15) + v] = 0;
        }
      }
    }
  });
  for (int64_t v = 0; v < (1 << 15); ++v) {
    int64_t s = 0;
    for (auto& l : local) s += l[v];
    counts[v] = s;
  }
  return 0;
}

// The second pass: the histogram (65536 bins) of the low 16 bits of |src - base| over
// the elements whose top 16 bits are ``bucket``.
int ms_abs_low16(int64_t n, const void* src, int src_dt, const void* base, int base_dt, const int16_t* tops,
                 int bucket, int64_t* counts, int nthreads) {
  std::vector<std::vector<int64_t>> local(std::max(1, nthreads), std::vector<int64_t>(1 << 16, 0));
  parallel(n, nthreads, [&](int r, int64_t start, int64_t stop) {
    int64_t* c = local[r].data();
    const int16_t want = static_cast<int16_t>(bucket);
    for (int64_t lo = start; lo < stop; lo += 64) {  // few elements match: skip 64 at a time
      const int64_t len = std::min<int64_t>(64, stop - lo);
      int any = 0;
      for (int64_t j = 0; j < len; ++j) any |= tops[lo + j] == want;  // vectorized
      if (!any) continue;
      for (int64_t j = lo; j < lo + len; ++j) {
        if (tops[j] != want) continue;
        float a, b;
        load(src, src_dt, j, 1, &a);
        load(base, base_dt, j, 1, &b);
        c[float_to_bits(std::fabs(a - b)) & 0xFFFFu] += 1;
      }
    }
  });
  for (int64_t v = 0; v < (1 << 16); ++v) {
    int64_t s = 0;
    for (auto& l : local) s += l[v];
    counts[v] = s;
  }
  return 0;
}

// Whether any of n elements is NaN or infinite (all exponent bits set), from the bits.
int ms_any_nonfinite(int64_t n, const void* p, int dt, int nthreads) {
  std::vector<int> found(std::max(1, nthreads), 0);
  parallel(n, nthreads, [&](int r, int64_t start, int64_t stop) {
    int any = 0;
    if (dt == F32) {
      const uint32_t* s = static_cast<const uint32_t*>(p);
      for (int64_t j = start; j < stop; ++j) any |= (s[j] & 0x7F800000u) == 0x7F800000u;
    } else {
      const uint16_t* s = static_cast<const uint16_t*>(p);
      const uint16_t mask = dt == BF16 ? 0x7F80u : 0x7C00u;
      for (int64_t j = start; j < stop; ++j) any |= (s[j] & mask) == mask;
    }
    found[r] = any;
  });
  for (int f : found)
    if (f) return 1;
  return 0;
}

// sum((a - b)^2) and sum(b^2) in float64, into out[0] and out[1].
int ms_sq_dist(int64_t n, const void* a, int a_dt, const void* b, int b_dt, double* out, int nthreads) {
  std::vector<double> num(std::max(1, nthreads), 0.0), den(std::max(1, nthreads), 0.0);
  parallel(n, nthreads, [&](int r, int64_t start, int64_t stop) {
    float x[TILE], y[TILE];
    double sn = 0.0, sd = 0.0;
    for (int64_t lo = start; lo < stop; lo += TILE) {
      const int64_t len = std::min(TILE, stop - lo);
      load(a, a_dt, lo, len, x);
      load(b, b_dt, lo, len, y);
      float tn = 0.0f, td = 0.0f;  // a tile in float32, tiles in float64
      for (int64_t j = 0; j < len; ++j) {
        const float d = x[j] - y[j];
        tn += d * d;
        td += y[j] * y[j];
      }
      sn += tn;
      sd += td;
    }
    num[r] = sn;
    den[r] = sd;
  });
  out[0] = out[1] = 0.0;
  for (size_t r = 0; r < num.size(); ++r) {
    out[0] += num[r];
    out[1] += den[r];
  }
  return 0;
}

// The flat index of the r-th element (0-based, in index order) whose |src - base| has the
// float32 bits ``value_bits``, or -1 if there are not that many. With ``tops`` (the top
// 16 bits of every |src - base|), only the elements of the value's bucket are read.
int64_t ms_nth_equal(int64_t n, const void* src, int src_dt, const void* base, int base_dt, uint32_t value_bits,
                     int64_t r, const int16_t* tops) {
  float a[TILE], b[TILE];
  const int16_t want = static_cast<int16_t>(value_bits >> 16);
  for (int64_t lo = 0; lo < n; lo += TILE) {
    const int64_t len = std::min(TILE, n - lo);
    if (tops != nullptr) {
      int any = 0;
      for (int64_t j = 0; j < len; ++j) any |= tops[lo + j] == want;  // vectorized
      if (!any) continue;
    }
    load(src, src_dt, lo, len, a);
    load(base, base_dt, lo, len, b);
    for (int64_t j = 0; j < len; ++j) {
      if (float_to_bits(std::fabs(a[j] - b[j])) == value_bits) {
        if (r == 0) return lo + j;
        --r;
      }
    }
  }
  return -1;
}

// DARE's mask for n elements, drawn from torch's CPU generator: the state is torch's
// 5056-byte CPU generator state (Generator.get_state()), read and updated in place. Its
// engine is the standard 32-bit Mersenne Twister, drawn one output per element, and
// ``random_(0, 2**24)`` keeps an output's low 24 bits: element j is kept when they fall
// below ``bound`` (native.py checks these draws against torch's once per process).
// With ``bins`` (2 x 256 int64, added to), the L1 norms of |src - base| (|src| with no base) over all elements
// and over the kept ones are summed exactly: float32 magnitudes as integer mantissas per
// binary exponent (bins[e] and bins[256 + e]).
namespace {
constexpr int MT_N = 624, MT_M = 397;

inline uint32_t mt_mix(uint32_t u, uint32_t v) {
  return (((u & 0x80000000u) | (v & 0x7FFFFFFFu)) >> 1) ^ ((v & 1u) ? 0x9908B0DFu : 0u);
}

void mt_twist(uint32_t* s) {
  int k = 0;
  for (; k < MT_N - MT_M; ++k) s[k] = s[k + MT_M] ^ mt_mix(s[k], s[k + 1]);
  for (; k < MT_N - 1; ++k) s[k] = s[k + MT_M - MT_N] ^ mt_mix(s[k], s[k + 1]);
  s[MT_N - 1] = s[MT_M - 1] ^ mt_mix(s[MT_N - 1], s[0]);
}
}  // namespace

int ms_dare_mask(int64_t n, uint8_t* rng_state, uint32_t bound, uint8_t* keep, const void* src, int src_dt,
                 const void* base, int base_dt, int64_t* bins, int nthreads) {
  int32_t left;
  uint64_t next;
  uint32_t mt[MT_N];
  std::memcpy(&left, rng_state + 8, 4);
  std::memcpy(&next, rng_state + 16, 8);
  for (int k = 0; k < MT_N; ++k) {
    uint64_t v;
    std::memcpy(&v, rng_state + 24 + 8 * k, 8);
    mt[k] = static_cast<uint32_t>(v);
  }
  if (left < 1 || left > MT_N || next > static_cast<uint64_t>(MT_N)) return 1;
  int64_t j = 0;
  while (j < n) {
    if (left == 1) {  // the next draw twists first, then reads state[0]
      mt_twist(mt);
      left = MT_N + 1;
      next = 0;
    }
    const int64_t take = std::min<int64_t>(n - j, left - 1);
    const uint32_t* s = mt + next;
    uint8_t* out = keep + j;
    for (int64_t t = 0; t < take; ++t) {
      uint32_t y = s[t];
      y ^= y >> 11;
      y ^= (y << 7) & 0x9D2C5680u;
      y ^= (y << 15) & 0xEFC60000u;
      y ^= y >> 18;
      out[t] = (y & 0xFFFFFFu) < bound;
    }
    next += take;
    left -= static_cast<int32_t>(take);
    j += take;
  }
  std::memcpy(rng_state + 8, &left, 4);
  std::memcpy(rng_state + 16, &next, 8);
  for (int k = 0; k < MT_N; ++k) {
    uint64_t v = mt[k];
    std::memcpy(rng_state + 24 + 8 * k, &v, 8);
  }
  if (bins != nullptr) {
    // Per tile, when the nonzero magnitudes' exponents span at most 29 (the usual case),
    // the mantissas shifted to the smallest exponent sum exactly in an int64 (below
    // 2^53 each, 512 of them) into that exponent's bin; otherwise each goes to its own bin.
    std::vector<std::vector<int64_t>> local(std::max(1, nthreads), std::vector<int64_t>(512, 0));
    parallel(n, nthreads, [&](int r, int64_t start, int64_t stop) {
      float a[TILE], b[TILE];
      uint32_t ex[TILE];
      int64_t mant[TILE];
      int64_t* c = local[r].data();
      for (int64_t lo = start; lo < stop; lo += TILE) {
        const int64_t len = std::min(TILE, stop - lo);
        load(src, src_dt, lo, len, a);
        if (base != nullptr)
          load(base, base_dt, lo, len, b);
        else
          std::fill(b, b + len, 0.0f);  // src is the delta itself
        uint32_t emin = 255, emax = 0;
        for (int64_t t = 0; t < len; ++t) {
          const uint32_t u = float_to_bits(std::fabs(a[t] - b[t]));
          const uint32_t e = u >> 23;
          const uint32_t m = (u & 0x7FFFFFu) | (e ? 0x800000u : 0u);
          ex[t] = e ? e : 1;  // a subnormal's scale is exponent 1's
          mant[t] = m;
          emin = std::min(emin, m ? ex[t] : 255u);
          emax = std::max(emax, m ? ex[t] : 0u);
        }
        const uint8_t* k = keep + lo;
        if (emax == 0) continue;  // all zero
        if (emax < 255 && emax - emin <= 29) {
          int64_t sb = 0, sa = 0;
          for (int64_t t = 0; t < len; ++t) {
            const int64_t v = mant[t] << (ex[t] - emin);  // zeros stay 0 whatever the shift
            sb += v;
            sa += k[t] ? v : 0;
          }
          c[emin] += sb;
          c[256 + emin] += sa;
        } else {
          for (int64_t t = 0; t < len; ++t) {
            c[ex[t]] += mant[t];
            c[256 + ex[t]] += k[t] ? mant[t] : 0;
          }
        }
      }
    });
    for (auto& l : local)
      for (int v = 0; v < 512; ++v) bins[v] += l[v];
  }
  return 0;
}

}  // extern "C"
