// hpcattn's fused CPU forward (float32): blockwise online-softmax attention of one (batch, kv
// head) slab and a range of its query positions, in compiled code.
//
// Per (query tile x key tile) it computes S = (scale Q) K^T, then per row the mask (partial
// tiles only), the row max, exp(s - m) and its sum, the rescale of the row's accumulator when its
// max grew, and ACC += P V. Two paths compute the products:
//  * AVX2+FMA (built with -march=native on such a CPU): 6 x 16 register-blocked kernels (6 x 64
//    and 6 x 32 in zmm registers, and the row pass in 16 lanes, where the CPU has AVX-512), six
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
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers seed masked builtins with _mm512_undefined_ps(), which its
// -Wmaybe-uninitialized reports at every inlined use (GCC bug 105593): not this code's
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
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
    i64 nh;                     // kv heads in the call (0 or 1: one); the others at these
    i64 q_hs, k_hs, v_hs, o_hs, lse_hs;  // strides (floats) from one kv head to the next
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

// Per-lane reductions of eight vectors: lane i of the result is the max (sum) of r[i]'s eight
// lanes, by three levels of transposing shuffles (21 ops for eight rows, against a horizontal
// reduction of ~5 dependent shuffles per row)
#define HPCATTN_REDUCE8(name, op)                                                                  \
    inline __m256 name(const __m256* r) {                                                          \
        const __m256 t01 = op(_mm256_unpacklo_ps(r[0], r[1]), _mm256_unpackhi_ps(r[0], r[1]));    \
        const __m256 t23 = op(_mm256_unpacklo_ps(r[2], r[3]), _mm256_unpackhi_ps(r[2], r[3]));    \
        const __m256 t45 = op(_mm256_unpacklo_ps(r[4], r[5]), _mm256_unpackhi_ps(r[4], r[5]));    \
        const __m256 t67 = op(_mm256_unpacklo_ps(r[6], r[7]), _mm256_unpackhi_ps(r[6], r[7]));    \
        const __m256 u0 = op(_mm256_shuffle_ps(t01, t23, _MM_SHUFFLE(1, 0, 1, 0)),                 \
                             _mm256_shuffle_ps(t01, t23, _MM_SHUFFLE(3, 2, 3, 2)));                \
        const __m256 u1 = op(_mm256_shuffle_ps(t45, t67, _MM_SHUFFLE(1, 0, 1, 0)),                 \
                             _mm256_shuffle_ps(t45, t67, _MM_SHUFFLE(3, 2, 3, 2)));                \
        return op(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));   \
    }
HPCATTN_REDUCE8(reduce8_max, _mm256_max_ps)
HPCATTN_REDUCE8(reduce8_add, _mm256_add_ps)
#undef HPCATTN_REDUCE8

// log(x) for finite x >= 1 (a softmax row's sum), eight lanes: Cephes' logf (x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), a degree-8 polynomial in m - 1, ln 2 in two parts; about 1 ulp)
inline __m256 log_ge1_8(__m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
    const __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                                         _mm256_set1_epi32(0x3f000000)));  // [1/2, 1)
    const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
    const __m256 f = _mm256_add_ps(_mm256_sub_ps(m, _mm256_set1_ps(1.0f)), _mm256_and_ps(small, m));
    const __m256 z = _mm256_mul_ps(f, f);
    __m256 y = _mm256_set1_ps(7.0376836292e-2f);
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.1514610310e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.1676998740e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.2420140846e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.4249322787e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.6668057665e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.0000714765e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-2.4999993993e-1f));
    y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(3.3333331174e-1f));
    y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fmadd_ps(z, _mm256_set1_ps(-0.5f), y);
    return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

#if defined(__AVX512F__)
// exp_nonpos8 in sixteen lanes (the same operations lane by lane: the same numbers)
inline __m512 exp_nonpos16(__m512 x) {
    const __m512 shifter = _mm512_set1_ps(12582912.0f), log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 t = _mm512_fmadd_ps(x, log2e, shifter);
    const __m512 n = _mm512_sub_ps(t, shifter);
    const __m512 f = _mm512_fmsub_ps(x, log2e, n);
    __m512 p = _mm512_set1_ps(1.3278164e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6755559e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507079e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022119e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314694e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001f));
    const __m512i bits = _mm512_add_epi32(_mm512_slli_epi32(_mm512_castps_si512(t), 23),
                                          _mm512_set1_epi32(127 << 23));
    const __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ), y);
}

// the low and high eight lanes added: the ymm loops' a0 + a1
inline __m256 fold_halves(__m512 x) {
    return _mm256_add_ps(_mm512_castps512_ps256(x),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}
#endif

// The softmax of six score rows of nkt <= 16 keys (rows 16 floats apart), in place and
// normalised: P = exp(s - m) / l, lse6[i] = m + log l; the row statistics as vectors across the
// rows. Columns past nkt are ignored (their P is 0).
inline void softmax6_16(float* s, i64 nkt, float* lse6) {
#if defined(__AVX512F__)
    // a row's 16 scores in one zmm; the max and sum across its halves as the ymm code takes them
    const __mmask16 keep = __mmask16((1u << std::min<i64>(nkt, 16)) - 1u);
    const __m512 ninfz = _mm512_set1_ps(kNegInf);
    __m256 r[8];
    __m512 e[6];
    for (int i = 0; i < 6; ++i) {
        e[i] = _mm512_mask_mov_ps(ninfz, keep, _mm512_loadu_ps(s + 16 * i));
        r[i] = _mm256_max_ps(_mm512_castps512_ps256(e[i]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e[i]), 1)));
    }
    r[6] = r[7] = r[5];
    alignas(32) float mv[8], iv[8];
    const __m256 mx = reduce8_max(r);
    _mm256_store_ps(mv, mx);
    for (int i = 0; i < 6; ++i) {
        e[i] = exp_nonpos16(_mm512_sub_ps(e[i], _mm512_set1_ps(mv[i])));
        r[i] = fold_halves(e[i]);
    }
    r[6] = r[7] = r[5];
    const __m256 sum = reduce8_add(r);
    _mm256_store_ps(iv, _mm256_div_ps(_mm256_set1_ps(1.0f), sum));
    _mm256_storeu_ps(lse6, _mm256_add_ps(mx, log_ge1_8(sum)));
    for (int i = 0; i < 6; ++i) _mm512_storeu_ps(s + 16 * i, _mm512_mul_ps(e[i], _mm512_set1_ps(iv[i])));
#else
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 keep0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(nkt)), iota));
    const __m256 keep1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(nkt) - 8), iota));
    const __m256 ninf = _mm256_set1_ps(kNegInf);
    __m256 r[8];
    for (int i = 0; i < 6; ++i) {
        const __m256 a0 = _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + 16 * i), keep0);
        const __m256 a1 = _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + 16 * i + 8), keep1);
        _mm256_storeu_ps(s + 16 * i, a0);
        _mm256_storeu_ps(s + 16 * i + 8, a1);
        r[i] = _mm256_max_ps(a0, a1);
    }
    r[6] = r[7] = r[5];
    alignas(32) float mv[8], iv[8];
    const __m256 mx = reduce8_max(r);
    _mm256_store_ps(mv, mx);
    for (int i = 0; i < 6; ++i) {
        const __m256 mi = _mm256_broadcast_ss(mv + i);
        const __m256 e0 = exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(s + 16 * i), mi));
        const __m256 e1 = exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(s + 16 * i + 8), mi));
        _mm256_storeu_ps(s + 16 * i, e0);
        _mm256_storeu_ps(s + 16 * i + 8, e1);
        r[i] = _mm256_add_ps(e0, e1);
    }
    r[6] = r[7] = r[5];
    const __m256 sum = reduce8_add(r);
    _mm256_store_ps(iv, _mm256_div_ps(_mm256_set1_ps(1.0f), sum));
    _mm256_storeu_ps(lse6, _mm256_add_ps(mx, log_ge1_8(sum)));
    for (int i = 0; i < 6; ++i) {
        const __m256 b = _mm256_broadcast_ss(iv + i);
        _mm256_storeu_ps(s + 16 * i, _mm256_mul_ps(_mm256_loadu_ps(s + 16 * i), b));
        _mm256_storeu_ps(s + 16 * i + 8, _mm256_mul_ps(_mm256_loadu_ps(s + 16 * i + 8), b));
    }
#endif
}


inline float row_max(const float* s, i64 n) {
    __m256 m0 = _mm256_set1_ps(kNegInf), m1 = m0;
    i64 j = 0;
#if defined(__AVX512F__)
    if (n >= 16) {
        __m512 z = _mm512_set1_ps(kNegInf);
        for (; j + 16 <= n; j += 16) z = _mm512_max_ps(z, _mm512_loadu_ps(s + j));
        m0 = _mm512_castps512_ps256(z);
        m1 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1));
    }
#endif
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
#if defined(__AVX512F__)
    if (n >= 16) {  // lane i of a sums what a0's (i < 8) or a1's (i - 8) lane would: same sum
        const __m512 mz = _mm512_set1_ps(m);
        __m512 a = _mm512_setzero_ps();
        for (; j + 16 <= n; j += 16) {
            const __m512 p = exp_nonpos16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mz));
            _mm512_storeu_ps(s + j, p);
            a = _mm512_add_ps(a, p);
        }
        a0 = fold_halves(a);  // a0 + a1 below adds a1 = 0: exact
    }
#endif
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
#if defined(__AVX512F__)
// AVX-512 (one 16-key panel or 16 accumulator columns per zmm): six rows by 64 or 32 columns in
// 24 or 12 zmm accumulators. The 6x16 ymm kernels above keep 12 accumulators of 8 lanes, half
// the FMA width of a core with two 512-bit FMA ports (measured: docs/performance-notes.md). Each
// output element is the same chain of FMAs in the same order as the ymm kernels: same numbers.
#define HPCATTN_ZROW2(i) __m512 z##i##0 = _mm512_setzero_ps(), z##i##1 = z##i##0;
#define HPCATTN_ZROW4(i) __m512 z##i##0 = _mm512_setzero_ps(), z##i##1 = z##i##0, z##i##2 = z##i##0, z##i##3 = z##i##0;
#define HPCATTN_ZFMA2(i, src)                                      \
    {                                                              \
        const __m512 a = _mm512_set1_ps(*(src));                   \
        z##i##0 = _mm512_fmadd_ps(a, b0, z##i##0);                 \
        z##i##1 = _mm512_fmadd_ps(a, b1, z##i##1);                 \
    }
#define HPCATTN_ZFMA4(i, src)                                      \
    {                                                              \
        const __m512 a = _mm512_set1_ps(*(src));                   \
        z##i##0 = _mm512_fmadd_ps(a, b0, z##i##0);                 \
        z##i##1 = _mm512_fmadd_ps(a, b1, z##i##1);                 \
        z##i##2 = _mm512_fmadd_ps(a, b2, z##i##2);                 \
        z##i##3 = _mm512_fmadd_ps(a, b3, z##i##3);                 \
    }
#define HPCATTN_ZSIX(M, a, st)                                                                  \
    M(0, a) M(1, a + st) M(2, a + 2 * st) M(3, a + 3 * st) M(4, a + 4 * st) M(5, a + 5 * st)

// S[6 rows][64] = Q[6 rows][0..d) . four Kpanels (panel pstride floats apart)
inline void micro_qk4(const float* q, i64 d, const float* kp, i64 pstride, float* s, i64 ld) {
    HPCATTN_ZROW4(0) HPCATTN_ZROW4(1) HPCATTN_ZROW4(2) HPCATTN_ZROW4(3) HPCATTN_ZROW4(4) HPCATTN_ZROW4(5)
    for (i64 p = 0; p < d; ++p) {
        const float* b = kp + p * kNR;
        const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + pstride),
                     b2 = _mm512_loadu_ps(b + 2 * pstride), b3 = _mm512_loadu_ps(b + 3 * pstride);
        HPCATTN_ZSIX(HPCATTN_ZFMA4, q + p, d)
    }
#define HPCATTN_STORE(i)                                                                        \
    _mm512_storeu_ps(s + i * ld, z##i##0), _mm512_storeu_ps(s + i * ld + 16, z##i##1),          \
        _mm512_storeu_ps(s + i * ld + 32, z##i##2), _mm512_storeu_ps(s + i * ld + 48, z##i##3);
    HPCATTN_STORE(0) HPCATTN_STORE(1) HPCATTN_STORE(2) HPCATTN_STORE(3) HPCATTN_STORE(4) HPCATTN_STORE(5)
#undef HPCATTN_STORE
}

// S[6 rows][32] = Q[6 rows][0..d) . two Kpanels
inline void micro_qk2(const float* q, i64 d, const float* kp, i64 pstride, float* s, i64 ld) {
    HPCATTN_ZROW2(0) HPCATTN_ZROW2(1) HPCATTN_ZROW2(2) HPCATTN_ZROW2(3) HPCATTN_ZROW2(4) HPCATTN_ZROW2(5)
    for (i64 p = 0; p < d; ++p) {
        const float* b = kp + p * kNR;
        const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + pstride);
        HPCATTN_ZSIX(HPCATTN_ZFMA2, q + p, d)
    }
#define HPCATTN_STORE(i) _mm512_storeu_ps(s + i * ld, z##i##0), _mm512_storeu_ps(s + i * ld + 16, z##i##1);
    HPCATTN_STORE(0) HPCATTN_STORE(1) HPCATTN_STORE(2) HPCATTN_STORE(3) HPCATTN_STORE(4) HPCATTN_STORE(5)
#undef HPCATTN_STORE
}

// ACC[6 rows][64 cols] += P[6 rows][0..n) . V[0..n)[64 cols]: P's rows p_row and its keys PKey
// floats apart (score rows: ld and 1; few-row folds' key-major ST: 1 and kFewLanes), V's rows vs
// floats apart (packed Vp: d16; in place: the input's stride), ACC's rows da
template <i64 PKey>
inline void micro_pv4(const float* p, i64 p_row, i64 n, const float* v, i64 vs, float* acc, i64 da) {
#define HPCATTN_LOAD(i)                                                                         \
    __m512 z##i##0 = _mm512_loadu_ps(acc + i * da), z##i##1 = _mm512_loadu_ps(acc + i * da + 16), \
           z##i##2 = _mm512_loadu_ps(acc + i * da + 32), z##i##3 = _mm512_loadu_ps(acc + i * da + 48);
    HPCATTN_LOAD(0) HPCATTN_LOAD(1) HPCATTN_LOAD(2) HPCATTN_LOAD(3) HPCATTN_LOAD(4) HPCATTN_LOAD(5)
#undef HPCATTN_LOAD
    for (i64 j = 0; j < n; ++j) {
        const float* b = v + j * vs;
        const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32),
                     b3 = _mm512_loadu_ps(b + 48);
        HPCATTN_ZSIX(HPCATTN_ZFMA4, p + j * PKey, p_row)
    }
#define HPCATTN_STORE(i)                                                                        \
    _mm512_storeu_ps(acc + i * da, z##i##0), _mm512_storeu_ps(acc + i * da + 16, z##i##1),      \
        _mm512_storeu_ps(acc + i * da + 32, z##i##2), _mm512_storeu_ps(acc + i * da + 48, z##i##3);
    HPCATTN_STORE(0) HPCATTN_STORE(1) HPCATTN_STORE(2) HPCATTN_STORE(3) HPCATTN_STORE(4) HPCATTN_STORE(5)
#undef HPCATTN_STORE
}

// ACC[6 rows][32 cols] += P[6 rows][0..n) . Vp[0..n)[32 cols]
inline void micro_pv2(const float* p, i64 ld, i64 n, const float* vcol, i64 d16, float* acc) {
#define HPCATTN_LOAD(i) __m512 z##i##0 = _mm512_loadu_ps(acc + i * d16), z##i##1 = _mm512_loadu_ps(acc + i * d16 + 16);
    HPCATTN_LOAD(0) HPCATTN_LOAD(1) HPCATTN_LOAD(2) HPCATTN_LOAD(3) HPCATTN_LOAD(4) HPCATTN_LOAD(5)
#undef HPCATTN_LOAD
    for (i64 j = 0; j < n; ++j) {
        const float* b = vcol + j * d16;
        const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
        HPCATTN_ZSIX(HPCATTN_ZFMA2, p + j, ld)
    }
#define HPCATTN_STORE(i) _mm512_storeu_ps(acc + i * d16, z##i##0), _mm512_storeu_ps(acc + i * d16 + 16, z##i##1);
    HPCATTN_STORE(0) HPCATTN_STORE(1) HPCATTN_STORE(2) HPCATTN_STORE(3) HPCATTN_STORE(4) HPCATTN_STORE(5)
#undef HPCATTN_STORE
}
// S[R rows][16] = Q[R rows][0..d) . Kpanel: micro_qk in one zmm per row (Q rows lq apart); R
// FMA chains in flight, each row's the same FMAs in the same order whatever R
template <int R>
inline void micro_qk1zr(const float* q, i64 d, const float* kpanel, float* s, i64 ld, i64 lq) {
    __m512 z[R];
    for (int i = 0; i < R; ++i) z[i] = _mm512_setzero_ps();
    for (i64 p = 0; p < d; ++p) {
        const __m512 b = _mm512_loadu_ps(kpanel + p * kNR);
        for (int i = 0; i < R; ++i) z[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * lq + p]), b, z[i]);
    }
    for (int i = 0; i < R; ++i) _mm512_storeu_ps(s + i * ld, z[i]);
}
// six rows (a 6-row block)
inline void micro_qk1z(const float* q, i64 d, const float* kpanel, float* s, i64 ld, i64 lq) {
    micro_qk1zr<6>(q, d, kpanel, s, ld, lq);
}
// twelve rows: two 6-row blocks sharing each load of the panel (twelve FMA chains in flight
// where six wait on the FMA latency)
inline void micro_qk1z12(const float* q, i64 d, const float* kpanel, float* s, i64 ld, i64 lq) {
    micro_qk1zr<12>(q, d, kpanel, s, ld, lq);
}

// OUT rows o[0..6) (NULL: not stored), columns [cp, cp + 64) = P[6 rows][0..n) . Vp[0..n)[64
// cols] from zero (micro_pv_out for four 16-column blocks at once); stream: every o[i] + cp is
// 64-byte aligned, and the stores bypass the cache
inline void micro_pv_out4(const float* p, i64 ld, i64 n, const float* vcol, i64 d16,
                          float* const* o, i64 cp, bool stream) {
    HPCATTN_ZROW4(0) HPCATTN_ZROW4(1) HPCATTN_ZROW4(2) HPCATTN_ZROW4(3) HPCATTN_ZROW4(4) HPCATTN_ZROW4(5)
    for (i64 j = 0; j < n; ++j) {
        const float* b = vcol + j * d16;
        const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32),
                     b3 = _mm512_loadu_ps(b + 48);
        HPCATTN_ZSIX(HPCATTN_ZFMA4, p + j, ld)
    }
#define HPCATTN_STORE(i, ST)                                                                    \
    if (o[i]) ST(o[i] + cp, z##i##0), ST(o[i] + cp + 16, z##i##1), ST(o[i] + cp + 32, z##i##2), \
        ST(o[i] + cp + 48, z##i##3);
    if (stream) {
        HPCATTN_STORE(0, _mm512_stream_ps) HPCATTN_STORE(1, _mm512_stream_ps) HPCATTN_STORE(2, _mm512_stream_ps)
        HPCATTN_STORE(3, _mm512_stream_ps) HPCATTN_STORE(4, _mm512_stream_ps) HPCATTN_STORE(5, _mm512_stream_ps)
    } else {
        HPCATTN_STORE(0, _mm512_storeu_ps) HPCATTN_STORE(1, _mm512_storeu_ps) HPCATTN_STORE(2, _mm512_storeu_ps)
        HPCATTN_STORE(3, _mm512_storeu_ps) HPCATTN_STORE(4, _mm512_storeu_ps) HPCATTN_STORE(5, _mm512_storeu_ps)
    }
#undef HPCATTN_STORE
}
#endif

// S[6 rows][0..16*panels) = Q[6 rows][0..d) . Kp's panels (S rows ld apart): the widest kernels
// this build has
inline void micro_qk_panels(const float* q, i64 d, const float* kp, i64 panels, float* s, i64 ld) {
    const i64 ps = d * kNR;
    i64 pn = 0;
#if defined(__AVX512F__)
    for (; pn + 4 <= panels; pn += 4) micro_qk4(q, d, kp + pn * ps, ps, s + pn * kNR, ld);
    for (; pn + 2 <= panels; pn += 2) micro_qk2(q, d, kp + pn * ps, ps, s + pn * kNR, ld);
    if (pn < panels) micro_qk1z(q, d, kp + pn * ps, s + pn * kNR, ld, d), ++pn;
#endif
    for (; pn < panels; ++pn) micro_qk(q, d, kp + pn * ps, s + pn * kNR, ld);
}

// ACC[6 rows][0..da) += P[6 rows][0..n) . Vp[0..n)[0..da)  (da a multiple of 16; Vp/ACC rows da)
inline void micro_pv_cols(const float* p, i64 ld, i64 n, const float* vp, i64 da, float* acc) {
    i64 cp = 0;
#if defined(__AVX512F__)
    for (; cp + 64 <= da; cp += 64) micro_pv4<1>(p, ld, n, vp + cp, da, acc + cp, da);
    for (; cp + 32 <= da; cp += 32) micro_pv2(p, ld, n, vp + cp, da, acc + cp);
#endif
    for (; cp < da; cp += kNR) micro_pv(p, ld, n, vp + cp, da, acc + cp);
}
constexpr i64 kMR = 6;
constexpr i64 kMicroMinRows = 48;  // fewer query rows in a fold: the few-row kernels or sgemm

// Folds of at most kFewRows query rows (a decode step, a few queries against a long cache) run
// with the query rows in vector lanes: scores are kept key-major, ST[key][lane], so keys and
// values are read in place (no packing, whose cost is per key and would exceed the products at
// so few rows), the row max, exp and sum run down the lanes, and P V reuses the 6-row blocks.
constexpr i64 kFewRows = 16;
constexpr i64 kFewLanes = 24;  // floats per key in ST: 16 rows, then zeros for the last 6-row block
constexpr i64 kFewKeys = 120;  // keys per ST sub-tile (multiple of 6), ~11 KiB in L1

#define HPCATTN_KEY(i) __m256 y##i##0 = _mm256_setzero_ps(), y##i##1 = y##i##0;
#define HPCATTN_KFMA(i)                                            \
    {                                                              \
        const __m256 b = _mm256_broadcast_ss(k + i * ks + p);      \
        y##i##0 = _mm256_fmadd_ps(b, a0, y##i##0);                 \
        y##i##1 = _mm256_fmadd_ps(b, a1, y##i##1);                 \
    }
#define HPCATTN_KSTORE(i) _mm256_storeu_ps(st + i * kFewLanes, y##i##0), _mm256_storeu_ps(st + i * kFewLanes + 8, y##i##1);

// ST[6 keys][16 lanes] = K[6 keys][0..d) . QT (QT: d x 16, a row's scaled q in a lane); key rows
// ks floats apart, read in place
inline void few_qk6(const float* k, i64 ks, const float* qt, i64 d, float* st) {
    HPCATTN_KEY(0) HPCATTN_KEY(1) HPCATTN_KEY(2) HPCATTN_KEY(3) HPCATTN_KEY(4) HPCATTN_KEY(5)
    for (i64 p = 0; p < d; ++p) {
        const __m256 a0 = _mm256_load_ps(qt + p * 16), a1 = _mm256_load_ps(qt + p * 16 + 8);
        HPCATTN_KFMA(0) HPCATTN_KFMA(1) HPCATTN_KFMA(2) HPCATTN_KFMA(3) HPCATTN_KFMA(4) HPCATTN_KFMA(5)
    }
    HPCATTN_KSTORE(0) HPCATTN_KSTORE(1) HPCATTN_KSTORE(2) HPCATTN_KSTORE(3) HPCATTN_KSTORE(4) HPCATTN_KSTORE(5)
}

// one key: ST[0][16 lanes]
inline void few_qk1(const float* k, i64 ks, const float* qt, i64 d, float* st) {
    HPCATTN_KEY(0)
    for (i64 p = 0; p < d; ++p) {
        const __m256 a0 = _mm256_load_ps(qt + p * 16), a1 = _mm256_load_ps(qt + p * 16 + 8);
        HPCATTN_KFMA(0)
    }
    HPCATTN_KSTORE(0)
}
#undef HPCATTN_KEY
#undef HPCATTN_KFMA
#undef HPCATTN_KSTORE

// ACC[6 rows][16 cols] += PT[0..n)[6 lanes]^T . V[0..n)[16 cols] (PT rows kFewLanes floats, V
// rows vs floats apart and read in place, ACC rows da); Masked: only the columns of cmask0/1
// (the head dim's last, partial 16 columns: nothing past a row of V is read)
template <bool Masked>
inline void few_pv6(const float* pt, i64 n, const float* v, i64 vs, float* acc, i64 da,
                    __m256i cmask0, __m256i cmask1) {
#define HPCATTN_LOAD(i) __m256 x##i##0 = _mm256_loadu_ps(acc + i * da), x##i##1 = _mm256_loadu_ps(acc + i * da + 8);
    HPCATTN_LOAD(0) HPCATTN_LOAD(1) HPCATTN_LOAD(2) HPCATTN_LOAD(3) HPCATTN_LOAD(4) HPCATTN_LOAD(5)
#undef HPCATTN_LOAD
    for (i64 j = 0; j < n; ++j) {
        const float* vr = v + j * vs;
        const __m256 b0 = Masked ? _mm256_maskload_ps(vr, cmask0) : _mm256_loadu_ps(vr);
        const __m256 b1 = Masked ? _mm256_maskload_ps(vr + 8, cmask1) : _mm256_loadu_ps(vr + 8);
        const float* pj = pt + j * kFewLanes;
        HPCATTN_FMA(0, pj) HPCATTN_FMA(1, pj + 1) HPCATTN_FMA(2, pj + 2) HPCATTN_FMA(3, pj + 3)
        HPCATTN_FMA(4, pj + 4) HPCATTN_FMA(5, pj + 5)
    }
#define HPCATTN_STORE(i) _mm256_storeu_ps(acc + i * da, x##i##0), _mm256_storeu_ps(acc + i * da + 8, x##i##1);
    HPCATTN_STORE(0) HPCATTN_STORE(1) HPCATTN_STORE(2) HPCATTN_STORE(3) HPCATTN_STORE(4) HPCATTN_STORE(5)
#undef HPCATTN_STORE
}

#if defined(__AVX512F__)
// few_qk6 with a key's 16 lanes in one zmm (the same FMA chain per lane)
inline void few_qk6z(const float* k, i64 ks, const float* qt, i64 d, float* st) {
    __m512 z0 = _mm512_setzero_ps(), z1 = z0, z2 = z0, z3 = z0, z4 = z0, z5 = z0;
    for (i64 p = 0; p < d; ++p) {
        const __m512 a = _mm512_load_ps(qt + p * 16);
        z0 = _mm512_fmadd_ps(_mm512_set1_ps(k[p]), a, z0);
        z1 = _mm512_fmadd_ps(_mm512_set1_ps(k[ks + p]), a, z1);
        z2 = _mm512_fmadd_ps(_mm512_set1_ps(k[2 * ks + p]), a, z2);
        z3 = _mm512_fmadd_ps(_mm512_set1_ps(k[3 * ks + p]), a, z3);
        z4 = _mm512_fmadd_ps(_mm512_set1_ps(k[4 * ks + p]), a, z4);
        z5 = _mm512_fmadd_ps(_mm512_set1_ps(k[5 * ks + p]), a, z5);
    }
    _mm512_storeu_ps(st, z0), _mm512_storeu_ps(st + kFewLanes, z1), _mm512_storeu_ps(st + 2 * kFewLanes, z2);
    _mm512_storeu_ps(st + 3 * kFewLanes, z3), _mm512_storeu_ps(st + 4 * kFewLanes, z4);
    _mm512_storeu_ps(st + 5 * kFewLanes, z5);
}

#endif

// OUT rows o[0..6) (NULL: not stored), columns [cp, cp + 16) = P[6 rows][0..n) . Vp[0..n)[16
// cols] from zero, no accumulator; width < 16: only the first width columns are stored
inline void micro_pv_out(const float* p, i64 ld, i64 n, const float* vcol, i64 d16,
                         float* const* o, i64 cp, i64 width, bool stream) {
    HPCATTN_ROW(0) HPCATTN_ROW(1) HPCATTN_ROW(2) HPCATTN_ROW(3) HPCATTN_ROW(4) HPCATTN_ROW(5)
    for (i64 j = 0; j < n; ++j) {
        const __m256 b0 = _mm256_load_ps(vcol + j * d16), b1 = _mm256_load_ps(vcol + j * d16 + 8);
        HPCATTN_FMA(0, p + j) HPCATTN_FMA(1, p + ld + j) HPCATTN_FMA(2, p + 2 * ld + j)
        HPCATTN_FMA(3, p + 3 * ld + j) HPCATTN_FMA(4, p + 4 * ld + j) HPCATTN_FMA(5, p + 5 * ld + j)
    }
    if (width >= kNR && stream) {
#define HPCATTN_STORE(i) if (o[i]) _mm256_stream_ps(o[i] + cp, x##i##0), _mm256_stream_ps(o[i] + cp + 8, x##i##1);
        HPCATTN_STORE(0) HPCATTN_STORE(1) HPCATTN_STORE(2) HPCATTN_STORE(3) HPCATTN_STORE(4) HPCATTN_STORE(5)
#undef HPCATTN_STORE
        return;
    }
    if (width >= kNR) {
#define HPCATTN_STORE(i) if (o[i]) _mm256_storeu_ps(o[i] + cp, x##i##0), _mm256_storeu_ps(o[i] + cp + 8, x##i##1);
        HPCATTN_STORE(0) HPCATTN_STORE(1) HPCATTN_STORE(2) HPCATTN_STORE(3) HPCATTN_STORE(4) HPCATTN_STORE(5)
#undef HPCATTN_STORE
        return;
    }
    alignas(32) float row[kNR];
#define HPCATTN_STORE(i)                                                            \
    if (o[i]) {                                                                      \
        _mm256_store_ps(row, x##i##0), _mm256_store_ps(row + 8, x##i##1);           \
        std::memcpy(o[i] + cp, row, size_t(width) * sizeof(float));                  \
    }
    HPCATTN_STORE(0) HPCATTN_STORE(1) HPCATTN_STORE(2) HPCATTN_STORE(3) HPCATTN_STORE(4) HPCATTN_STORE(5)
#undef HPCATTN_STORE
}
#if defined(__AVX512F__)
// r[i] = row i of a 16 x 16 block; afterwards r[j] = its column j (lane i = the old r[i][j])
inline void transpose16(__m512* r) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0xdd);
        t[8 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0xdd);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
        r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xdd);
    }
}

// softmax6_16 for sixteen rows at once, rows in lanes: s holds 16 score rows of 16 floats (keys
// past nkt ignored); pt gets P transposed (pt[16 j + i] = P[i][j], 0 past nkt), lse16 the rows'
// lse. The same operations lane by lane as softmax6_16 (its max, its sum's order of additions,
// 1 / l, log l): the same numbers, with no reduction across lanes.
inline void softmax16_16(const float* s, i64 nkt, float* pt, float* lse16) {
    const __m512 ninf = _mm512_set1_ps(kNegInf);
    __m512 e[16];
    for (int i = 0; i < 16; ++i) e[i] = _mm512_loadu_ps(s + 16 * i);
    transpose16(e);
    for (int j = int(nkt); j < 16; ++j) e[j] = ninf;
    __m512 mx = e[0];
    for (int j = 1; j < 16; ++j) mx = _mm512_max_ps(mx, e[j]);
    for (int j = 0; j < 16; ++j) e[j] = exp_nonpos16(_mm512_sub_ps(e[j], mx));
    // softmax6_16's sum of a row: f_k = e_k + e_(k+8) (its fold of the halves), then
    // ((f0 + f2) + (f1 + f3)) + ((f4 + f6) + (f5 + f7)) (its three levels of shuffles)
    __m512 f[8];
    for (int k = 0; k < 8; ++k) f[k] = _mm512_add_ps(e[k], e[k + 8]);
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(f[0], f[2]), _mm512_add_ps(f[1], f[3])),
                                     _mm512_add_ps(_mm512_add_ps(f[4], f[6]), _mm512_add_ps(f[5], f[7])));
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), sum);
    const __m256 lo = _mm256_add_ps(_mm512_castps512_ps256(mx), log_ge1_8(_mm512_castps512_ps256(sum)));
    const __m256 hi = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(mx), 1)),
                                    log_ge1_8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1))));
    _mm256_storeu_ps(lse16, lo);
    _mm256_storeu_ps(lse16 + 8, hi);
    for (int j = 0; j < 16; ++j) _mm512_store_ps(pt + 16 * j, _mm512_mul_ps(e[j], inv));
}

// OUT rows o[0..8), columns [cp, cp + 32) = P[8 rows][0..n) . Vp[0..n)[32 cols] from zero, P
// transposed (pt[16 j + i]); the same FMAs in the same order as micro_pv_out4. stream: every
// o[i] + cp is 64-byte aligned, and the stores bypass the cache
inline void micro_pv_out8t(const float* pt, i64 n, const float* vcol, i64 d16, float* const* o, i64 cp,
                           bool stream) {
    __m512 z[8][2];
    for (int i = 0; i < 8; ++i) z[i][0] = z[i][1] = _mm512_setzero_ps();
    for (i64 j = 0; j < n; ++j) {
        const __m512 b0 = _mm512_loadu_ps(vcol + j * d16), b1 = _mm512_loadu_ps(vcol + j * d16 + 16);
        for (int i = 0; i < 8; ++i) {
            const __m512 a = _mm512_set1_ps(pt[16 * j + i]);
            z[i][0] = _mm512_fmadd_ps(a, b0, z[i][0]);
            z[i][1] = _mm512_fmadd_ps(a, b1, z[i][1]);
        }
    }
    if (stream)
        for (int i = 0; i < 8; ++i) _mm512_stream_ps(o[i] + cp, z[i][0]), _mm512_stream_ps(o[i] + cp + 16, z[i][1]);
    else
        for (int i = 0; i < 8; ++i) _mm512_storeu_ps(o[i] + cp, z[i][0]), _mm512_storeu_ps(o[i] + cp + 16, z[i][1]);
}
#endif
#if defined(__AVX512F__)
#undef HPCATTN_ZSIX
#undef HPCATTN_ZFMA4
#undef HPCATTN_ZFMA2
#undef HPCATTN_ZROW4
#undef HPCATTN_ZROW2
#endif
#undef HPCATTN_ROW
#undef HPCATTN_FMA

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
    i64 s_floats;  // floats of the score tile s
};

#ifdef HPCATTN_MICRO
// whether query position n sees key j (hpcattn.masks.Mask)
inline bool visible(const hpcattn_cpu_call& c, i64 n, i64 j) {
    const i64 diag = kpos(c, j) - qpos(c, n) - c.shift;
    if (c.has_lo && diag < c.lo) return false;
    if (c.has_hi && diag > c.hi) return false;
    return !c.q_seg || c.k_seg[j] == c.q_seg[n];
}

// qt's rows (rows <= kFewRows, d floats each) transposed into qtt (d x kFewRows, zero past rows)
inline void transpose_few(const float* qt, i64 rows, i64 d, float* qtt) {
    for (i64 r = 0; r < kFewRows; ++r)
        for (i64 p = 0; p < d; ++p) qtt[p * kFewRows + r] = r < rows ? qt[r * d + p] : 0.0f;
}

// keys per ST sub-tile of fold_few in w.s (callers give room for at least one)
inline i64 few_subtile_keys(const Work& w) {
    return std::max<i64>(1, std::min(kFewKeys, w.s_floats / kFewLanes));
}

// ST's lanes past 16 of kc keys: zero weights for the last 6-row block (nothing writes them)
inline void clear_few_lanes(float* st, i64 kc) {
    for (i64 j = 0; j < kc; ++j) std::fill(st + j * kFewLanes + kFewRows, st + (j + 1) * kFewLanes, 0.0f);
}

// fold() for at most kFewRows query rows: the rows in lanes (see kFewRows). qt's rows are
// transposed into w.kp (d x 16), scores go key-major into w.s in sub-tiles of kFewKeys keys.
// qtt_ready: qt already transposed (and w.s's padding lanes zero), as run_heads keeps them for
// all of a query tile's folds. next_k/next_v (n_next rows, or NULL): the key and value rows this
// head folds next, fetched into L2 while this fold computes (run_heads, where fetch_next_tile()).
// r_off: the rows are rows [r_off, r_off + rows) of the tile at position t0 (run_heads' groups).
void fold_few(const hpcattn_cpu_call& c, const Work& w, i64 t0, i64 rows, i64 j0, i64 j1,
              bool masked, const float* qt, float* acc, float* m, double* l,
              const float* qtt_ready = nullptr, const float* next_k = nullptr,
              const float* next_v = nullptr, i64 n_next = 0, i64 r_off = 0) {
    const i64 d = c.d, g = c.g, da = w.da, ks = c.k_stride, vs = c.v_stride;
    float* const st = w.s;
    const i64 kc = few_subtile_keys(w);
    const float* qtt = qtt_ready;
    if (!qtt) {
        transpose_few(qt, rows, d, w.kp);
        qtt = w.kp;
        clear_few_lanes(st, kc);
    }
    alignas(64) float mrow[kFewRows], mnew[kFewRows], sum[kFewRows];
    alignas(32) int32_t tailm[kFewRows];
    const i64 tail = d % 16, dfull = d - tail;
    for (i64 r = 0; r < kFewRows; ++r) {
        mrow[r] = r < rows ? m[r] : kNegInf;
        tailm[r] = r < tail ? -1 : 0;
    }
    const __m256i cm0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(tailm));
    const __m256i cm1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(tailm + 8));
#if !defined(__AVX512F__)
    alignas(32) int32_t lane[kFewRows];  // the rows' lanes (AVX-512 takes a __mmask16)
    for (i64 r = 0; r < kFewRows; ++r) lane[r] = r < rows ? -1 : 0;
    const __m256 valid0 = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(lane)));
    const __m256 valid1 = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(lane + 8)));
    const __m256 ninf = _mm256_set1_ps(kNegInf);
#endif
    for (i64 a = j0; a < j1; a += kc) {
        const i64 n = std::min(kc, j1 - a);
        const float* kr = c.k + a * ks;
        const float* vr = c.v + a * vs;
        i64 j = 0;
        for (; j + 6 <= n; j += 6) {
            // key rows are a whole position apart (the other heads between them), too far for
            // the hardware prefetcher: the keys two blocks ahead and this block's values
            for (i64 i = 0; i < 6; ++i)
                for (i64 x = 0; x < d; x += 16) {
                    if (a + j + 12 + i < j1) __builtin_prefetch(kr + (j + 12 + i) * ks + x, 0, 3);
                    __builtin_prefetch(vr + (j + i) * vs + x, 0, 3);
                }
            for (i64 r = a - j0 + j; r < std::min(n_next, a - j0 + j + 6); ++r)
                for (i64 x = 0; x < d; x += 16) {
                    __builtin_prefetch(next_k + r * ks + x, 0, 2);
                    __builtin_prefetch(next_v + r * vs + x, 0, 2);
                }
#if defined(__AVX512F__)
            few_qk6z(kr + j * ks, ks, qtt, d, st + j * kFewLanes);
#else
            few_qk6(kr + j * ks, ks, qtt, d, st + j * kFewLanes);
#endif
        }
        for (; j < n; ++j) few_qk1(kr + j * ks, ks, qtt, d, st + j * kFewLanes);
        if (a + n == j1)  // the next rows this fold's blocks did not reach
            for (i64 r = a - j0 + j; r < n_next; ++r)
                for (i64 x = 0; x < d; x += 16) {
                    __builtin_prefetch(next_k + r * ks + x, 0, 2);
                    __builtin_prefetch(next_v + r * vs + x, 0, 2);
                }
        if (masked)
            for (i64 r = 0; r < rows; ++r)
                for (i64 jj = 0; jj < n; ++jj)
                    if (!visible(c, t0 + (r_off + r) / g, a + jj)) st[jj * kFewLanes + r] = kNegInf;
        // the online softmax down the lanes: max, exp(s - max) and sums, rescales
#if defined(__AVX512F__)
        {  // the sixteen lanes in one zmm (the same operations lane by lane)
            __m512 mx = _mm512_load_ps(mrow);
            for (i64 jj = 0; jj < n; ++jj) mx = _mm512_max_ps(mx, _mm512_loadu_ps(st + jj * kFewLanes));
            _mm512_store_ps(mnew, mx);
            const __m512 ms = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(mx, _mm512_set1_ps(kNegInf), _CMP_NEQ_UQ), mx);
            const __mmask16 valid = __mmask16((1u << rows) - 1u);
            __m512 sz = _mm512_setzero_ps();
            for (i64 jj = 0; jj < n; ++jj) {
                float* sj = st + jj * kFewLanes;
                const __m512 pz = _mm512_maskz_mov_ps(valid, exp_nonpos16(_mm512_sub_ps(_mm512_loadu_ps(sj), ms)));
                _mm512_storeu_ps(sj, pz);
                sz = _mm512_add_ps(sz, pz);
            }
            _mm512_store_ps(sum, sz);
        }
#else
        __m256 mx0 = _mm256_load_ps(mrow), mx1 = _mm256_load_ps(mrow + 8);
        for (i64 jj = 0; jj < n; ++jj) {
            mx0 = _mm256_max_ps(mx0, _mm256_loadu_ps(st + jj * kFewLanes));
            mx1 = _mm256_max_ps(mx1, _mm256_loadu_ps(st + jj * kFewLanes + 8));
        }
        _mm256_store_ps(mnew, mx0);
        _mm256_store_ps(mnew + 8, mx1);
        // a row that sees nothing yet subtracts 0 (its scores are -inf: weights 0)
        const __m256 ms0 = _mm256_andnot_ps(_mm256_cmp_ps(mx0, ninf, _CMP_EQ_OQ), mx0);
        const __m256 ms1 = _mm256_andnot_ps(_mm256_cmp_ps(mx1, ninf, _CMP_EQ_OQ), mx1);
        __m256 s0 = _mm256_setzero_ps(), s1 = s0;
        for (i64 jj = 0; jj < n; ++jj) {
            float* sj = st + jj * kFewLanes;
            const __m256 p0 = _mm256_and_ps(exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(sj), ms0)), valid0);
            const __m256 p1 = _mm256_and_ps(exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(sj + 8), ms1)), valid1);
            _mm256_storeu_ps(sj, p0);
            _mm256_storeu_ps(sj + 8, p1);
            s0 = _mm256_add_ps(s0, p0);
            s1 = _mm256_add_ps(s1, p1);
        }
        _mm256_store_ps(sum, s0);
        _mm256_store_ps(sum + 8, s1);
#endif
        for (i64 r = 0; r < rows; ++r) {
            if (mnew[r] == kNegInf) continue;  // nothing visible yet: adds nothing
            if (mnew[r] != mrow[r]) {
                if (mrow[r] != kNegInf) {  // (a row that saw nothing yet has zero acc and sum)
                    const float alpha = std::exp(mrow[r] - mnew[r]);
                    float* ar = acc + r * da;
#pragma omp simd
                    for (i64 x = 0; x < d; ++x) ar[x] *= alpha;
                    l[r] *= alpha;
                }
                mrow[r] = mnew[r];
            }
            l[r] += sum[r];
        }
        for (i64 r0 = 0; r0 < rows; r0 += kMR) {
            i64 cp = 0;
#if defined(__AVX512F__)
            for (; cp + 64 <= dfull; cp += 64)
                micro_pv4<kFewLanes>(st + r0, 1, n, vr + cp, vs, acc + r0 * da + cp, da);
#endif
            for (; cp < dfull; cp += kNR)
                few_pv6<false>(st + r0, n, vr + cp, vs, acc + r0 * da + cp, da, cm0, cm1);
            if (tail) few_pv6<true>(st + r0, n, vr + dfull, vs, acc + r0 * da + dfull, da, cm0, cm1);
        }
    }
    for (i64 r = 0; r < rows; ++r) m[r] = mrow[r];
}
#endif

// Fold keys [j0, j1) into the state of query positions [t0, t1) (their scaled rows qt, their
// accumulator acc, running max m and sum l): S = qt K^T, the mask when masked, per row the max,
// exp(s - max) and its sum (rescaling the row's accumulator when its max grew), then acc += P V.
void fold(const hpcattn_cpu_call& c, const Work& w, i64 t0, i64 t1, i64 j0, i64 j1, bool masked,
          const float* qt, float* acc, float* m, double* l) {
    const i64 d = c.d, g = c.g, rows = (t1 - t0) * g, nkt = j1 - j0, da = w.da;
#ifdef HPCATTN_MICRO
    if (rows <= kFewRows && w.s_floats >= 6 * kFewLanes) {
        fold_few(c, w, t0, rows, j0, j1, masked, qt, acc, m, l);
        return;
    }
#endif
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
            micro_qk_panels(qt + r0 * d, d, kp, panels, s, ld);
            for (i64 i = 0; i < nr; ++i) {
                const i64 r = r0 + i;
                if (masked) mask_row(c, s + i * ld, t0 + r / g, j0, j1, runs);
                softmax_row(s + i * ld, nkt, m[r], l[r], acc + r * da, d);
            }
            // rows past the block add 0 to the rows after it (they belong to the next block)
            std::memset(s + nr * ld, 0, size_t((kMR - nr) * ld) * sizeof(float));
            micro_pv_cols(s, ld, nkt, vp, da, acc + r0 * da);
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

#ifdef HPCATTN_MICRO
// Whether the decode-like paths fetch their next tile into L2 while they compute this one (the
// next key tile in run_heads, the next query tile in run_direct_heads). Measured side by side
// (H=8, d=64; docs/performance-notes.md): on a Zen 4 EPYC 16 x 100,000 ran 1.35-1.46x faster
// and 100,000 x 16 1.12-1.16x; on a Xeon with AVX512_FP16 and AMX both ran slower (13% and
// 9%), so on AMD CPUs only. No effect on the numbers.
bool fetch_next_tile() {
    static const bool yes = __builtin_cpu_is("amd");
    return yes;
}

// The forward of query positions [t0, t1) when every key is in one tile, packed, and visible to
// every row (a decode-like shape: many queries against a few keys): per six rows S = qt K^T,
// each row's softmax normalised in place (P / l), lse = m + log l, and out = P V stored straight
// into out. No accumulator is zeroed, rescaled or divided afterwards: at 16 keys those passes
// cost more than the products (docs/performance-notes.md). At most 16 keys: the six rows' max,
// sum, 1 / l and log l as vectors across the rows (softmax6_16; 56.4 against 61.7 ms per
// call with one row at a time, 100,000 x 16, H=8, d=64). pf: pf_bytes to fetch into L2 while
// this tile computes (run_direct_heads: the head's share of the next tile's q), spread over the
// six-row blocks. lq: 0 when qt is the scaled copy (rows d apart, padded to whole blocks), else
// the stride of q's rows read in place (one row per position, the scale in the packed keys; the
// last partial block copied to a padded buffer), rows kQAhead ahead fetched into L1.
constexpr i64 kQAhead = 48;  // 100,000 x 16 on Zen 4: 66.2 GFLOP/s against 64.5 with none, 66.0 at 96
void direct_tile(const hpcattn_cpu_call& c, const Work& w, i64 t0, i64 t1, const float* qt,
                 bool stream = false, const char* pf = nullptr, i64 pf_bytes = 0, i64 lq = 0) {
    const i64 d = c.d, g = c.g, rows = (t1 - t0) * g, nkt = c.nk, da = w.da;
    const bool in_place = lq != 0;
    if (!in_place) lq = d;
    const i64 panels = (nkt + kNR - 1) / kNR, ld = panels * kNR;
    float* const s = w.s;
#if defined(__AVX512F__)
    // out's columns 64 at a time in zmm registers (streamed: where every row's start is 64-byte
    // aligned, as zmm streaming stores need)
    const i64 d64 = !stream || (reinterpret_cast<uintptr_t>(c.out) % 64 == 0 && c.o_stride % 16 == 0)
                        ? d / 64 * 64 : 0;
#endif
    auto store_out = [&](const float* sb, float* const* o) {
        i64 cp = 0;
#if defined(__AVX512F__)
        for (; cp < d64; cp += 64) micro_pv_out4(sb, ld, nkt, w.vp_all + cp, da, o, cp, stream);
#endif
        for (; cp < d; cp += kNR) micro_pv_out(sb, ld, nkt, w.vp_all + cp, da, o, cp, d - cp, stream);
    };
    const char* const pf_end = pf + pf_bytes;
#if defined(__AVX512F__)
    // one panel and whole 32-column pieces of out: sixteen rows at a time, rows in lanes
    // (softmax16_16, no reductions across lanes; the same numbers), then what is left six rows
    // at a time. 100,000 x 16, H=8, d=64 on Zen 4, two copies of each build alternating: 67.1,
    // 66.6, 71.7, 71.9 GFLOP/s against 64.3, 66.0, 69.1, 66.9; without the fetch ahead (the
    // Xeon's path) 54.4, 57.3, 58.4, 60.0 against 52.4, 52.7, 53.2, 52.7; d=128 (50,000 x 16)
    // 74.4, 73.1 against 58.5, 62.3
    const i64 rb = panels == 1 && d % 32 == 0 && (!stream || d64 == d) ? rows / 16 * 16 : 0;
#else
    const i64 rb = 0;
#endif
    const i64 n_blocks = std::max<i64>(1, rb / 16 + (rows - rb + kMR - 1) / kMR);
    const i64 pf_step = pf_bytes ? (pf_bytes / n_blocks + 63) / 64 * 64 : 0;
#if defined(__AVX512F__)
    for (i64 r0 = 0; r0 < rb; r0 += 16) {
        for (const char* e = std::min(pf + pf_step, pf_end); pf < e; pf += 64) __builtin_prefetch(pf, 0, 2);
        if (in_place)
            for (i64 r = r0 + kQAhead; r < std::min(rows, r0 + kQAhead + 16); ++r)
                for (i64 x = 0; x < d; x += 16) __builtin_prefetch(qt + r * lq + x, 0, 3);
        alignas(64) float sc[256], pt[256], lse16[16];
        micro_qk1zr<8>(qt + r0 * lq, d, w.kp_all, sc, 16, lq);
        micro_qk1zr<8>(qt + (r0 + 8) * lq, d, w.kp_all, sc + 128, 16, lq);
        softmax16_16(sc, nkt, pt, lse16);
        float* o[16];
        for (i64 i = 0; i < 16; ++i) {
            const i64 r = r0 + i, n = t0 + r / g, gi = r % g;
            c.lse[gi * c.lse_head_stride + n] = lse16[i];
            o[i] = c.out + n * c.o_stride + gi * d;
        }
        for (i64 cp = 0; cp < d; cp += 32) {
            micro_pv_out8t(pt, nkt, w.vp_all + cp, da, o, cp, stream);
            micro_pv_out8t(pt + 8, nkt, w.vp_all + cp, da, o + 8, cp, stream);
        }
    }
#endif
    for (i64 r0 = rb; r0 < rows; r0 += kMR) {
        const i64 nr = std::min(kMR, rows - r0), rr = r0 - rb;
        float* sb = s;
        for (const char* e = std::min(pf + pf_step, pf_end); pf < e; pf += 64) __builtin_prefetch(pf, 0, 2);
#if defined(__AVX512F__)
        if (in_place && rr % 12 == 0)
            for (i64 r = r0 + kQAhead; r < std::min(rows, r0 + kQAhead + 12); ++r)
                for (i64 x = 0; x < d; x += 16) __builtin_prefetch(qt + r * lq + x, 0, 3);
        // one panel: twelve rows' scores at once where two whole blocks remain (the first block
        // computes both; the second reads its rows 6..11)
        const bool paired = panels == 1 && (rr % 12 == 0 ? r0 + 12 <= rows : r0 + 6 <= rows);
        if (paired && rr % 12 == 0) micro_qk1z12(qt + r0 * lq, d, w.kp_all, s, ld, lq);
        if (paired && rr % 12 == 6) sb = s + kMR * ld;
        if (!paired && in_place) {
            alignas(64) float pad[kMR * 256];
            const float* qb = qt + r0 * lq;
            if (nr < kMR) {
                std::fill(pad, pad + kMR * d, 0.0f);
                for (i64 i = 0; i < nr; ++i) std::copy(qb + i * lq, qb + i * lq + d, pad + i * d);
                micro_qk1z(pad, d, w.kp_all, s, ld, d);
            } else {
                micro_qk1z(qb, d, w.kp_all, s, ld, lq);
            }
        } else if (!paired)
#endif
            micro_qk_panels(qt + r0 * d, d, w.kp_all, panels, s, ld);
        float* o[kMR] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
        if (panels == 1) {  // at most 16 keys: the six rows' statistics as vectors
            alignas(32) float lse6[8];
            softmax6_16(sb, nkt, lse6);
            for (i64 i = 0; i < nr; ++i) {
                const i64 r = r0 + i, n = t0 + r / g, gi = r % g;
                c.lse[gi * c.lse_head_stride + n] = lse6[i];
                o[i] = c.out + n * c.o_stride + gi * d;
            }
            store_out(sb, o);
            continue;
        }
        for (i64 i = 0; i < nr; ++i) {
            const i64 r = r0 + i, n = t0 + r / g, gi = r % g;
            float* sr = s + i * ld;
            const float mx = row_max(sr, nkt);
            const float sum = exp_row(sr, nkt, mx), inv = 1.0f / sum;
            const __m256 iv = _mm256_set1_ps(inv);
            i64 j = 0;
            for (; j + 8 <= nkt; j += 8) _mm256_storeu_ps(sr + j, _mm256_mul_ps(_mm256_loadu_ps(sr + j), iv));
            for (; j < nkt; ++j) sr[j] *= inv;
            c.lse[gi * c.lse_head_stride + n] = mx + std::log(sum);
            o[i] = c.out + n * c.o_stride + gi * d;
        }
        store_out(s, o);
    }
}
#endif

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

// The call's scratch of total floats, 64-byte aligned: the caller's, or allocated here into *own
// (freed by the caller); NULL with *rc = 2 when the caller's is too small, 1 when allocation fails
float* scratch_of(const hpcattn_cpu_call& c, i64 total, void** own, int* rc) {
    float* base = c.scratch;
    if (base && c.scratch_floats < total) {
        *rc = 2;
        return nullptr;
    }
    if (!base) {
        if (posix_memalign(own, 64, size_t(total) * sizeof(float))) {
            *rc = 1;
            return nullptr;
        }
        base = static_cast<float*>(*own);
    }
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(base) + 63) & ~uintptr_t(63));
}

// The scaled Q tile of query positions [t0, t1): the scale folded in (as the NumPy kernel does),
// measured more accurate than the GEMM's alpha (FlashAttention's rule: 1.31x vs 1.72x a float32
// reference)
void scale_rows(const hpcattn_cpu_call& c, i64 t0, i64 t1, float* qt) {
    const i64 gd = c.g * c.d;
    for (i64 n = t0; n < t1; ++n) {
        const float* src = c.q + n * c.q_stride;
        float* dst = qt + (n - t0) * gd;
        // the row 16 ahead: q rows are q_stride apart (other heads between them), too far
        // apart for the hardware prefetcher, and at decode-like shapes this read is the cost
        if (n + 16 < c.nq)
            for (i64 x = 0; x < gd; x += 16) __builtin_prefetch(src + 16 * c.q_stride + x, 0, 0);
        for (i64 x = 0; x < gd; ++x) dst[x] = src[x] * c.scale;
    }
}

// out and lse of query position n's group member gi from its accumulator row ar, max m, sum l
inline void finalize_row(const hpcattn_cpu_call& c, i64 n, i64 gi, const float* ar, float m, double l) {
    const i64 d = c.d;
    float* o = c.out + n * c.o_stride + gi * d;
    if (l > 0) {
        const float lr = float(l);
        for (i64 x = 0; x < d; ++x) o[x] = ar[x] / lr;
        c.lse[gi * c.lse_head_stride + n] = float(double(m) + std::log(l));
    } else {
        std::memset(o, 0, size_t(d) * sizeof(float));
        c.lse[gi * c.lse_head_stride + n] = kNegInf;
    }
}

// out and lse of query positions [t0, t1) from their state; (position n, group member gi) as two
// loops: a 64-bit division per row costs more than the row's output at decode-like shapes
void finalize(const hpcattn_cpu_call& c, i64 t0, i64 t1, const float* acc, i64 da, const float* m,
              const double* l) {
    const i64 g = c.g;
    for (i64 n = t0, r = 0; n < t1; ++n) {
        for (i64 gi = 0; gi < g; ++gi, ++r) finalize_row(c, n, gi, acc + r * da, m[r], l[r]);
    }
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
    int rc = 0;
    float* base = scratch_of(c, p.total, &own, &rc);
    if (!base) return rc;
    auto take = [&base](i64 floats) {
        float* at = floats ? base : nullptr;
        base += floats;
        return at;
    };
    Work w{take(p.qt), take(p.s), take(p.kp), take(p.vp), da, nullptr, nullptr, p.s};
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
        scale_rows(c, t0, t1, w.qt);
#ifdef HPCATTN_MICRO
        if (!folding && n_ktiles == 1 && w.kp_all && rows >= kMicroMinRows &&
            classify(c, range_of(c.q_pos, c.q_seg, t0, t1), kr[0]) == kFull) {
            direct_tile(c, w, t0, t1, w.qt);
            continue;
        }
#endif
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
        if (!folding) finalize(c, t0, t1, acc, da, m, l);
    }
    std::free(own);
    return 0;
}

// kv head h of c as a one-head call
hpcattn_cpu_call head_of(const hpcattn_cpu_call& c, i64 h) {
    hpcattn_cpu_call ch = c;
    ch.q += h * c.q_hs;
    ch.k += h * c.k_hs;
    ch.v += h * c.v_hs;
    ch.out += h * c.o_hs;
    ch.lse += h * c.lse_hs;
    ch.nh = 1;
    return ch;
}

#ifdef HPCATTN_MICRO
// run_direct_heads: a forward of c.nh kv heads, no mask, every key in one tile that is packed
// once per head (a decode-like shape: many queries against a few keys): per query tile, head
// after head, direct_tile. A query tile of every head is one stretch of q and out, read and
// written in order; one head's rows alone are pieces of positions several KiB apart, which the
// hardware prefetcher does not follow (measured: docs/performance-notes.md).
bool direct_heads(const hpcattn_cpu_call& c) {
    if (c.nh <= 1 || c.has_lo || c.has_hi || c.q_seg || c.nk < 1 || c.nk > std::max<i64>(1, c.block_k))
        return false;
    const Plan p = plan_of(c, false);
    return p.packed > 0 && std::min(std::max<i64>(1, c.block_q), c.nq) * c.g >= kMicroMinRows;
}

// query positions per tile of run_direct_heads: every head's scaled rows in 1 MiB (at 100,000 x
// 16, H=8, d=64, side by side: 41.4 GFLOP/s against 39.1 for 256 KiB; 64 KiB lost 7%)
i64 direct_heads_tile(const hpcattn_cpu_call& c) {
    const i64 per_pos = c.nh * c.g * c.d * i64(sizeof(float));
    return std::clamp<i64>((1024 << 10) / per_pos, 1, std::max<i64>(1, c.block_q));
}

struct DirectPlan {
    i64 qt_head, qt, s, packed, total;
};

DirectPlan direct_plan(const hpcattn_cpu_call& c) {
    const Plan p = plan_of(c, false);
    DirectPlan dp{};
    dp.qt_head = round16((direct_heads_tile(c) * c.g + 8) * c.d);
    dp.qt = c.nh * dp.qt_head;
    dp.s = p.s;
    dp.packed = p.packed;
    dp.total = dp.qt + dp.s + c.nh * dp.packed + 16;
    return dp;
}

int run_direct_heads(const hpcattn_cpu_call& c) {
    const Plan p = plan_of(c, false);
    const DirectPlan dp = direct_plan(c);
    const i64 nh = c.nh, g = c.g, d = c.d, tq = direct_heads_tile(c), da = p.da;
    void* own = nullptr;
    int rc = 0;
    float* base = scratch_of(c, dp.total, &own, &rc);
    if (!base) return rc;
    float* const qts = base;
    float* const packed = base + dp.qt + dp.s;
    Work w{nullptr, base + dp.qt, nullptr, nullptr, da, nullptr, nullptr, dp.s};
    for (i64 h = 0; h < nh; ++h) {
        const hpcattn_cpu_call ch = head_of(c, h);
        pack_k(ch, 0, c.nk, packed + h * dp.packed);
        pack_v(ch, 0, c.nk, da, packed + h * dp.packed + p.nk16 * da);
    }
    // where the next tile is fetched ahead (fetch_next_tile), every key is in one panel and each
    // position has one row per head (g = 1): q read in place, the scale folded into the packed
    // keys instead of a scaled copy of q (the products' bits where the scale is a power of two,
    // as at d = 64). 100,000 x 16, H=8, d=64 on Zen 4, two copies of each build alternating:
    // 65.5 and 65.8 GFLOP/s against 60.4 and 62.3 with the copy. Without the fetch ahead (as on
    // the Xeon) reading one head's rows in place measured slower (52.2 against 55.1; a head's
    // rows are pieces of positions several KiB apart), so there the copy stays.
#if defined(__AVX512F__)
    const bool in_place = fetch_next_tile() && g == 1 && p.nk16 == kNR && d <= 256;
#else
    const bool in_place = false;
#endif
    if (in_place)
        for (i64 h = 0; h < nh; ++h)
            for (float *x = packed + h * dp.packed, *e = x + p.nk16 * d; x < e; ++x) *x *= c.scale;
    else
        std::fill(qts, qts + dp.qt, 0.0f);  // padding rows: finite, never stored
    const i64 gd = g * d;
    // out past 4 MiB, rows of whole 32-byte pieces: streaming stores (no read of each line
    // before it is written, no eviction of q and the tiles). The bound was L3's size (32 MiB);
    // on Zen 4, H=8, d=64, 16 keys, each call followed by a sum over its out (the next op's read
    // of it), three builds rotating: 3,072 queries (6 MiB) 53.3 against 46.0/44.0 GFLOP/s, 4,096
    // 49.0 against 40.0/39.1, 16,384 (32 MiB) 49.8 against 36.3/36.5; 2,048 (4 MiB) 49.5 against
    // 48.3/43.5 and 512 51.2 against 48.5/52.6 (no gain: kept below 4 MiB)
    const bool stream = c.nq * c.o_stride * i64(sizeof(float)) > (i64(4) << 20) && d % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(c.out) % 32 == 0 && c.o_stride % 8 == 0;
    for (i64 t0 = 0; t0 < c.nq; t0 += tq) {
        const i64 t1 = std::min(c.nq, t0 + tq);
        // every head's scaled rows, position by position: q in memory order
        for (i64 n = t0; n < t1 && !in_place; ++n) {  // (in place: no copy)
            const float* src = c.q + n * c.q_stride;
            for (i64 h = 0; h < nh; ++h) {
                const float* sh = src + h * c.q_hs;
                float* dst = qts + h * dp.qt_head + (n - t0) * gd;
                for (i64 x = 0; x < gd; ++x) dst[x] = sh[x] * c.scale;
            }
        }
        // where fetch_next_tile() and q's positions are contiguous: each head fetches 1/nh of
        // the next tile's q
        const i64 next = fetch_next_tile() && c.q_stride == nh * gd
                             ? (std::min(c.nq, t1 + tq) - t1) * c.q_stride * i64(sizeof(float)) : 0;
        const i64 share = (next / nh + 63) / 64 * 64;
        for (i64 h = 0; h < nh; ++h) {
            w.kp_all = packed + h * dp.packed;
            w.vp_all = packed + h * dp.packed + p.nk16 * da;
            const hpcattn_cpu_call ch = head_of(c, h);
            direct_tile(ch, w, t0, t1, in_place ? ch.q + t0 * c.q_stride : qts + h * dp.qt_head, stream,
                        reinterpret_cast<const char*>(c.q + t1 * c.q_stride) + h * share,
                        std::clamp<i64>(next - h * share, 0, share), in_place ? c.q_stride : 0);
        }
    }
    if (stream) _mm_sfence();
    std::free(own);
    return 0;
}

// run_heads: a forward of c.nh kv heads whose query tiles have at most kHeadsRows rows (a few
// queries against a long cache), heads innermost. Key rows hold every kv head (k_stride floats
// apart), so one head's keys and values are 256-byte pieces of rows several KiB apart, which the
// hardware prefetcher does not follow; head after head over one key tile reads the tile's rows
// whole (fold_few fetches each block's rows a little ahead). Where fetch_next_tile(), each head
// also fetches its rows of the next tile into L2 while it computes this one. The tile:
// kHeadsTileBytes of keys and values, all heads. A tile's rows are folded in groups of kFewRows
// (fold_few, rows in lanes, keys and values read in place), one after another over the head's
// key tile (the first group reads it from memory, the others from L2): no key is packed. Side by
// side on Zen 4 (H=8, d=64, 50,000 keys) against packing every key once: 24 rows 57.1 against
// 26.5 GFLOP/s, 64 rows 71.6 against 34.2, 128 78.5 against 53.3, 256 79.6 against 67.5, 512
// 77.5 against 79.7 (so at most kHeadsRows); 200 rows against 600 keys 54.8 against 64.5, 1,024
// keys 69.7 against 70.9, 256 rows 2,048 keys 69.6 against 66.8 (so past kHeadsRowsAnyKeys rows
// only against kHeadsMinKeys keys or more); docs/performance-notes.md.
constexpr i64 kHeadsTileBytes = 384 * 1024;
constexpr i64 kHeadsRows = 256;
constexpr i64 kHeadsRowsAnyKeys = 128;
constexpr i64 kHeadsMinKeys = 2048;

i64 heads_of(const hpcattn_cpu_call& c) { return std::max<i64>(1, c.nh); }  // nh 0: one head

bool heads_inner(const hpcattn_cpu_call& c) {
    const i64 bq = std::max<i64>(1, c.block_q);
    const i64 rows = std::min(bq, std::max<i64>(c.nq, 1)) * c.g;
    if (rows <= kFewRows) return c.nh > 1;
    // more rows: counted over the whole call (a call of many small query tiles packs its keys
    // once for all of them instead), and only against keys past one tile (keys in one tile take
    // direct_tile or the packed path, whose bits a call split into row chunks on workers keeps)
    const i64 all = std::max<i64>(c.nq, 1) * c.g;
    return c.nk > std::max<i64>(1, c.block_k) &&
           (all <= kHeadsRowsAnyKeys || (all <= kHeadsRows && c.nk >= kHeadsMinKeys));
}

i64 heads_block_k(const hpcattn_cpu_call& c) {
    const i64 bk = kHeadsTileBytes / (heads_of(c) * c.d * i64(2 * sizeof(float))) / 6 * 6;
    return std::min(std::clamp<i64>(bk, 6, kFewKeys), std::max<i64>(1, c.block_k));
}

struct HeadsPlan {
    i64 groups, qtt, st, kr, qt, acc, acc_group, m, l, qtt_h, per_head, total;
};

HeadsPlan heads_plan(const hpcattn_cpu_call& c) {
    HeadsPlan p{};
    const i64 bq = std::max<i64>(1, c.block_q), rows = std::min(bq, std::max<i64>(c.nq, 1)) * c.g;
    const i64 da = (c.d + kNR - 1) / kNR * kNR, bk = heads_block_k(c);
    const i64 n_ktiles = std::max<i64>(1, (c.nk + bk - 1) / bk);
    p.groups = (rows + kFewRows - 1) / kFewRows;
    p.qtt = round16(c.d * kFewRows);
    p.st = round16(bk * kFewLanes);
    p.kr = round16(n_ktiles * i64(sizeof(Range) / sizeof(float)));
    p.qt = round16((rows + 8) * c.d);
    p.acc_group = round16((kFewRows + 8) * da);  // fold_few's 6-row blocks run past a group's rows
    p.acc = p.groups * p.acc_group;
    p.m = round16(rows);
    p.l = round16(2 * rows);  // doubles
    p.qtt_h = p.groups * round16(c.d * kFewRows);
    p.per_head = p.qt + p.acc + p.m + p.l + p.qtt_h;
    p.total = p.qtt + p.st + p.kr + heads_of(c) * p.per_head + 16;
    return p;
}

// out and lse of rows [r0, r1) of the query tile at position t0 (row r: position t0 + r / g,
// group member r % g) from their state: acc's rows from r0, m and l's from the tile's first row
void finalize_rows(const hpcattn_cpu_call& c, i64 t0, i64 r0, i64 r1, const float* acc, i64 da,
                   const float* m, const double* l) {
    const i64 g = c.g;
    for (i64 r = r0; r < r1; ++r) {
        const i64 n = t0 + r / g, gi = r % g;
        finalize_row(c, n, gi, acc + (r - r0) * da, m[r], l[r]);
    }
}

int run_heads(const hpcattn_cpu_call& c) {
    const HeadsPlan p = heads_plan(c);
    const i64 nh = heads_of(c), g = c.g, d = c.d, bq = std::max<i64>(1, c.block_q), bk = heads_block_k(c);
    const i64 da = (d + kNR - 1) / kNR * kNR;
    void* own = nullptr;
    int rc = 0;
    float* base = scratch_of(c, p.total, &own, &rc);
    if (!base) return rc;
    Work w{nullptr, base + p.qtt, base, nullptr, da, nullptr, nullptr, p.st};
    Range* kr = reinterpret_cast<Range*>(base + p.qtt + p.st);
    float* const heads = base + p.qtt + p.st + p.kr;
    const i64 n_ktiles = (c.nk + bk - 1) / bk;
    for (i64 t = 0; t < n_ktiles; ++t)
        kr[t] = range_of(c.k_pos, c.k_seg, t * bk, std::min(c.nk, (t + 1) * bk));
    auto qt_of = [&](i64 h) { return heads + h * p.per_head; };
    auto acc_of = [&](i64 h, i64 gr) { return heads + h * p.per_head + p.qt + gr * p.acc_group; };
    auto m_of = [&](i64 h) { return heads + h * p.per_head + p.qt + p.acc; };
    auto l_of = [&](i64 h) { return reinterpret_cast<double*>(heads + h * p.per_head + p.qt + p.acc + p.m); };
    auto qtt_of = [&](i64 h, i64 gr) {
        return heads + h * p.per_head + p.qt + p.acc + p.m + p.l + gr * round16(d * kFewRows);
    };
    // every fold of a query tile reads its rows transposed once, and ST's padding lanes stay zero
    clear_few_lanes(w.s, few_subtile_keys(w));
    for (i64 t0 = 0; t0 < c.nq; t0 += bq) {
        const i64 t1 = std::min(c.nq, t0 + bq), rows = (t1 - t0) * g;
        const i64 groups = (rows + kFewRows - 1) / kFewRows;
        auto rows_of = [&](i64 gr) { return std::min(kFewRows, rows - gr * kFewRows); };
        for (i64 h = 0; h < nh; ++h) {
            scale_rows(head_of(c, h), t0, t1, qt_of(h));
            std::fill(m_of(h), m_of(h) + rows, kNegInf);
            std::fill(l_of(h), l_of(h) + rows, 0.0);
            for (i64 gr = 0; gr < groups; ++gr) {
                std::fill(acc_of(h, gr), acc_of(h, gr) + (kFewRows + 6) * da, 0.0f);
                transpose_few(qt_of(h) + gr * kFewRows * d, rows_of(gr), d, qtt_of(h, gr));
            }
        }
        const Range qr = range_of(c.q_pos, c.q_seg, t0, t1);
        for (i64 t = 0; t < n_ktiles; ++t) {
            const int cls = classify(c, qr, kr[t]);
            if (cls == kNone) continue;
            i64 a = t * bk, b = std::min(c.nk, a + bk);
            if (cls == kPartial) {  // drop the edge columns no row of the tile can see
                while (a < b && hidden_from_all(c, qr, a)) ++a;
                while (b > a && hidden_from_all(c, qr, b - 1)) --b;
                if (a == b) continue;
            }
            const i64 nj0 = (t + 1) * bk;
            const i64 n_next = fetch_next_tile() ? std::max<i64>(0, std::min(c.nk, nj0 + bk) - nj0) : 0;
            for (i64 h = 0; h < nh; ++h) {
                const hpcattn_cpu_call ch = head_of(c, h);
                for (i64 gr = 0; gr < groups; ++gr) {  // the first group fetches the next tile
                    const i64 r0 = gr * kFewRows, nn = gr ? 0 : n_next;
                    fold_few(ch, w, t0, rows_of(gr), a, b, cls == kPartial, qt_of(h) + r0 * d,
                             acc_of(h, gr), m_of(h) + r0, l_of(h) + r0, qtt_of(h, gr),
                             nn ? ch.k + nj0 * ch.k_stride : nullptr, nn ? ch.v + nj0 * ch.v_stride : nullptr,
                             nn, r0);
                }
            }
        }
        for (i64 h = 0; h < nh; ++h)
            for (i64 gr = 0; gr < groups; ++gr)
                finalize_rows(head_of(c, h), t0, gr * kFewRows, gr * kFewRows + rows_of(gr), acc_of(h, gr), da,
                              m_of(h), l_of(h));
    }
    std::free(own);
    return 0;
}

#if defined(__AVX512F__)
// run_tiny: a decode step, at most kTinyRows query rows per kv head (one query of a GQA group of
// up to four heads, or up to four queries of one head) against any number of keys. So few rows
// leave most of fold_few's lanes empty, and the call is a stream of the keys and values from
// memory: here a row's scores are dot products (each key's d floats against the row's scaled q,
// sixteen keys' partial sums reduced into one zmm by sum16) and P V adds each key's value row to
// the rows' accumulators. Blocks of kTinyKeys keys; each block's key rows and then its value rows
// are read in memory order, every head's part of a row before the next row (rows holding every
// head are then one sequential stream each), with each key and value row fetched kTinyAheadBytes
// of rows ahead (prefetcht2). Online softmax per span of kTinySpan keys: its max, a rescale where
// a row's max grows, exp, and its sum added in double; P V per block summed apart and then added
// to the accumulators. (Per block of 16 and one FMA chain through every key, the error at 1 x
// 5,000, d=128, was 2.0e-6 against a float32 reference's 4.1e-7, past FlashAttention's 2x rule,
// as run_heads' 1.6e-6; with both it is 7.2e-7.)
//
// Side by side against run_heads (fold_few) on Zen 4, H=8, d=64, two builds of each alternating
// (docs/performance-notes.md): 1 query x 100,000 keys 22.7/21.9 against 46.4/48.3 ms, 2 queries
// 25.0 against 45.4/47.0, 4 queries 35.6 against 43.4/46.4, 1 x 2,000 0.56/0.51 against
// 0.81/0.95; GQA (H=32, 8 kv heads) 1 x 100,000 32.4/31.4 against 41.5/41.0; d=128 1 x 50,000
// 19.3/19.4 against 42.1/39.7. Head dim 128 with several rows gained nothing (2 x 50,000 44.8
// against 45.1 ms; 4 x 30,000 25.1 against 23.6), so more than one row only up to d = 96. Without
// the fetch ahead the stream ran slower than run_heads from two rows on (4 x 100,000 58.4 against
// 39.2 ms on the same Zen 4), and it was never measured on another CPU: like the other fetches
// ahead, on AMD CPUs only (fetch_next_tile).
constexpr i64 kTinyRows = 4;
constexpr i64 kTinyKeys = 16;
constexpr i64 kTinySpan = 64;  // keys per step of the online softmax (one max, at most one rescale)
constexpr i64 kTinyAheadBytes = 512 * 1024;  // 1 x 100,000, H=8, d=64 (256 rows): 20.6 ms; 64 rows
                                             // 20.9, 1,024 rows 28.3, none 29.8, prefetchnta 32.2

// lane j of the result: the sum of z[j]'s sixteen lanes (one fixed order of additions)
inline __m512 sum16(const __m512* z) {
    __m512 t[8], u[4], v[2];
    for (int i = 0; i < 8; ++i)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(z[2 * i], z[2 * i + 1]), _mm512_unpackhi_ps(z[2 * i], z[2 * i + 1]));
    for (int i = 0; i < 4; ++i)  // per 128-bit lane: the partial sums of keys 4i .. 4i + 3
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; ++i)
        v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xdd));
}

bool tiny_rows(const hpcattn_cpu_call& c) {
    const i64 rows = c.nq * c.g;
    return fetch_next_tile() && c.nq >= 1 && c.nk >= 1 && rows <= kTinyRows && c.d % 16 == 0 &&
           c.d <= (rows == 1 ? 128 : 96);
}

struct TinyPlan {
    i64 qs, acc, bacc, m, l, per_head, z, p, total;
};

TinyPlan tiny_plan(const hpcattn_cpu_call& c) {
    TinyPlan p{};
    p.qs = round16(kTinyRows * c.d);
    p.acc = round16(kTinyRows * c.d);
    p.bacc = round16(kTinyRows * c.d);
    p.m = 16;
    p.l = 16;  // kTinyRows doubles
    p.per_head = p.qs + p.acc + p.bacc + p.m + p.l;
    p.z = heads_of(c) * kTinyRows * kTinyKeys * 16;  // a block's partial sums, one zmm per key and row
    p.p = heads_of(c) * kTinyRows * kTinySpan;       // a span's scores, then probabilities
    p.total = heads_of(c) * p.per_head + p.z + p.p + 16;
    return p;
}

template <int C>  // C = d / 16
int run_tiny_c(const hpcattn_cpu_call& c) {
    const TinyPlan tp = tiny_plan(c);
    const i64 nh = heads_of(c), g = c.g, d = c.d, rows = c.nq * g, nk = c.nk;
    void* own = nullptr;
    int rc = 0;
    float* base = scratch_of(c, tp.total, &own, &rc);
    if (!base) return rc;
    auto qs_of = [&](i64 h) { return base + h * tp.per_head; };
    auto acc_of = [&](i64 h) { return base + h * tp.per_head + tp.qs; };
    auto bacc_of = [&](i64 h) { return base + h * tp.per_head + tp.qs + tp.acc; };
    auto m_of = [&](i64 h) { return base + h * tp.per_head + tp.qs + tp.acc + tp.bacc; };
    auto l_of = [&](i64 h) {
        return reinterpret_cast<double*>(base + h * tp.per_head + tp.qs + tp.acc + tp.bacc + tp.m);
    };
    __m512* const zb = reinterpret_cast<__m512*>(base + nh * tp.per_head);  // [head][row][key]
    float* const pb = base + nh * tp.per_head + tp.z;                         // [head][row][span key]
    for (i64 h = 0; h < nh; ++h) {
        scale_rows(head_of(c, h), 0, c.nq, qs_of(h));  // row r: position r / g, group member r % g
        std::fill(acc_of(h), acc_of(h) + rows * d, 0.0f);
        std::fill(m_of(h), m_of(h) + rows, kNegInf);
        std::fill(l_of(h), l_of(h) + rows, 0.0);
    }
    const Range qr = range_of(c.q_pos, c.q_seg, 0, c.nq);
    const i64 ahead = std::max<i64>(kTinyKeys, kTinyAheadBytes / (nh * d * i64(sizeof(float))));
    constexpr i64 blocks = kTinySpan / kTinyKeys;
    __mmask16 vis[blocks][kTinyRows];
    bool any[blocks];
    for (i64 s0 = 0; s0 < nk; s0 += kTinySpan) {
        const i64 ns = std::min(kTinySpan, nk - s0), nb = (ns + kTinyKeys - 1) / kTinyKeys;
        // scores: each block's key rows in memory order, each row's part of every head, the
        // block's sums into pb (keys a row does not see: -inf)
        for (i64 b = 0; b < nb; ++b) {
            const i64 j0 = s0 + b * kTinyKeys, n = std::min(kTinyKeys, nk - j0);
            const int cls = classify(c, qr, range_of(c.k_pos, c.k_seg, j0, j0 + n));
            any[b] = cls != kNone;
            for (i64 r = 0; r < rows; ++r) {  // the keys each row sees
                vis[b][r] = cls == kNone ? __mmask16(0) : __mmask16((1u << n) - 1u);
                if (cls == kPartial)
                    for (i64 j = 0; j < n; ++j)
                        if (!visible(c, r / g, j0 + j)) vis[b][r] &= __mmask16(~(1u << j));
            }
            if (!any[b]) {
                for (i64 h = 0; h < nh; ++h)
                    for (i64 r = 0; r < rows; ++r)
                        _mm512_storeu_ps(pb + (h * kTinyRows + r) * kTinySpan + b * kTinyKeys, _mm512_set1_ps(kNegInf));
                continue;
            }
            for (i64 j = 0; j < kTinyKeys; ++j)
                for (i64 h = 0; h < nh; ++h) {
                    __m512* z = zb + h * kTinyRows * kTinyKeys + j;
                    if (j >= n) {  // past the last key: partial sums 0 (their lanes are masked)
                        for (i64 r = 0; r < rows; ++r) z[r * kTinyKeys] = _mm512_setzero_ps();
                        continue;
                    }
                    const float* kj = c.k + h * c.k_hs + (j0 + j) * c.k_stride;
                    if (j0 + j + ahead < nk)
                        for (i64 x = 0; x < d; x += 16) __builtin_prefetch(kj + ahead * c.k_stride + x, 0, 1);
                    __m512 kv[C];
                    for (int cc = 0; cc < C; ++cc) kv[cc] = _mm512_loadu_ps(kj + 16 * cc);
                    const float* q = qs_of(h);
                    for (i64 r = 0; r < rows; ++r) {
                        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q + r * d), kv[0]);
                        for (int cc = 1; cc < C; ++cc)
                            a = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * d + 16 * cc), kv[cc], a);
                        z[r * kTinyKeys] = a;
                    }
                }
            for (i64 h = 0; h < nh; ++h)
                for (i64 r = 0; r < rows; ++r)
                    _mm512_storeu_ps(pb + (h * kTinyRows + r) * kTinySpan + b * kTinyKeys,
                                     _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), vis[b][r],
                                                        sum16(zb + (h * kTinyRows + r) * kTinyKeys)));
        }
        // the online softmax of each head's rows over the span: one max, at most one rescale
        for (i64 h = 0; h < nh; ++h) {
            float* acc = acc_of(h);
            float* m = m_of(h);
            double* l = l_of(h);
            for (i64 r = 0; r < rows; ++r) {
                float* p = pb + (h * kTinyRows + r) * kTinySpan;
                __m512 mx = _mm512_loadu_ps(p);
                for (i64 b = 1; b < nb; ++b) mx = _mm512_max_ps(mx, _mm512_loadu_ps(p + b * kTinyKeys));
                const float mnew = std::max(m[r], _mm512_reduce_max_ps(mx));
                if (mnew == kNegInf) {  // nothing visible yet: adds nothing
                    for (i64 b = 0; b < nb; ++b) _mm512_storeu_ps(p + b * kTinyKeys, _mm512_setzero_ps());
                    continue;
                }
                if (mnew != m[r]) {
                    if (m[r] != kNegInf) {  // (a row that saw nothing yet has zero acc and sum)
                        const float alpha = std::exp(m[r] - mnew);
                        const __m512 av = _mm512_set1_ps(alpha);
                        for (i64 x = 0; x < d; x += 16)
                            _mm512_storeu_ps(acc + r * d + x, _mm512_mul_ps(_mm512_loadu_ps(acc + r * d + x), av));
                        l[r] *= alpha;
                    }
                    m[r] = mnew;
                }
                __m512 sz = _mm512_setzero_ps();
                for (i64 b = 0; b < nb; ++b) {
                    const __m512 pz = exp_nonpos16(_mm512_sub_ps(_mm512_loadu_ps(p + b * kTinyKeys), _mm512_set1_ps(mnew)));
                    _mm512_storeu_ps(p + b * kTinyKeys, pz);
                    sz = _mm512_add_ps(sz, pz);
                }
                l[r] += double(_mm512_reduce_add_ps(sz));
            }
        }
        // P V: each block's value rows in memory order, summed apart from the accumulators and
        // then added to them (sums of 16 products, not one chain through every key)
        for (i64 b = 0; b < nb; ++b) {
            if (!any[b]) continue;
            const i64 j0 = s0 + b * kTinyKeys, n = std::min(kTinyKeys, nk - j0);
            for (i64 h = 0; h < nh; ++h) std::fill(bacc_of(h), bacc_of(h) + rows * d, 0.0f);
            for (i64 j = 0; j < n; ++j)
                for (i64 h = 0; h < nh; ++h) {
                    const float* vj = c.v + h * c.v_hs + (j0 + j) * c.v_stride;
                    if (j0 + j + ahead < nk)
                        for (i64 x = 0; x < d; x += 16) __builtin_prefetch(vj + ahead * c.v_stride + x, 0, 1);
                    __m512 vv[C];
                    for (int cc = 0; cc < C; ++cc) vv[cc] = _mm512_loadu_ps(vj + 16 * cc);
                    float* bacc = bacc_of(h);
                    for (i64 r = 0; r < rows; ++r) {
                        const __m512 pr = _mm512_set1_ps(pb[(h * kTinyRows + r) * kTinySpan + b * kTinyKeys + j]);
                        for (int cc = 0; cc < C; ++cc) {
                            float* a = bacc + r * d + 16 * cc;
                            _mm512_storeu_ps(a, _mm512_fmadd_ps(pr, vv[cc], _mm512_loadu_ps(a)));
                        }
                    }
                }
            for (i64 h = 0; h < nh; ++h)
                for (i64 x = 0; x < rows * d; x += 16)
                    _mm512_storeu_ps(acc_of(h) + x,
                                     _mm512_add_ps(_mm512_loadu_ps(acc_of(h) + x), _mm512_loadu_ps(bacc_of(h) + x)));
        }
    }
    for (i64 h = 0; h < nh; ++h) finalize_rows(head_of(c, h), 0, 0, rows, acc_of(h), d, m_of(h), l_of(h));
    std::free(own);
    return 0;
}

int run_tiny(const hpcattn_cpu_call& c) {
    switch (c.d / 16) {
        case 1: return run_tiny_c<1>(c);
        case 2: return run_tiny_c<2>(c);
        case 3: return run_tiny_c<3>(c);
        case 4: return run_tiny_c<4>(c);
        case 5: return run_tiny_c<5>(c);
        case 6: return run_tiny_c<6>(c);
        case 7: return run_tiny_c<7>(c);
        default: return run_tiny_c<8>(c);
    }
}
#endif
#endif

}  // namespace

extern "C" int hpcattn_cpu_forward_f32(const hpcattn_cpu_call* call) {
#ifdef HPCATTN_MICRO
#if defined(__AVX512F__)
    if (tiny_rows(*call)) return run_tiny(*call);
#endif
    if (heads_inner(*call)) return run_heads(*call);
    if (direct_heads(*call)) return run_direct_heads(*call);
#endif
    if (call->nh <= 1) return run(*call, nullptr, nullptr, nullptr);
    for (i64 h = 0; h < call->nh; ++h) {  // one head after another, each on the whole scratch
        const int rc = run(head_of(*call, h), nullptr, nullptr, nullptr);
        if (rc) return rc;
    }
    return 0;
}

// 1 where the forward of *call runs as the decode stream (run_tiny), which one thread's reads
// already keep memory busy: split over threads by heads, each thread reads pieces of every row
// (hpcattn.cpu_fused then runs such a call on one worker)
extern "C" int hpcattn_cpu_streams(const hpcattn_cpu_call* call) {
#if defined(HPCATTN_MICRO) && defined(__AVX512F__)
    return tiny_rows(*call) ? 1 : 0;
#else
    (void)call;
    return 0;
#endif
}

// Fold the keys of *call into a state: acc (nq*g + 6 rows of hpcattn_cpu_acc_stride(d) floats,
// zero to start), m (nq*g floats, -inf to start), l (nq*g doubles, 0 to start); out/lse unused.
extern "C" int hpcattn_cpu_fold_f32(const hpcattn_cpu_call* call, float* acc, float* m, double* l) {
    return run(*call, acc, m, l);
}

// Floats of scratch a call needs (folding: hpcattn_cpu_fold_f32, else the forward)
extern "C" int64_t hpcattn_cpu_scratch_floats(const hpcattn_cpu_call* call, int32_t folding) {
#ifdef HPCATTN_MICRO
#if defined(__AVX512F__)
    if (!folding && tiny_rows(*call)) return tiny_plan(*call).total;
#endif
    if (!folding && heads_inner(*call)) return heads_plan(*call).total;
    if (!folding && direct_heads(*call)) return direct_plan(*call).total;
#endif
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

// The flat index of the first NaN or Inf among n contiguous values (exponent bits all ones), or
// -1 when every one is finite: one pass at memory speed, in blocks whose test the compiler
// vectorizes (the position is looked for only in a block that has one). hpcattn's input check
// (hpcattn.validate.check_qkv) calls it for large contiguous float32/float64 arrays instead of
// NumPy's isfinite, which writes a boolean array as large as the input and reads it again.
namespace {

template <class U, U kExp>
int64_t first_nonfinite(const void* data, int64_t n) {
    typedef U __attribute__((may_alias)) alias_t;
    const alias_t* u = static_cast<const alias_t*>(data);
    constexpr int64_t kBlock = 4096;
    for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
        const int64_t i1 = std::min(n, i0 + kBlock);
        U bad = 0;
        for (int64_t i = i0; i < i1; ++i) bad |= U((u[i] & kExp) == kExp);
        if (bad)
            for (int64_t i = i0; i < i1; ++i)
                if ((u[i] & kExp) == kExp) return i;
    }
    return -1;
}

}  // namespace

extern "C" int64_t hpcattn_cpu_first_nonfinite_f32(const float* x, int64_t n) {
    return first_nonfinite<uint32_t, 0x7f800000u>(x, n);
}

extern "C" int64_t hpcattn_cpu_first_nonfinite_f64(const double* x, int64_t n) {
    return first_nonfinite<uint64_t, 0x7ff0000000000000ull>(x, n);
}
