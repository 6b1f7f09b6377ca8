// hpcattn's fused CPU forward (float32): blockwise online-softmax attention of one (batch, kv
// head) slab and a range of its query positions, in compiled code.
//
// Per (query tile x key tile) it computes S = (scale Q) K^T, then per row the mask (partial
// tiles only), the row max, exp(s - m) and its sum, the rescale of the row's accumulator when its
// max grew, and ACC += P V. Two paths compute the products:
//  * AVX2+FMA (built with -march=native on such a CPU): 6 x 16 register-blocked kernels, six
//    query rows at a time from scores to accumulator (their score rows stay in L1), keys and
//    values packed once per call into 16-wide panels (the tile in L2);
//  * elsewhere: two sgemm calls per tile through the BLAS NumPy already loaded (a function
//    pointer), and the row pass between them.
// No Python runs between tiles, so the call holds no GIL (ctypes releases it).
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
// out = 0 and lse = -inf. The tiles live in the caller's scratch (hpcattn_cpu_scratch_floats()
// floats) or, without one, in memory allocated here. Returns 0, 1 (no memory for the tiles) or 2
// (the caller's scratch is smaller than the call needs).
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
    float* scratch;             // hpcattn_cpu_scratch_floats() floats for the call's tiles,
    i64 scratch_floats;         // or NULL: allocated (and freed) here
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
// exp(x) for x <= 0, eight lanes at a time (the compiler does not vectorise exp_nonpos reliably),
// in four vector ops fewer than exp_nonpos's method: exp(x) = 2^n 2^f with n = round(x log2 e)
// by the 1.5 * 2^23 shifter (whose low mantissa bits then hold n, so 2^n is those bits << 23
// plus the exponent bias), f = x log2 e - n in [-1/2, 1/2] by one fused multiply-subtract, and a
// degree-5 polynomial for 2^f fitted for relative error on [-1/2, 1/2] (7.5e-8 exactly). Measured
// against double exp: 4.3 ulp on [-4, 0], 5.7 on [-10, 0], 23 near -87 (log2 e rounded to float
// scales the error with |x|), below the rounding of the scores it is applied to; FlashAttention's
// accuracy rule kept (tests/test_cpu_fused_unit.py); measured 6% faster on the whole forward than
// Cephes' degree 6 with a two-constant reduction (docs/performance-notes.md). x < -87 (and -inf,
// whose NaN the mask hides) gives 0.
inline __m256 exp_nonpos8(__m256 x) {
    const __m256 shifter = _mm256_set1_ps(12582912.0f), log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 t = _mm256_fmadd_ps(x, log2e, shifter);
    const __m256 n = _mm256_sub_ps(t, shifter);
    const __m256 f = _mm256_fmsub_ps(x, log2e, n);
    __m256 p = _mm256_set1_ps(1.3278164e-3f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6755559e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5507079e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022119e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314694e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0000001f));
    const __m256i bits = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23),
                                          _mm256_set1_epi32(127 << 23));
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ), y);
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
// whether keys [j0, j1) have consecutive positions and there are no segments: then each query
// row sees one run of them
bool key_runs(const hpcattn_cpu_call& c, i64 j0, i64 j1) {
    bool runs = !c.q_seg;
    for (i64 j = j0 + 1; runs && j < j1; ++j) runs = kpos(c, j) == kpos(c, j - 1) + 1;
    return runs;
}

// hidden scores of query position n's row over keys [j0, j1) -> -inf
inline void mask_row(const hpcattn_cpu_call& c, float* row, i64 n, i64 j0, i64 j1, bool runs) {
    const i64 nkt = j1 - j0;
    if (runs) {
        const i64 base = qpos(c, n) + c.shift - kpos(c, j0);   // column x has diag = x - base
        const i64 first = c.has_lo ? std::clamp<i64>(base + c.lo, 0, nkt) : 0;
        const i64 stop = c.has_hi ? std::clamp<i64>(base + c.hi + 1, first, nkt) : nkt;
        std::fill(row, row + first, kNegInf);
        std::fill(row + stop, row + nkt, kNegInf);
        return;
    }
    const i64 base = qpos(c, n) + c.shift;
    const i64 qs = c.q_seg ? c.q_seg[n] : 0;
    for (i64 j = j0; j < j1; ++j) {
        const i64 diag = kpos(c, j) - base;
        bool vis = true;
        if (c.has_lo) vis = vis && diag >= c.lo;
        if (c.has_hi) vis = vis && diag <= c.hi;
        if (c.q_seg) vis = vis && c.k_seg[j] == qs;
        if (!vis) row[j - j0] = kNegInf;
    }
}

// one row's online-softmax step over its nkt scores: max, exp(s - max) in place, the sum, and
// the rescale of the row's accumulator (d of acc_row) when its max grew
inline void softmax_row(float* sr, i64 nkt, float& m, double& l, float* acc_row, i64 d) {
    const float mnew = std::max(m, row_max(sr, nkt));
    if (mnew == kNegInf) {  // nothing visible yet: this row adds nothing
        std::memset(sr, 0, size_t(nkt) * sizeof(float));
        return;
    }
    const float sum = exp_row(sr, nkt, mnew);
    if (mnew != m) {
        if (m != kNegInf) {  // (a row that saw nothing yet has a zero accumulator and sum)
            const float alpha = std::exp(m - mnew);
#pragma omp simd
            for (i64 x = 0; x < d; ++x) acc_row[x] *= alpha;
            l *= alpha;
        }
        m = mnew;
    }
    l += sum;
}

#if defined(__AVX2__) && defined(__FMA__)
#define HPCATTN_MICRO 1
// Register-blocked products for the AVX2 path: MR rows x 16 columns in 2*MR ymm accumulators.
constexpr i64 kNR = 16;

// Kp <- K[j0..j1) as panels of 16 keys: Kp[panel][p][0..16), zero past j1
void pack_k(const hpcattn_cpu_call& c, i64 j0, i64 j1, float* kp) {
    const i64 d = c.d, n = j1 - j0, panels = (n + kNR - 1) / kNR;
    for (i64 pn = 0; pn < panels; ++pn) {
        float* dst = kp + pn * d * kNR;
        const i64 w = std::min(kNR, n - pn * kNR);
        for (i64 jj = 0; jj < w; ++jj) {
            const float* src = c.k + (j0 + pn * kNR + jj) * c.k_stride;
            for (i64 p = 0; p < d; ++p) dst[p * kNR + jj] = src[p];
        }
        for (i64 jj = w; jj < kNR; ++jj)
            for (i64 p = 0; p < d; ++p) dst[p * kNR + jj] = 0.0f;
    }
}

// Vp <- V[j0..j1) as rows of d16 = d rounded up to 16 floats, zero past d
void pack_v(const hpcattn_cpu_call& c, i64 j0, i64 j1, i64 d16, float* vp) {
    for (i64 j = j0; j < j1; ++j) {
        float* dst = vp + (j - j0) * d16;
        std::memcpy(dst, c.v + j * c.v_stride, size_t(c.d) * sizeof(float));
        std::fill(dst + c.d, dst + d16, 0.0f);
    }
}

// Six rows at a time (callers pad to a multiple of 6 rows), the accumulators in named registers:
// arrays of __m256 make GCC store them to the stack on every iteration.
#define HPCATTN_ROW(i) __m256 x##i##0 = _mm256_setzero_ps(), x##i##1 = x##i##0;
#define HPCATTN_FMA(i, src)                                        \
    {                                                              \
        const __m256 a = _mm256_broadcast_ss(src);                 \
        x##i##0 = _mm256_fmadd_ps(a, b0, x##i##0);                 \
        x##i##1 = _mm256_fmadd_ps(a, b1, x##i##1);                 \
    }

// S[6 rows][16] = Q[6 rows][0..d) . Kpanel   (q rows d floats apart, S rows ld apart)
inline void micro_qk(const float* q, i64 d, const float* kpanel, float* s, i64 ld) {
    HPCATTN_ROW(0) HPCATTN_ROW(1) HPCATTN_ROW(2) HPCATTN_ROW(3) HPCATTN_ROW(4) HPCATTN_ROW(5)
    for (i64 p = 0; p < d; ++p) {
        const __m256 b0 = _mm256_load_ps(kpanel + p * kNR), b1 = _mm256_load_ps(kpanel + p * kNR + 8);
        HPCATTN_FMA(0, q + p) HPCATTN_FMA(1, q + d + p) HPCATTN_FMA(2, q + 2 * d + p)
        HPCATTN_FMA(3, q + 3 * d + p) HPCATTN_FMA(4, q + 4 * d + p) HPCATTN_FMA(5, q + 5 * d + p)
    }
#define HPCATTN_STORE(i) _mm256_storeu_ps(s + i * ld, x##i##0), _mm256_storeu_ps(s + i * ld + 8, x##i##1);
    HPCATTN_STORE(0) HPCATTN_STORE(1) HPCATTN_STORE(2) HPCATTN_STORE(3) HPCATTN_STORE(4) HPCATTN_STORE(5)
#undef HPCATTN_STORE
}

// ACC[6 rows][16 cols] += P[6 rows][0..n) . Vp[0..n)[16 cols]  (P rows ld apart, Vp/ACC rows d16)
inline void micro_pv(const float* p, i64 ld, i64 n, const float* vcol, i64 d16, float* acc) {
#define HPCATTN_LOAD(i) __m256 x##i##0 = _mm256_loadu_ps(acc + i * d16), x##i##1 = _mm256_loadu_ps(acc + i * d16 + 8);
    HPCATTN_LOAD(0) HPCATTN_LOAD(1) HPCATTN_LOAD(2) HPCATTN_LOAD(3) HPCATTN_LOAD(4) HPCATTN_LOAD(5)
#undef HPCATTN_LOAD
    for (i64 j = 0; j < n; ++j) {
        const __m256 b0 = _mm256_load_ps(vcol + j * d16), b1 = _mm256_load_ps(vcol + j * d16 + 8);
        HPCATTN_FMA(0, p + j) HPCATTN_FMA(1, p + ld + j) HPCATTN_FMA(2, p + 2 * ld + j)
        HPCATTN_FMA(3, p + 3 * ld + j) HPCATTN_FMA(4, p + 4 * ld + j) HPCATTN_FMA(5, p + 5 * ld + j)
    }
#define HPCATTN_STORE(i) _mm256_storeu_ps(acc + i * d16, x##i##0), _mm256_storeu_ps(acc + i * d16 + 8, x##i##1);
    HPCATTN_STORE(0) HPCATTN_STORE(1) HPCATTN_STORE(2) HPCATTN_STORE(3) HPCATTN_STORE(4) HPCATTN_STORE(5)
#undef HPCATTN_STORE
}
#undef HPCATTN_ROW
#undef HPCATTN_FMA

constexpr i64 kMR = 6;
constexpr i64 kMicroMinRows = 48;  // fewer query rows in a fold: the sgemm path

#endif

// Scratch of one call: the scaled Q tile, the score tile, the packed key/value tile (AVX2 path)
struct Work {
    float* qt;
    float* s;
    float* kp;
    float* vp;
    i64 da;  // accumulator row stride: d, or d rounded up to 16 on the AVX2 path
    const float* kp_all;  // every key of the slab packed once (AVX2 path, when it fits), or NULL
    const float* vp_all;
};

// Fold keys [j0, j1) into the state of query positions [t0, t1) (their scaled rows qt, their
// accumulator acc, running max m and sum l): S = qt K^T, the mask when masked, per row the max,
// exp(s - max) and its sum (rescaling the row's accumulator when its max grew), then acc += P V.
void fold(const hpcattn_cpu_call& c, const Work& w, i64 t0, i64 t1, i64 j0, i64 j1, bool masked,
          const float* qt, float* acc, float* m, double* l) {
    const i64 d = c.d, g = c.g, rows = (t1 - t0) * g, nkt = j1 - j0, da = w.da;
    const bool runs = masked && key_runs(c, j0, j1);
    float* s = w.s;
#ifdef HPCATTN_MICRO
    // six query rows at a time from scores to output: their score rows stay in L1, the packed
    // key and value tile in L2. For a handful of rows packing the keys costs more than the
    // products, so those take the sgemm path below.
    if (rows >= kMicroMinRows) {
        const i64 panels = (nkt + kNR - 1) / kNR, ld = panels * kNR;
        const float* kp = w.kp;
        const float* vp = w.vp;
        if (w.kp_all && j0 % kNR == 0) {  // panels past j1 hold later keys: columns nobody reads
            kp = w.kp_all + j0 / kNR * d * kNR;
            vp = w.vp_all + j0 * da;
        } else {
            pack_k(c, j0, j1, w.kp);
            pack_v(c, j0, j1, da, w.vp);
        }
        for (i64 r0 = 0; r0 < rows; r0 += kMR) {
            const i64 nr = std::min(kMR, rows - r0);
            for (i64 pn = 0; pn < panels; ++pn)
                micro_qk(qt + r0 * d, d, kp + pn * d * kNR, s + pn * kNR, ld);
            for (i64 i = 0; i < nr; ++i) {
                const i64 r = r0 + i;
                if (masked) mask_row(c, s + i * ld, t0 + r / g, j0, j1, runs);
                softmax_row(s + i * ld, nkt, m[r], l[r], acc + r * da, d);
            }
            // rows past the block add 0 to the rows after it (they belong to the next block)
            std::memset(s + nr * ld, 0, size_t((kMR - nr) * ld) * sizeof(float));
            for (i64 cp = 0; cp < da; cp += kNR)
                micro_pv(s, ld, nkt, vp + cp, da, acc + r0 * da + cp);
        }
        return;
    }
#endif
    const i64 ld = nkt;
    gemm(c, true, rows, nkt, d, 1.0f, qt, d, c.k + j0 * c.k_stride, c.k_stride, 0.0f, s, ld);
    for (i64 r = 0; r < rows; ++r) {
        if (masked) mask_row(c, s + r * ld, t0 + r / g, j0, j1, runs);
        softmax_row(s + r * ld, nkt, m[r], l[r], acc + r * da, d);
    }
    gemm(c, false, rows, d, nkt, 1.0f, s, ld, c.v + j0 * c.v_stride, c.v_stride, 1.0f, acc, da);
}

}  // namespace

namespace {

// What one call holds, in floats, each part 64-byte aligned in one scratch block (the caller's,
// so that what the kernel holds is counted where the caller counts memory): the scaled Q tile,
// the score tile, a packed key/value tile, every key and value of the slab packed once (AVX2
// path, when at most 64 MiB), the forward's accumulator, m and l (a fold uses the caller's), the
// key tiles' position ranges.
struct Plan {
    i64 rows_max, rows_pad, ld_max, cols_max, da, nk16;
    i64 qt, s, kp, vp, packed, acc, m, l, kr, total;
};

inline i64 round16(i64 floats) { return (std::max<i64>(floats, 1) + 15) / 16 * 16; }

Plan plan_of(const hpcattn_cpu_call& c, bool folding) {
    Plan p{};
    const i64 g = c.g, d = c.d, bq = std::max<i64>(1, c.block_q), bk = std::max<i64>(1, c.block_k);
    p.rows_max = std::min(bq, std::max<i64>(c.nq, 1)) * g;
    p.cols_max = std::min(bk, std::max<i64>(c.nk, 1));
#ifdef HPCATTN_MICRO
    p.da = (d + kNR - 1) / kNR * kNR;
    p.ld_max = (p.cols_max + kNR - 1) / kNR * kNR;
    p.nk16 = (c.nk + kNR - 1) / kNR * kNR;
    const bool pack_all = c.nq * g >= kMicroMinRows && 2 * p.nk16 * p.da * i64(sizeof(float)) <= (i64(64) << 20);
#else
    p.da = d, p.ld_max = p.cols_max, p.nk16 = c.nk;
    const bool pack_all = false;
#endif
    p.rows_pad = p.rows_max + 8;  // the AVX2 path runs whole 6-row blocks past a tile's end
    const i64 n_ktiles = std::max<i64>(1, (c.nk + bk - 1) / bk);
    p.qt = round16(p.rows_pad * d);
    p.s = round16(p.rows_pad * p.ld_max);
    p.kp = round16(p.ld_max * d);
    p.vp = round16(p.cols_max * p.da);
    p.packed = pack_all ? round16(2 * p.nk16 * p.da) : 0;
    p.acc = folding ? 0 : round16(p.rows_pad * p.da);
    p.m = folding ? 0 : round16(p.rows_max);
    p.l = folding ? 0 : round16(2 * p.rows_max);  // doubles
    p.kr = round16(n_ktiles * i64(sizeof(Range) / sizeof(float)));
    p.total = p.qt + p.s + p.kp + p.vp + p.packed + p.acc + p.m + p.l + p.kr + 16;  // + alignment
    return p;
}

// The forward (state == NULL: per query tile a fresh state, finalised into out and lse) or one
// fold of a key block into a caller's state (acc: nq*g rows of acc_stride floats plus 6 rows of
// padding, m and l: nq*g each; nothing finalised). Returns 1 when it could not allocate its
// scratch, 2 when the caller's scratch is smaller than the plan.
int run(const hpcattn_cpu_call& c, float* state_acc, float* state_m, double* state_l) {
    const bool folding = state_acc != nullptr;
    const Plan p = plan_of(c, folding);
    const i64 g = c.g, d = c.d, bq = std::max<i64>(1, c.block_q), bk = std::max<i64>(1, c.block_k);
    const i64 rows_pad = p.rows_pad, da = p.da;
    void* own = nullptr;
    float* base = c.scratch;
    if (base && c.scratch_floats < p.total) return 2;
    if (!base) {
        if (posix_memalign(&own, 64, size_t(p.total) * sizeof(float))) return 1;
        base = static_cast<float*>(own);
    }
    base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(base) + 63) & ~uintptr_t(63));
    auto take = [&base](i64 floats) {
        float* at = floats ? base : nullptr;
        base += floats;
        return at;
    };
    Work w{take(p.qt), take(p.s), take(p.kp), take(p.vp), da, nullptr, nullptr};
    float* const packed = take(p.packed);
    float* acc = folding ? nullptr : take(p.acc);
    float* m = folding ? nullptr : take(p.m);
    double* l = folding ? nullptr : reinterpret_cast<double*>(take(p.l));
    Range* kr = reinterpret_cast<Range*>(take(p.kr));
    if (packed) {  // keys and values packed once for every query tile (AVX2 path only)
#ifdef HPCATTN_MICRO
        pack_k(c, 0, c.nk, packed);
        pack_v(c, 0, c.nk, da, packed + p.nk16 * da);
        w.kp_all = packed;
        w.vp_all = packed + p.nk16 * da;
#endif
    }
    const i64 n_ktiles = (c.nk + bk - 1) / bk;
    std::fill(w.qt, w.qt + rows_pad * d, 0.0f);  // padding rows: finite, never read back
    for (i64 t = 0; t < n_ktiles; ++t)
        kr[t] = range_of(c.k_pos, c.k_seg, t * bk, std::min(c.nk, (t + 1) * bk));

    for (i64 t0 = 0; t0 < c.nq; t0 += bq) {
        const i64 t1 = std::min(c.nq, t0 + bq), rows = (t1 - t0) * g;
        // the scale folded into the Q tile (as the NumPy kernel does): measured more accurate
        // than the GEMM's alpha (FlashAttention's rule: 1.31x vs 1.72x a float32 reference)
        for (i64 n = t0; n < t1; ++n) {
            const float* src = c.q + n * c.q_stride;
            float* dst = w.qt + (n - t0) * g * d;
            // the row 16 ahead: q rows are q_stride apart (other heads between them), too far
            // apart for the hardware prefetcher, and at decode-like shapes this read is the cost
            if (n + 16 < c.nq)
                for (i64 x = 0; x < g * d; x += 16) __builtin_prefetch(src + 16 * c.q_stride + x, 0, 0);
            for (i64 x = 0; x < g * d; ++x) dst[x] = src[x] * c.scale;
        }
        if (folding) {  // this tile's rows of the caller's state
            acc = state_acc + t0 * g * da;
            m = state_m + t0 * g;
            l = state_l + t0 * g;
        } else {
            std::fill(m, m + rows, kNegInf);
            std::fill(l, l + rows, 0.0);
            std::fill(acc, acc + (rows + 6) * da, 0.0f);
        }
        const Range qr = range_of(c.q_pos, c.q_seg, t0, t1);
        for (i64 t = 0; t < n_ktiles; ++t) {
            const int cls = classify(c, qr, kr[t]);
            if (cls == kNone) continue;
            const i64 j0 = t * bk, j1 = std::min(c.nk, j0 + bk);
            if (cls == kFull) {
                fold(c, w, t0, t1, j0, j1, false, w.qt, acc, m, l);
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
                fold(c, w, u0, u1, a, b, ucls == kPartial, w.qt + off * d, acc + off * da, m + off,
                     l + off);
            }
        }
        // (position n, group member gi) as two loops: a 64-bit division per row costs more than
        // the row's output at decode-like shapes
        for (i64 n = t0, r = 0; n < t1 && !folding; ++n) {
            for (i64 gi = 0; gi < g; ++gi, ++r) {
                float* o = c.out + n * c.o_stride + gi * d;
                const float* ar = acc + r * da;
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
    }
    std::free(own);
    return 0;
}

}  // namespace

extern "C" int hpcattn_cpu_forward_f32(const hpcattn_cpu_call* call) {
    return run(*call, nullptr, nullptr, nullptr);
}

// Fold the keys of *call into a state: acc (nq*g + 6 rows of hpcattn_cpu_acc_stride(d) floats,
// zero to start), m (nq*g floats, -inf to start), l (nq*g doubles, 0 to start); out/lse unused.
extern "C" int hpcattn_cpu_fold_f32(const hpcattn_cpu_call* call, float* acc, float* m, double* l) {
    return run(*call, acc, m, l);
}

// Floats of scratch a call needs (folding: hpcattn_cpu_fold_f32, else the forward)
extern "C" int64_t hpcattn_cpu_scratch_floats(const hpcattn_cpu_call* call, int32_t folding) {
    return plan_of(*call, folding != 0).total;
}

// The accumulator row stride of a state for head dim d
extern "C" int64_t hpcattn_cpu_acc_stride(int64_t d) {
#ifdef HPCATTN_MICRO
    return (d + kNR - 1) / kNR * kNR;
#else
    return d;
#endif
}
