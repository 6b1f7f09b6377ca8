// Attention backward on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate).
//
// Same contract, arguments and tile skipping as the SIMT kernels in attention_bwd.cu; the
// fragment layouts are those of attention_fwd_mma.cuh (whose mma16816 / pack2 are used here).
// Four warps, each owning 16 rows of the block: query rows in the dQ kernel, key rows in the
// dK/dV kernel. A product C[M][N] += A[M][K] B[K][N] reads A from shared memory stored
// [M][K] and B stored [N][K] (K contiguous, rows padded by 8 elements so the 32-bit fragment
// loads are conflict-free), or takes A straight from the C fragments of the previous product
// (P and dS become the A operand without a trip through shared memory, rounded to T):
//   dQ kernel:    S = Q K^T, dP = dO V^T (A: Qs, dOs; B: Ks, Vs), dQ += dS K (B: Kt = K^T)
//   dK/dV kernel: S^T = K Q^T, dP^T = V dO^T (A: Ks, Vs; B: Qs, dOs),
//                 dV += P^T dO (B: dOt = dO^T), dK += dS^T Q (B: Qt = Q^T)
#pragma once

#include "attention_bwd_common.cuh"
#include "attention_fwd_mma.cuh"

namespace hpcattn {
namespace bwd {

constexpr int WARPS = THREADS / 32;

__device__ __forceinline__ unsigned word(const void* p) { return *reinterpret_cast<const unsigned*>(p); }

// A fragment of rows [0, 16) x k [0, 16) of X + (g * ld + 2t): see attention_fwd_mma.cuh.
template <typename T>
__device__ __forceinline__ void load_a(unsigned a[4], const T* x, int ld) {
    a[0] = word(x);
    a[1] = word(x + 8 * ld);
    a[2] = word(x + 8);
    a[3] = word(x + 8 * ld + 8);
}

template <typename T>
__device__ __forceinline__ void load_b(unsigned b[2], const T* x) {
    b[0] = word(x);
    b[1] = word(x + 8);
}

// Rows [row0, row0 + ROWS) of a (seq, heads, D) tensor of T as they are (dst[row][ld]) or
// transposed (dst[d][ldt]); zero past n.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void stage_tile(T* dst, int ld, T* dst_t, int ldt, const T* src, long long stride,
                                           long long row0, long long n) {
    const uint4 zero = {0u, 0u, 0u, 0u};
    for (int idx = threadIdx.x; idx < ROWS * D / 8; idx += THREADS) {
        // consecutive threads: consecutive 16-byte chunks of a row (coalesced), or consecutive
        // rows when a transposed copy is written (its 16-bit stores then do not collide)
        const int row = dst_t ? idx % ROWS : idx / (D / 8), c = dst_t ? idx / ROWS : idx % (D / 8);
        const uint4 raw = row0 + row < n ? *reinterpret_cast<const uint4*>(src + (row0 + row) * stride + c * 8) : zero;
        if (dst) *reinterpret_cast<uint4*>(dst + row * ld + c * 8) = raw;
        if (dst_t) {
            const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int j = 0; j < 8; ++j) dst_t[(c * 8 + j) * ldt + row] = e[j];
        }
    }
}

// acc[dt] (16 x D, C fragments) += A (16 x K16 * 16, C fragments of two n8 tiles per k16,
// rounded to T) * B, B stored [D][ldb] with K contiguous.
template <typename T, int D, int KT>
__device__ __forceinline__ void accumulate_from_c(float acc[D / 8][4], const float c[KT][4], const T* b, int ldb) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int kk = 0; kk < KT / 2; ++kk) {
        const unsigned a[4] = {pack2<T>(c[2 * kk][0], c[2 * kk][1]), pack2<T>(c[2 * kk][2], c[2 * kk][3]),
                               pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]),
                               pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3])};
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            unsigned bf[2];
            load_b(bf, b + (dt * 8 + g) * ldb + kk * 16 + 2 * t);
            mma16816(acc[dt], a, bf, T());
        }
    }
}

// s = A1 B1^T and dp = A2 B2^T for this warp's 16 rows x NT n8 tiles, over D: A1/A2 point at
// the warp's first row ([row][ld]), B1/B2 at the tile's first column row ([col][ld]).
template <typename T, int D, int NT>
__device__ __forceinline__ void scores_and_dp(float s[NT][4], float dp[NT][4], const T* a1, const T* a2,
                                              const T* b1, const T* b2, int ld) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = dp[nt][0] = dp[nt][1] =
        dp[nt][2] = dp[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        unsigned fa1[4], fa2[4];
        load_a(fa1, a1 + g * ld + ks * 16 + 2 * t, ld);
        load_a(fa2, a2 + g * ld + ks * 16 + 2 * t, ld);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            unsigned f1[2], f2[2];
            load_b(f1, b1 + (nt * 8 + g) * ld + ks * 16 + 2 * t);
            load_b(f2, b2 + (nt * 8 + g) * ld + ks * 16 + 2 * t);
            mma16816(s[nt], fa1, f1, T());
            mma16816(dp[nt], fa2, f2, T());
        }
    }
}

// C fragments (16 x D) of this warp -> float32 gradient rows row0 + g + 8i, scaled.
template <int D>
__device__ __forceinline__ void store_c(float* dst, const float acc[D / 8][4], long long row0, long long n,
                                        long long stride, float factor) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const long long row = row0 + g + 8 * i;
        if (row < n)
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
                *reinterpret_cast<float2*>(dst + row * stride + dt * 8 + 2 * t) =
                    make_float2(acc[dt][2 * i] * factor, acc[dt][2 * i + 1] * factor);
    }
}

// Shared memory (T): Qs[BQ][D+8], dOs[BQ][D+8], Ks[BK][D+8], Vs[BK][D+8], Kt[D][BK+8].
template <typename T, int D, int BQ, int BK>
__device__ __forceinline__ void attention_bwd_dq_mma(HPCATTN_BACKWARD_PARAMS(T), float4* smem_raw) {
    constexpr int LD = D + 8, LDT = BK + 8, NT = BK / 8;
    static_assert(BQ == 16 * WARPS && BK % 16 == 0 && D % 16 == 0, "each warp owns 16 query rows");
    T* Qs = reinterpret_cast<T*>(smem_raw);
    T* dOs = Qs + BQ * LD;
    T* Ks = dOs + BQ * LD;
    T* Vs = Ks + BK * LD;
    T* Kt = Vs + BK * LD;

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (heads / kv_heads);
    const long long q0 = (long long)tile * BQ;
    const long long q_stride = (long long)heads * D, kv_stride = (long long)kv_heads * D;
    const T* kb = k + head_offset(b, n_k, kv_heads, hk, D);
    const T* vb = v + head_offset(b, n_k, kv_heads, hk, D);
    stage_tile<T, D, BQ>(Qs, LD, nullptr, 0, q + head_offset(b, n_q, heads, h, D), q_stride, q0, n_q);
    stage_tile<T, D, BQ>(dOs, LD, nullptr, 0, dout + head_offset(b, n_q, heads, h, D), q_stride, q0, n_q);

    long long qp[2];
    float lse2[2], dd[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // rows g (i = 0) and g + 8 (i = 1) of the warp
        const long long row = q0 + warp * 16 + g + 8 * i;
        query_row_stats(lse, delta, ((long long)b * heads + h) * n_q, row, n_q, lse2[i], dd[i]);
        qp[i] = (causal && row < n_q) ? q_pos[row] : 0;  // (only read for rows in range)
    }
    float acc[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;

    const int n_tiles = (n_k + BK - 1) / BK;
    for (int kt = 0; kt < n_tiles; ++kt) {
        const long long k0 = (long long)kt * BK;
        const TilePair pair = tile_pair(causal, k0 + BK > n_k, q_bounds, tile, k_bounds, kt);
        if (pair == SKIP) continue;
        const bool masked = pair == MASK;
        __syncthreads();  // the previous tile's Ks, Vs, Kt are no longer read
        stage_tile<T, D, BK>(Ks, LD, Kt, LDT, kb, kv_stride, k0, n_k);
        stage_tile<T, D, BK>(Vs, LD, nullptr, 0, vb, kv_stride, k0, n_k);
        __syncthreads();

        float s[NT][4], dp[NT][4];
        scores_and_dp<T, D, NT>(s, dp, Qs + warp * 16 * LD, dOs + warp * 16 * LD, Ks, Vs, LD);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const long long key = k0 + nt * 8 + 2 * t + j;
                const bool in_range = key < n_k;
                const long long kp = (masked && causal && in_range) ? k_pos[key] : 0;
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const bool visible = !masked || (in_range && (!causal || qp[i] >= kp));
                    const float p = visible ? exp2f(s[nt][2 * i + j] * scale_log2 - lse2[i]) : 0.f;
                    s[nt][2 * i + j] = p * (dp[nt][2 * i + j] - dd[i]);  // dS
                }
            }
        accumulate_from_c<T, D, NT>(acc, s, Kt, LDT);
    }
    store_c<D>(dq + head_offset(b, n_q, heads, h, D), acc, q0 + warp * 16, n_q, q_stride, scale);
}

// Shared memory: Ks[BKV][D+8], Vs[BKV][D+8], Qs[BQ][D+8], dOs[BQ][D+8], Qt[D][BQ+8],
// dOt[D][BQ+8] (T), then Ls[BQ], Ds[BQ] (float).
template <typename T, int D, int BKV, int BQ>
__device__ __forceinline__ void attention_bwd_dkdv_mma(HPCATTN_BACKWARD_PARAMS(T), float4* smem_raw) {
    constexpr int LD = D + 8, LDT = BQ + 8, NT = BQ / 8;
    static_assert(BKV == 16 * WARPS && BQ % 16 == 0 && D % 16 == 0, "each warp owns 16 key rows");
    T* Ks = reinterpret_cast<T*>(smem_raw);
    T* Vs = Ks + BKV * LD;
    T* Qs = Vs + BKV * LD;
    T* dOs = Qs + BQ * LD;
    T* Qt = dOs + BQ * LD;
    T* dOt = Qt + D * LDT;
    float* Ls = reinterpret_cast<float*>(dOt + D * LDT);
    float* Ds = Ls + BQ;

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int tile = blockIdx.x, b = blockIdx.z;
    const KvBlock kvb = kv_block(heads, kv_heads, head_splits, n_k, D);
    const int hk = kvb.hk;
    const long long k0 = (long long)tile * BKV;
    const long long q_stride = (long long)heads * D, kv_stride = (long long)kv_heads * D;
    stage_tile<T, D, BKV>(Ks, LD, nullptr, 0, k + head_offset(b, n_k, kv_heads, hk, D), kv_stride, k0, n_k);
    stage_tile<T, D, BKV>(Vs, LD, nullptr, 0, v + head_offset(b, n_k, kv_heads, hk, D), kv_stride, k0, n_k);

    const bool ragged = k0 + BKV > n_k;
    long long kp[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const long long key = k0 + warp * 16 + g + 8 * i;
        kp[i] = (causal && key < n_k) ? k_pos[key] : 0;  // (only read for keys in range)
    }
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[dt][e] = dv_acc[dt][e] = 0.f;

    for_each_query_tile<D, BQ>(q, dout, b, kvb.h0, kvb.h1, n_q, heads, causal, ragged, q_bounds, k_bounds, tile,
                               [&](const T* qb, const T* gb, long long row_at, long long q0, bool masked) {
        stage_tile<T, D, BQ>(Qs, LD, Qt, LDT, qb, q_stride, q0, n_q);
        stage_tile<T, D, BQ>(dOs, LD, dOt, LDT, gb, q_stride, q0, n_q);
        stage_row_stats<BQ>(Ls, Ds, lse, delta, row_at, q0, n_q);
        __syncthreads();

        float s[NT][4], dp[NT][4];  // transposed: rows are keys, columns queries
        scores_and_dp<T, D, NT>(s, dp, Ks + warp * 16 * LD, Vs + warp * 16 * LD, Qs, dOs, LD);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int col = nt * 8 + 2 * t + j;
                const long long qp = (masked && causal && q0 + col < n_q) ? q_pos[q0 + col] : 0;
                const float l2 = Ls[col], dcol = Ds[col];
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const bool visible = !masked || (k0 + warp * 16 + g + 8 * i < n_k && (!causal || qp >= kp[i]));
                    const float p = visible ? exp2f(s[nt][2 * i + j] * scale_log2 - l2) : 0.f;
                    s[nt][2 * i + j] = p;
                    dp[nt][2 * i + j] = p * (dp[nt][2 * i + j] - dcol);  // dS^T
                }
            }
        accumulate_from_c<T, D, NT>(dv_acc, s, dOt, LDT);
        accumulate_from_c<T, D, NT>(dk_acc, dp, Qt, LDT);
    });
    const long long grad_at = kvb.slab + head_offset(b, n_k, kv_heads, hk, D);
    store_c<D>(dk + grad_at, dk_acc, k0 + warp * 16, n_k, kv_stride, scale);
    store_c<D>(dv + grad_at, dv_acc, k0 + warp * 16, n_k, kv_stride, 1.f);
}

}  // namespace bwd
}  // namespace hpcattn
