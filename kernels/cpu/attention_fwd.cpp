// hpcattn's fused CPU forward (float32): blockwise online-softmax attention of one (batch, kv
// head) slab and a range of its query positions, in compiled code.
//
// Per (query tile x key tile) it costs two BLAS GEMMs (S = (scale Q) K^T, then ACC += P V, both
// through the sgemm of the BLAS NumPy already loaded, passed in as a function pointer) and ONE
// fused pass over the score tile per row: the mask (partial tiles only), the row max, exp(s - m)
// and its sum, and the rescale of the row's accumulator when its max grew. No Python runs between
// tiles, so the call holds no GIL (ctypes releases it) and the tiles stay in one core's cache.
//
// Masks are answered from global positions exactly as hpcattn.masks.Mask does: with
// diag = k_pos - (q_pos + shift), a key is visible when lo <= diag (if has_lo), diag <= hi (if
// has_hi) and both lie in the same packed sequence (if segments are given). A tile is skipped
// when no pair can be visible, computed unmasked when every pair is, else masked per element;
// the classification uses the tile's min/max positions and segments (hpcattn.masks.Mask.classify).
//
// Layouts: q rows of one position are the g heads of the kv head, adjacent (g*d contiguous
// floats, q_stride floats between positions); k and v rows have their own strides; out like q;
// lse is (heads, positions) with lse_head_stride floats between heads. Rows that see no key get
// out = 0 and lse = -inf. Returns 0, or a nonzero code (out of memory).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

typedef int64_t i64;

namespace {

enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };
typedef void (*gemm64_t)(int, int, int, i64, i64, i64, float, const float*, i64, const float*,
                         i64, float, float*, i64);
typedef void (*gemm32_t)(int, int, int, int, int, int, float, const float*, int, const float*,
                         int, float, float*, int);

}  // namespace

extern "C" {

struct hpcattn_cpu_call {
    const float* q;
    const float* k;
    const float* v;
    float* out;
    float* lse;
    i64 nq, nk, g, d;
    i64 q_stride, k_stride, v_stride, o_stride, lse_head_stride;
    i64 block_q, block_k;       // positions per query tile, keys per key tile
    float scale;
    int32_t has_lo, has_hi;
    i64 lo, hi, shift;
    const i64* q_pos;           // NULL: 0..nq-1
    const i64* k_pos;           // NULL: 0..nk-1
    const i64* q_seg;           // NULL: no packed sequences (then k_seg is NULL too)
    const i64* k_seg;
    void* gemm;                 // cblas_sgemm (ilp64: 64-bit integers)
    int32_t ilp64;
};

}  // extern "C"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline void gemm(const hpcattn_cpu_call& c, bool trans_b, i64 m, i64 n, i64 k, float alpha,
                 const float* a, i64 lda, const float* b, i64 ldb, float beta, float* out,
                 i64 ldc) {
    int tb = trans_b ? kTrans : kNoTrans;
    if (c.ilp64)
        reinterpret_cast<gemm64_t>(c.gemm)(kRowMajor, kNoTrans, tb, m, n, k, alpha, a, lda, b, ldb,
                                           beta, out, ldc);
    else
        reinterpret_cast<gemm32_t>(c.gemm)(kRowMajor, kNoTrans, tb, int(m), int(n), int(k), alpha,
                                           a, int(lda), b, int(ldb), beta, out, int(ldc));
}

// exp(x) for x <= 0 (and -inf), vectorisable: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2,
// and Cephes' degree-6 polynomial for e^r (about 1 ulp); 0 below -87 (where float32 would go
// subnormal), so masked scores (-inf) give exactly 0.
#pragma omp declare simd notinbranch
inline float exp_nonpos(float x) {
    const float xc = x < -87.0f ? -87.0f : x;
    const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
    float r = std::fma(n, -0.693359375f, xc);
    r = std::fma(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = std::fma(p, r, 1.3981999507e-3f);
    p = std::fma(p, r, 8.3334519073e-3f);
    p = std::fma(p, r, 4.1665795894e-2f);
    p = std::fma(p, r, 1.6666665459e-1f);
    p = std::fma(p, r, 5.0000001201e-1f);
    p = std::fma(p, r * r, r) + 1.0f;
    int32_t bits = (int32_t(n) + 127) << 23;
    float two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    return x < -87.0f ? 0.0f : p * two_n;
}

#if defined(__AVX2__) && defined(__FMA__)
// the same function, eight lanes at a time (the compiler does not vectorise it reliably)
inline __m256 exp_nonpos8(__m256 x) {
    const __m256 lim = _mm256_set1_ps(-87.0f);
    const __m256 xc = _mm256_max_ps(x, lim);
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f),
                                                     _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), xc);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                            _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, lim, _CMP_LT_OQ), y);  // 0 below -87 (and -inf)
}

inline float hsum(__m256 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline float hmax(__m256 x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline float row_max(const float* s, i64 n) {
    __m256 m0 = _mm256_set1_ps(kNegInf), m1 = m0;
    i64 j = 0;
    for (; j + 16 <= n; j += 16) {
        m0 = _mm256_max_ps(m0, _mm256_loadu_ps(s + j));
        m1 = _mm256_max_ps(m1, _mm256_loadu_ps(s + j + 8));
    }
    float mx = hmax(_mm256_max_ps(m0, m1));
    for (; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
    return mx;
}

// s[j] <- exp(s[j] - m); returns the sum
inline float exp_row(float* s, i64 n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    i64 j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m256 p0 = exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        const __m256 p1 = exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), mv));
        _mm256_storeu_ps(s + j, p0);
        _mm256_storeu_ps(s + j + 8, p1);
        a0 = _mm256_add_ps(a0, p0);
        a1 = _mm256_add_ps(a1, p1);
    }
    float sum = hsum(_mm256_add_ps(a0, a1));
    for (; j < n; ++j) {
        s[j] = exp_nonpos(s[j] - m);
        sum += s[j];
    }
    return sum;
}
#else
inline float row_max(const float* s, i64 n) {
    float mx = kNegInf;
#pragma omp simd reduction(max : mx)
    for (i64 j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
    return mx;
}

// s[j] <- exp(s[j] - m); returns the sum
inline float exp_row(float* s, i64 n, float m) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (i64 j = 0; j < n; ++j) {
        const float p = exp_nonpos(s[j] - m);
        s[j] = p;
        sum += p;
    }
    return sum;
}
#endif

enum { kNone = 0, kPartial = 1, kFull = 2 };
constexpr i64 kSubBlocks = 4;  // row blocks a partial tile is split into

struct Range {
    i64 pmin, pmax, smin, smax;
};

Range range_of(const i64* pos, const i64* seg, i64 start, i64 stop) {
    Range r{start, stop - 1, 0, 0};
    if (pos) {
        r.pmin = r.pmax = pos[start];
        for (i64 i = start + 1; i < stop; ++i) {
            r.pmin = std::min(r.pmin, pos[i]);
            r.pmax = std::max(r.pmax, pos[i]);
        }
    }
    if (seg) {
        r.smin = r.smax = seg[start];
        for (i64 i = start + 1; i < stop; ++i) {
            r.smin = std::min(r.smin, seg[i]);
            r.smax = std::max(r.smax, seg[i]);
        }
    }
    return r;
}

int classify(const hpcattn_cpu_call& c, const Range& q, const Range& k) {
    if (!c.has_lo && !c.has_hi && !c.q_seg) return kFull;
    bool none = false, full = true;
    const i64 dmin = k.pmin - q.pmax - c.shift, dmax = k.pmax - q.pmin - c.shift;
    if (c.has_lo) {
        none |= dmax < c.lo;
        full &= dmin >= c.lo;
    }
    if (c.has_hi) {
        none |= dmin > c.hi;
        full &= dmax <= c.hi;
    }
    if (c.q_seg) {
        none |= (q.smax < k.smin) || (k.smax < q.smin);
        full &= (q.smin == q.smax) && (k.smin == k.smax) && (q.smin == k.smin);
    }
    return none ? kNone : (full ? kFull : kPartial);
}

inline i64 qpos(const hpcattn_cpu_call& c, i64 n) { return c.q_pos ? c.q_pos[n] : n; }
inline i64 kpos(const hpcattn_cpu_call& c, i64 j) { return c.k_pos ? c.k_pos[j] : j; }

// whether key j is hidden from every query of the tile (its positions and segments in q)
inline bool hidden_from_all(const hpcattn_cpu_call& c, const Range& q, i64 j) {
    const i64 kp = kpos(c, j);
    if (c.has_hi && kp - q.pmax - c.shift > c.hi) return true;
    if (c.has_lo && kp - q.pmin - c.shift < c.lo) return true;
    return c.q_seg && (c.k_seg[j] < q.smin || c.k_seg[j] > q.smax);
}

// hidden scores of a partial tile -> -inf
void apply_mask(const hpcattn_cpu_call& c, float* s, i64 t0, i64 t1, i64 j0, i64 j1) {
    const i64 nkt = j1 - j0, g = c.g;
    bool runs = !c.q_seg;  // consecutive key positions and no segments: each row sees one run
    for (i64 j = j0 + 1; runs && j < j1; ++j) runs = kpos(c, j) == kpos(c, j - 1) + 1;
    if (runs) {
        const i64 kp0 = kpos(c, j0);
        for (i64 n = t0; n < t1; ++n) {
            const i64 base = qpos(c, n) + c.shift - kp0;   // column x has diag = x - base
            const i64 first = c.has_lo ? std::clamp<i64>(base + c.lo, 0, nkt) : 0;
            const i64 stop = c.has_hi ? std::clamp<i64>(base + c.hi + 1, first, nkt) : nkt;
            for (i64 gi = 0; gi < g; ++gi) {
                float* row = s + ((n - t0) * g + gi) * nkt;
                std::fill(row, row + first, kNegInf);
                std::fill(row + stop, row + nkt, kNegInf);
            }
        }
        return;
    }
    for (i64 n = t0; n < t1; ++n) {
        const i64 base = qpos(c, n) + c.shift;
        const i64 qs = c.q_seg ? c.q_seg[n] : 0;
        for (i64 gi = 0; gi < g; ++gi) {
            float* row = s + ((n - t0) * g + gi) * nkt;
            for (i64 j = j0; j < j1; ++j) {
                const i64 diag = kpos(c, j) - base;
                bool vis = true;
                if (c.has_lo) vis = vis && diag >= c.lo;
                if (c.has_hi) vis = vis && diag <= c.hi;
                if (c.q_seg) vis = vis && c.k_seg[j] == qs;
                if (!vis) row[j - j0] = kNegInf;
            }
        }
    }
}

void* alloc(i64 floats) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, size_t(std::max<i64>(floats, 16)) * sizeof(float))) return nullptr;
    return p;
}

// Fold keys [j0, j1) into the state of query positions [t0, t1) (their scaled rows qt, their
// accumulator acc, running max m and sum l): S = qt K^T, the mask when masked, per row the max,
// exp(s - max) and its sum (rescaling the row's accumulator when its max grew), then acc += P V.
void fold(const hpcattn_cpu_call& c, i64 t0, i64 t1, i64 j0, i64 j1, bool masked, const float* qt,
          float* acc, float* m, double* l, float* s) {
    const i64 d = c.d, rows = (t1 - t0) * c.g, nkt = j1 - j0;
    gemm(c, true, rows, nkt, d, 1.0f, qt, d, c.k + j0 * c.k_stride, c.k_stride, 0.0f, s, nkt);
    if (masked) apply_mask(c, s, t0, t1, j0, j1);
    for (i64 r = 0; r < rows; ++r) {
        float* sr = s + r * nkt;
        const float mnew = std::max(m[r], row_max(sr, nkt));
        if (mnew == kNegInf) {  // nothing visible yet: this row adds nothing
            std::memset(sr, 0, size_t(nkt) * sizeof(float));
            continue;
        }
        const float sum = exp_row(sr, nkt, mnew);
        if (mnew != m[r]) {
            const float alpha = m[r] == kNegInf ? 0.0f : std::exp(m[r] - mnew);
            float* ar = acc + r * d;
#pragma omp simd
            for (i64 x = 0; x < d; ++x) ar[x] *= alpha;
            l[r] *= alpha;
            m[r] = mnew;
        }
        l[r] += sum;
    }
    gemm(c, false, rows, d, nkt, 1.0f, s, nkt, c.v + j0 * c.v_stride, c.v_stride, 1.0f, acc, d);
}

}  // namespace

extern "C" int hpcattn_cpu_forward_f32(const hpcattn_cpu_call* call) {
    const hpcattn_cpu_call& c = *call;
    const i64 g = c.g, d = c.d, bq = std::max<i64>(1, c.block_q), bk = std::max<i64>(1, c.block_k);
    const i64 rows_max = std::min(bq, std::max<i64>(c.nq, 1)) * g;
    const i64 cols_max = std::min(bk, std::max<i64>(c.nk, 1));
    float* qt = static_cast<float*>(alloc(rows_max * d));
    float* s = static_cast<float*>(alloc(rows_max * cols_max));
    float* acc = static_cast<float*>(alloc(rows_max * d));
    float* m = static_cast<float*>(alloc(rows_max));
    double* l = static_cast<double*>(alloc(2 * rows_max));
    const i64 n_ktiles = (c.nk + bk - 1) / bk;
    Range* kr = static_cast<Range*>(std::malloc(sizeof(Range) * size_t(std::max<i64>(n_ktiles, 1))));
    if (!qt || !s || !acc || !m || !l || !kr) {
        std::free(qt), std::free(s), std::free(acc), std::free(m), std::free(l), std::free(kr);
        return 1;
    }
    for (i64 t = 0; t < n_ktiles; ++t)
        kr[t] = range_of(c.k_pos, c.k_seg, t * bk, std::min(c.nk, (t + 1) * bk));

    for (i64 t0 = 0; t0 < c.nq; t0 += bq) {
        const i64 t1 = std::min(c.nq, t0 + bq), rows = (t1 - t0) * g;
        // the scale folded into the Q tile (as the NumPy kernel does): measured more accurate
        // than the GEMM's alpha (FlashAttention's rule: 1.31x vs 1.72x a float32 reference)
        for (i64 n = t0; n < t1; ++n) {
            const float* src = c.q + n * c.q_stride;
            float* dst = qt + (n - t0) * g * d;
            for (i64 x = 0; x < g * d; ++x) dst[x] = src[x] * c.scale;
        }
        std::fill(m, m + rows, kNegInf);
        std::fill(l, l + rows, 0.0);
        std::fill(acc, acc + rows * d, 0.0f);
        const Range qr = range_of(c.q_pos, c.q_seg, t0, t1);
        for (i64 t = 0; t < n_ktiles; ++t) {
            const int cls = classify(c, qr, kr[t]);
            if (cls == kNone) continue;
            const i64 j0 = t * bk, j1 = std::min(c.nk, j0 + bk);
            if (cls == kFull) {
                fold(c, t0, t1, j0, j1, false, qt, acc, m, l, s);
                continue;
            }
            // a partial tile (a diagonal, a window edge, a sequence boundary): in row blocks of
            // a quarter tile, each classified again and cut to the columns it can see, so a
            // causal diagonal computes ~1/8 of a tile it cannot use instead of ~1/2
            const i64 sub = std::max<i64>(1, (bq + kSubBlocks - 1) / kSubBlocks);
            for (i64 u0 = t0; u0 < t1; u0 += sub) {
                const i64 u1 = std::min(t1, u0 + sub);
                const Range ur = range_of(c.q_pos, c.q_seg, u0, u1);
                const int ucls = classify(c, ur, kr[t]);
                if (ucls == kNone) continue;
                i64 a = j0, b = j1;
                if (ucls == kPartial) {  // drop the edge columns no row of the block can see
                    while (a < b && hidden_from_all(c, ur, a)) ++a;
                    while (b > a && hidden_from_all(c, ur, b - 1)) --b;
                    if (a == b) continue;
                }
                const i64 off = (u0 - t0) * g;
                fold(c, u0, u1, a, b, ucls == kPartial, qt + off * d, acc + off * d, m + off,
                     l + off, s);
            }
        }
        for (i64 r = 0; r < rows; ++r) {
            const i64 n = t0 + r / g, gi = r % g;
            float* o = c.out + n * c.o_stride + gi * d;
            const float* ar = acc + r * d;
            if (l[r] > 0) {
                const float lr = float(l[r]);
                for (i64 x = 0; x < d; ++x) o[x] = ar[x] / lr;
                c.lse[gi * c.lse_head_stride + n] = float(double(m[r]) + std::log(l[r]));
            } else {
                std::memset(o, 0, size_t(d) * sizeof(float));
                c.lse[gi * c.lse_head_stride + n] = kNegInf;
            }
        }
    }
    std::free(qt), std::free(s), std::free(acc), std::free(m), std::free(l), std::free(kr);
    return 0;
}
