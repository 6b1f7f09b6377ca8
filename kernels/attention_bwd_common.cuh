// What every attention backward kernel shares (attention_bwd.cu: SIMT, attention_bwd_mma.cuh:
// tensor cores): the parameter list, the causal tile rule, the per-row statistics, the split of
// a GQA group over dK/dV blocks and the walk over a dK/dV block's query tiles.
#pragma once

#include "hpcattn_common.cuh"

// The parameter list of the dq and dkdv entry points, in the order of
// hpcattn.gpu.backward.BACKWARD_ARGS (the emulation build checks the kinds match).
#define HPCATTN_BACKWARD_PARAMS(T)                                                                \
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,                   \
        const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta, \
        float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,                  \
        const long long* __restrict__ q_pos, const long long* __restrict__ k_pos,                \
        const long long* __restrict__ q_bounds, const long long* __restrict__ k_bounds, int n_q, \
        int n_k, int heads, int kv_heads, float scale_log2, float scale, int causal, int head_splits
#define HPCATTN_BACKWARD_ARGS                                                                     \
    q, k, v, dout, lse, delta, dq, dk, dv, q_pos, k_pos, q_bounds, k_bounds, n_q, n_k, heads,   \
        kv_heads, scale_log2, scale, causal, head_splits

namespace hpcattn {
namespace bwd {

constexpr int THREADS = HPCATTN_BWD_THREADS;
static_assert(THREADS % 32 == 0, "THREADS must be a multiple of the warp size");

// Element offset of row 0 of (batch b, head h) in a (batch, n, heads, D) tensor.
__device__ __forceinline__ long long head_offset(int b, long long n, int heads, int h, int D) {
    return ((long long)b * n * heads + h) * D;
}

// lse (natural log) -> log2 units; a row that saw no key (-inf) -> +inf, so its P is exp2(-inf) = 0.
__device__ __forceinline__ float lse_log2(float x) {
    return x == -CUDART_INF_F ? CUDART_INF_F : x * CUDART_L2E_F;
}

// How a (query tile, key tile) pair is computed, from the (min, max) positions of each tile:
// SKIP when every key is in every query's future, MASK when some pair is masked (or the key
// tile is ragged), FULL otherwise.
enum TilePair { SKIP, MASK, FULL };

__device__ __forceinline__ TilePair tile_pair(int causal, bool ragged, const long long* q_bounds, int q_tile,
                                              const long long* k_bounds, int k_tile) {
    if (causal) {
        if (q_bounds[2 * q_tile + 1] < k_bounds[2 * k_tile]) return SKIP;
        if (q_bounds[2 * q_tile] < k_bounds[2 * k_tile + 1]) return MASK;
    }
    return ragged ? MASK : FULL;
}

// lse (log2 units) and D of one query row (row_at + row indexes (batch, head, row)); a row past
// n_q gets lse = +inf, so its P is 0.
__device__ __forceinline__ void query_row_stats(const float* lse, const float* delta, long long row_at, long long row,
                                                long long n_q, float& lse2, float& dd) {
    const bool in_range = row < n_q;
    lse2 = in_range ? lse_log2(lse[row_at + row]) : CUDART_INF_F;
    dd = in_range ? delta[row_at + row] : 0.f;
}

// The same for query rows [q0, q0 + ROWS) into shared Ls, Ds.
template <int ROWS>
__device__ __forceinline__ void stage_row_stats(float* Ls, float* Ds, const float* lse, const float* delta,
                                                long long row_at, long long q0, long long n_q) {
    for (int i = threadIdx.x; i < ROWS; i += THREADS) query_row_stats(lse, delta, row_at, q0 + i, n_q, Ls[i], Ds[i]);
}

// A dK/dV block's kv head hk and its share [h0, h1) of the group's query heads: blockIdx.y =
// split * kv_heads + hk, and split s of head_splits sums its heads into slab s of the float32
// (head_splits, batch, n_k, kv_heads, D) output (hpcattn/gpu/backward.py adds the slabs, in
// order). More than one split keeps the GPU busy when few kv heads own many query heads.
struct KvBlock {
    int hk, h0, h1;
    long long slab;  // element offset of this split's slab
};

__device__ __forceinline__ KvBlock kv_block(int heads, int kv_heads, int head_splits, int n_k, int D) {
    const int group = heads / kv_heads, per = (group + head_splits - 1) / head_splits;
    const int hk = blockIdx.y % kv_heads, split = blockIdx.y / kv_heads, h0 = hk * group + split * per;
    return {hk, h0, h0 + per < (hk + 1) * group ? h0 + per : (hk + 1) * group,
            (long long)split * gridDim.z * n_k * kv_heads * D};
}

// The query tiles a dK/dV block visits: every tile of query heads [h0, h1), in a fixed order
// (so the sum is deterministic), less the skipped ones. Calls visit(q rows, dout rows, row_at,
// q0, masked) after a __syncthreads(), so the previous tile's shared memory is free again;
// row_at + row indexes (batch, head, row) of lse and delta.
template <int D, int BQ, typename T, typename Visit>
__device__ __forceinline__ void for_each_query_tile(const T* q, const T* dout, int b, int h0, int h1, int n_q,
                                                    int heads, int causal, bool ragged, const long long* q_bounds,
                                                    const long long* k_bounds, int k_tile, Visit&& visit) {
    const int n_tiles = (n_q + BQ - 1) / BQ;
    for (int h = h0; h < h1; ++h) {
        const long long at = head_offset(b, n_q, heads, h, D);
        for (int qt = 0; qt < n_tiles; ++qt) {
            const TilePair pair = tile_pair(causal, ragged, q_bounds, qt, k_bounds, k_tile);
            if (pair == SKIP) continue;
            __syncthreads();
            visit(q + at, dout + at, ((long long)b * heads + h) * n_q, (long long)qt * BQ, pair == MASK);
        }
    }
}

}  // namespace bwd
}  // namespace hpcattn
