// Attention backward (FlashAttention-2 order), float32 accumulation, deterministic (no atomics:
// every gradient element is written once, by one thread). Three kernels, launched in this order
// by hpcattn/gpu/backward.py, each on CUDA cores (SIMT, this file, every dtype) or tensor cores
// (attention_bwd_mma.cuh, *_mma_* entry points, fp16/bf16, sm_80+):
//
//   attention_bwd_delta_*  D[i] = rowsum(dout[i] * out[i])                       (float32)
//   attention_bwd_dq_*     one block per (query tile, head, batch), streaming key tiles:
//                          dQ = scale * sum_j dS[:, j] K[j]
//   attention_bwd_dkdv_*   one block per (key tile, kv head and share of its GQA group,
//                          batch), streaming the query tiles of the share's query heads (the
//                          sum is formed in registers, in a fixed order; shares are added in
//                          order by the caller): dV = sum_i P[i]^T dO[i], dK = scale * sum_i dS[i]^T Q[i]
// with P = exp(scale * Q K^T - lse) recomputed from the forward's lse and
// dS = P * (dO V^T - D). Scores are kept in log2 units (exp2f): s * scale_log2 - lse * log2(e).
// Gradients are written in float32 whatever the input dtype (partial gradients of a ring are
// summed in float32; hpcattn/gpu/backward.py casts for the caller).
//
// Causal masking by global positions (key j visible to query i iff q_pos[i] >= k_pos[j]), with
// q_bounds/k_bounds = (min, max) position per tile of the kernel's own tile sizes: a tile pair
// with every key in every query's future is skipped, one fully in the past is unmasked. A query
// row with lse = -inf (it saw no key) gets P = 0: it contributes nothing and its dQ is 0.
//
// SIMT thread layout of every product (THREADS = 128): tx = tid % 8 owns columns tx + 8 * j,
// ty = tid / 8 owns rows ty * RPT + r. The row operand is stored contraction-major
// ([k][rows], one RPT-float vector load, broadcast across tx); the column operand is stored
// row-major with one float of padding ([cols][D + 1]), so the scalar loads of the 8 column
// lanes fall in 8 different banks whether the product contracts over D or over the columns.
// The tile sizes come from Python as -D options (hpcattn.gpu.backward.compile_defines()).
// (the forward's HPCATTN_THREADS / HPCATTN_BLOCK_Q configure attention_fwd_mma.cuh, included below)
#if !defined(HPCATTN_BWD_THREADS) || !defined(HPCATTN_BWD_dq_ROWS_D64) || !defined(HPCATTN_THREADS)
#error "compile with the -D options from hpcattn.gpu.backward.compile_options()"
#endif

#include "attention_bwd_common.cuh"

namespace hpcattn {
namespace bwd {

constexpr int LANES = 8;                  // column lanes of a row group
constexpr int GROUPS = THREADS / LANES;   // row groups

// N consecutive floats (N = 1, 2, 4; 4N-byte aligned) in one vector load.
template <int N>
__device__ __forceinline__ void load_vec(const float* p, float a[N]) {
    if constexpr (N == 4) {
        const float4 x = *reinterpret_cast<const float4*>(p);
        a[0] = x.x; a[1] = x.y; a[2] = x.z; a[3] = x.w;
    } else if constexpr (N == 2) {
        const float2 x = *reinterpret_cast<const float2*>(p);
        a[0] = x.x; a[1] = x.y;
    } else {
        static_assert(N == 1, "1, 2 or 4 rows per thread");
        a[0] = p[0];
    }
}

template <int N>
__device__ __forceinline__ void store_vec(float* p, const float a[N]) {
    if constexpr (N == 4) {
        *reinterpret_cast<float4*>(p) = make_float4(a[0], a[1], a[2], a[3]);
    } else if constexpr (N == 2) {
        *reinterpret_cast<float2*>(p) = make_float2(a[0], a[1]);
    } else {
        p[0] = a[0];
    }
}

// acc[r][j] += sum_{kk < K} A[kk * lda + r] * B[kk * b_k + j * LANES * b_col]: A and B are
// already offset to this thread's first row (ty * RPT) and first column (tx).
template <int RPT, int CPT, int K>
__device__ __forceinline__ void tile_product(float acc[RPT][CPT], const float* A, int lda, const float* B,
                                             int b_k, int b_col) {
#pragma unroll 4
    for (int kk = 0; kk < K; ++kk) {
        float a[RPT];
        load_vec<RPT>(A + kk * lda, a);
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
            const float bj = B[kk * b_k + j * LANES * b_col];
#pragma unroll
            for (int r = 0; r < RPT; ++r) acc[r][j] += a[r] * bj;
        }
    }
}

template <int R, int C>
__device__ __forceinline__ void zero(float x[R][C]) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < C; ++c) x[r][c] = 0.f;
}

// rows [row0, row0 + ROWS) of a (seq, heads, D) tensor -> dst[row][ld] (zero past n).
template <typename T, int D, int ROWS>
__device__ __forceinline__ void stage_rows(float* dst, int ld, const T* src, long long stride, long long row0,
                                           long long n) {
    for (int idx = threadIdx.x; idx < ROWS * D / 8; idx += THREADS) {
        const int row = idx / (D / 8), dg = idx % (D / 8);
        float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (row0 + row < n) load8(src + (row0 + row) * stride + dg * 8, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[row * ld + dg * 8 + e] = f[e];
    }
}

// The same rows transposed: dst[d][ROWS]; consecutive threads take consecutive rows.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void stage_transposed(float* dst, const T* src, long long stride, long long row0,
                                                 long long n) {
    for (int idx = threadIdx.x; idx < ROWS * D / 8; idx += THREADS) {
        const int row = idx % ROWS, dg = idx / ROWS;
        float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (row0 + row < n) load8(src + (row0 + row) * stride + dg * 8, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[(dg * 8 + e) * ROWS + row] = f[e];
    }
}

// (b, n, heads, D) rows owned by this thread -> float32 gradient rows, scaled.
template <int RPT, int DPT>
__device__ __forceinline__ void store_grad(float* dst, const float acc[RPT][DPT], long long row0, long long n,
                                           long long stride, float factor) {
#pragma unroll
    for (int r = 0; r < RPT; ++r)
        if (row0 + r < n)
#pragma unroll
            for (int e = 0; e < DPT; ++e) dst[(row0 + r) * stride + (threadIdx.x % LANES) + e * LANES] = acc[r][e] * factor;
}

// D = rowsum(dout * out): grid (ceil(n_q / GROUPS), heads, batch), 8 lanes per row.
template <typename T, int D>
__device__ __forceinline__ void attention_bwd_delta(const T* __restrict__ out, const T* __restrict__ dout,
                                                    float* __restrict__ delta, int n_q, int heads) {
    static_assert(D % 64 == 0, "8 lanes x 8 elements per step");
    const int tx = threadIdx.x % LANES, ty = threadIdx.x / LANES, h = blockIdx.y, b = blockIdx.z;
    const long long row = (long long)blockIdx.x * GROUPS + ty;
    float sum = 0.f;
    if (row < n_q) {
        const long long offset = ((long long)b * n_q + row) * heads * D + (long long)h * D + tx * 8;
#pragma unroll
        for (int c = 0; c < D / 64; ++c) {
            float o[8], g[8];
            load8(out + offset + c * 64, o);
            load8(dout + offset + c * 64, g);
#pragma unroll
            for (int e = 0; e < 8; ++e) sum += o[e] * g[e];
        }
    }
    sum = group8_sum(sum);  // every lane takes part in the shuffle
    if (row < n_q && tx == 0) delta[((long long)b * heads + h) * n_q + row] = sum;
}

// dQ for BQ query rows of one (batch, head). Shared memory (floats): Qt[D][BQ], dOt[D][BQ],
// Ks[BK][D+1], Vs[BK][D+1], dSs[BK][BQ+4] (dS transposed, the row operand of dS K).
template <typename T, int D, int BQ, int BK>
__device__ __forceinline__ void attention_bwd_dq(HPCATTN_BACKWARD_PARAMS(T), float4* smem_raw) {
    constexpr int RPT = BQ / GROUPS, CPT = BK / LANES, DPT = D / LANES, LDK = D + 1, LDS = BQ + 4;
    static_assert(RPT * GROUPS == BQ && CPT * LANES == BK && D % 8 == 0, "tile sizes");
    float* Qt = reinterpret_cast<float*>(smem_raw);
    float* dOt = Qt + D * BQ;
    float* Ks = dOt + D * BQ;
    float* Vs = Ks + BK * LDK;
    float* dSs = Vs + BK * LDK;

    const int tx = threadIdx.x % LANES, ty = threadIdx.x / LANES;
    const int tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (heads / kv_heads);
    const long long q0 = (long long)tile * BQ;
    const long long q_stride = (long long)heads * D, kv_stride = (long long)kv_heads * D;
    const T* kb = k + head_offset(b, n_k, kv_heads, hk, D);
    const T* vb = v + head_offset(b, n_k, kv_heads, hk, D);
    stage_transposed<T, D, BQ>(Qt, q + head_offset(b, n_q, heads, h, D), q_stride, q0, n_q);
    stage_transposed<T, D, BQ>(dOt, dout + head_offset(b, n_q, heads, h, D), q_stride, q0, n_q);

    float lse2[RPT], dd[RPT];
    long long qp[RPT];
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
        const long long row = q0 + ty * RPT + r;
        query_row_stats(lse, delta, ((long long)b * heads + h) * n_q, row, n_q, lse2[r], dd[r]);
        qp[r] = (causal && row < n_q) ? q_pos[row] : 0;  // (only read for rows in range)
    }
    float acc[RPT][DPT];
    zero<RPT, DPT>(acc);

    const int n_tiles = (n_k + BK - 1) / BK;
    for (int kt = 0; kt < n_tiles; ++kt) {
        const long long k0 = (long long)kt * BK;
        const TilePair pair = tile_pair(causal, k0 + BK > n_k, q_bounds, tile, k_bounds, kt);
        if (pair == SKIP) continue;
        const bool masked = pair == MASK;
        __syncthreads();  // the previous tile's Ks, Vs and dSs are no longer read
        stage_rows<T, D, BK>(Ks, LDK, kb, kv_stride, k0, n_k);
        stage_rows<T, D, BK>(Vs, LDK, vb, kv_stride, k0, n_k);
        __syncthreads();

        float s[RPT][CPT], dp[RPT][CPT];
        zero<RPT, CPT>(s);
        zero<RPT, CPT>(dp);
        tile_product<RPT, CPT, D>(s, Qt + ty * RPT, BQ, Ks + tx * LDK, 1, LDK);
        tile_product<RPT, CPT, D>(dp, dOt + ty * RPT, BQ, Vs + tx * LDK, 1, LDK);
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
            const long long key = k0 + tx + j * LANES;
            const bool in_range = key < n_k;
            const long long kp = (masked && causal && in_range) ? k_pos[key] : 0;
            float ds[RPT];
#pragma unroll
            for (int r = 0; r < RPT; ++r) {
                const bool visible = !masked || (in_range && (!causal || qp[r] >= kp));
                const float p = visible ? exp2f(s[r][j] * scale_log2 - lse2[r]) : 0.f;
                ds[r] = p * (dp[r][j] - dd[r]);
            }
            store_vec<RPT>(dSs + (tx + j * LANES) * LDS + ty * RPT, ds);
        }
        __syncthreads();
        tile_product<RPT, DPT, BK>(acc, dSs + ty * RPT, LDS, Ks + tx, LDK, 1);
    }
    store_grad<RPT, DPT>(dq + head_offset(b, n_q, heads, h, D), acc, q0 + ty * RPT, n_q, q_stride, scale);
}

// dK, dV for BKV key rows of one (batch, kv head), summed over its share of the group's query
// heads (kv_block).
// Shared memory (floats): Kt[D][BKV], Vt[D][BKV], Qs[BQ][D+1], dOs[BQ][D+1], Ps[BQ][BKV+4],
// dSs[BQ][BKV+4], Ls[BQ] (lse, log2 units), Ds[BQ].
template <typename T, int D, int BKV, int BQ>
__device__ __forceinline__ void attention_bwd_dkdv(HPCATTN_BACKWARD_PARAMS(T), float4* smem_raw) {
    constexpr int RPT = BKV / GROUPS, CPT = BQ / LANES, DPT = D / LANES, LDQ = D + 1, LDP = BKV + 4;
    static_assert(RPT * GROUPS == BKV && CPT * LANES == BQ && D % 8 == 0, "tile sizes");
    float* Kt = reinterpret_cast<float*>(smem_raw);
    float* Vt = Kt + D * BKV;
    float* Qs = Vt + D * BKV;
    float* dOs = Qs + BQ * LDQ;
    float* Ps = dOs + BQ * LDQ;
    float* dSs = Ps + BQ * LDP;
    float* Ls = dSs + BQ * LDP;
    float* Ds = Ls + BQ;

    const int tid = threadIdx.x, tx = tid % LANES, ty = tid / LANES;
    const int tile = blockIdx.x, b = blockIdx.z;
    const KvBlock kvb = kv_block(heads, kv_heads, head_splits, n_k, D);
    const int hk = kvb.hk;
    const long long k0 = (long long)tile * BKV;
    const long long q_stride = (long long)heads * D, kv_stride = (long long)kv_heads * D;
    stage_transposed<T, D, BKV>(Kt, k + head_offset(b, n_k, kv_heads, hk, D), kv_stride, k0, n_k);
    stage_transposed<T, D, BKV>(Vt, v + head_offset(b, n_k, kv_heads, hk, D), kv_stride, k0, n_k);

    const bool ragged = k0 + BKV > n_k;
    long long kp[RPT];
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
        const long long key = k0 + ty * RPT + r;
        kp[r] = (causal && key < n_k) ? k_pos[key] : 0;  // (only read for keys in range)
    }
    float dk_acc[RPT][DPT], dv_acc[RPT][DPT];
    zero<RPT, DPT>(dk_acc);
    zero<RPT, DPT>(dv_acc);

    for_each_query_tile<D, BQ>(q, dout, b, kvb.h0, kvb.h1, n_q, heads, causal, ragged, q_bounds, k_bounds, tile,
                               [&](const T* qb, const T* gb, long long row_at, long long q0, bool masked) {
        stage_rows<T, D, BQ>(Qs, LDQ, qb, q_stride, q0, n_q);
        stage_rows<T, D, BQ>(dOs, LDQ, gb, q_stride, q0, n_q);
        stage_row_stats<BQ>(Ls, Ds, lse, delta, row_at, q0, n_q);
        __syncthreads();

        float s[RPT][CPT], dp[RPT][CPT];  // transposed: rows are keys, columns queries
        zero<RPT, CPT>(s);
        zero<RPT, CPT>(dp);
        tile_product<RPT, CPT, D>(s, Kt + ty * RPT, BKV, Qs + tx * LDQ, 1, LDQ);
        tile_product<RPT, CPT, D>(dp, Vt + ty * RPT, BKV, dOs + tx * LDQ, 1, LDQ);
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
            const int col = tx + j * LANES;
            const long long row = q0 + col;
            const long long qp = (masked && causal && row < n_q) ? q_pos[row] : 0;
            const float l2 = Ls[col], dcol = Ds[col];
            float p[RPT], ds[RPT];
#pragma unroll
            for (int r = 0; r < RPT; ++r) {
                const bool visible = !masked || (k0 + ty * RPT + r < n_k && (!causal || qp >= kp[r]));
                p[r] = visible ? exp2f(s[r][j] * scale_log2 - l2) : 0.f;
                ds[r] = p[r] * (dp[r][j] - dcol);
            }
            store_vec<RPT>(Ps + col * LDP + ty * RPT, p);
            store_vec<RPT>(dSs + col * LDP + ty * RPT, ds);
        }
        __syncthreads();
        tile_product<RPT, DPT, BQ>(dv_acc, Ps + ty * RPT, LDP, dOs + tx, LDQ, 1);
        tile_product<RPT, DPT, BQ>(dk_acc, dSs + ty * RPT, LDP, Qs + tx, LDQ, 1);
    });
    const long long grad_at = kvb.slab + head_offset(b, n_k, kv_heads, hk, D);
    store_grad<RPT, DPT>(dk + grad_at, dk_acc, k0 + ty * RPT, n_k, kv_stride, scale);
    store_grad<RPT, DPT>(dv + grad_at, dv_acc, k0 + ty * RPT, n_k, kv_stride, 1.f);
}

}  // namespace bwd
}  // namespace hpcattn

#include "attention_bwd_mma.cuh"

// extern "C" entry points; argument lists declared once in hpcattn/gpu/backward.py, tile sizes
// HPCATTN_BWD_<stage>[_mma]_{ROWS,COLS}_D<d> from its TILES table.
#define HPCATTN_BWD_DELTA_ENTRY(NAME, T, D)                                                       \
    extern "C" __global__ void __launch_bounds__(HPCATTN_BWD_THREADS)                            \
        NAME(const T* __restrict__ out, const T* __restrict__ dout, float* __restrict__ delta, int n_q, int heads) { \
        hpcattn::bwd::attention_bwd_delta<T, D>(out, dout, delta, n_q, heads);                    \
    }
#define HPCATTN_BWD_ENTRY(NAME, IMPL, T, D, ROWS, COLS)                                           \
    extern "C" __global__ void __launch_bounds__(HPCATTN_BWD_THREADS) NAME(HPCATTN_BACKWARD_PARAMS(T)) { \
        extern __shared__ float4 hpcattn_smem[];                                                  \
        hpcattn::bwd::IMPL<T, D, ROWS, COLS>(HPCATTN_BACKWARD_ARGS, hpcattn_smem);                \
    }
// attention_bwd_<stage>[_mma]_<suffix>_d<D> running attention_bwd_<stage>[_mma]<T, D, rows, cols>
#define HPCATTN_BWD_STAGE(STAGE, KIND, SUFFIX, T, D)                                              \
    HPCATTN_BWD_ENTRY(attention_bwd_##STAGE##KIND##_##SUFFIX##_d##D, attention_bwd_##STAGE##KIND, T, D, \
                      HPCATTN_BWD_##STAGE##KIND##_ROWS_D##D, HPCATTN_BWD_##STAGE##KIND##_COLS_D##D)
#define HPCATTN_BWD_SIMT_ENTRIES(SUFFIX, T, D)                                                    \
    HPCATTN_BWD_DELTA_ENTRY(attention_bwd_delta_##SUFFIX##_d##D, T, D)                            \
    HPCATTN_BWD_STAGE(dq, , SUFFIX, T, D)                                                         \
    HPCATTN_BWD_STAGE(dkdv, , SUFFIX, T, D)
// tensor cores (sm_80+), fp16/bf16 only
#define HPCATTN_BWD_MMA_ENTRIES(SUFFIX, T, D)                                                     \
    HPCATTN_BWD_STAGE(dq, _mma, SUFFIX, T, D)                                                     \
    HPCATTN_BWD_STAGE(dkdv, _mma, SUFFIX, T, D)

HPCATTN_BWD_SIMT_ENTRIES(f32, float, 64)
HPCATTN_BWD_SIMT_ENTRIES(f32, float, 128)
HPCATTN_BWD_SIMT_ENTRIES(f16, __half, 64)
HPCATTN_BWD_SIMT_ENTRIES(f16, __half, 128)
HPCATTN_BWD_SIMT_ENTRIES(bf16, __nv_bfloat16, 64)
HPCATTN_BWD_SIMT_ENTRIES(bf16, __nv_bfloat16, 128)
HPCATTN_BWD_MMA_ENTRIES(f16, __half, 64)
HPCATTN_BWD_MMA_ENTRIES(f16, __half, 128)
HPCATTN_BWD_MMA_ENTRIES(bf16, __nv_bfloat16, 64)
HPCATTN_BWD_MMA_ENTRIES(bf16, __nv_bfloat16, 128)
