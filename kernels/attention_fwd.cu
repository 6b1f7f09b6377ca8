// Blockwise (online-softmax) attention forward, SIMT (CUDA cores), float32 accumulation.
//
// Grid (ceil(n_q / BLOCK_Q), heads, batch); THREADS threads per block; one block owns BLOCK_Q
// query rows of one (batch, head) and streams the keys/values of its kv head (GQA: kv head =
// head / (heads / kv_heads)) through shared memory in tiles of BK rows, keeping a running max m,
// running sum l and an unnormalised accumulator per row (FlashAttention-2 order: the sum is
// reduced across lanes only once, at the end).
//
// Thread (tx = tid % 8, ty = tid / 8) owns query rows ty*4 + r (r < 4), score columns
// c*32 + tx*4 + i and output dims c*32 + tx*4 + e, so every shared-memory read is a 16-byte
// vector that is either broadcast or contiguous across a quarter warp.
//
// Scores are kept in log2 units: Q is multiplied by scale * log2(e) when it is staged, so the
// softmax uses exp2f; lse (natural log) = (m + log2(l)) * ln 2.
//
// Causal masking uses global positions: key j is visible to query i iff q_pos[i] >= k_pos[j].
// q_bounds/k_bounds hold (min, max) position per tile, so a tile that is fully in the future of
// the block's queries is skipped and a tile fully in the past is computed without a mask.
// Rows that see no key get out = 0 and lse = -inf.
//
// Compile-time configuration comes from Python (hpcattn/gpu/kernels.py) as -D options, so the
// launch geometry and the shared-memory size are declared in one place.
#include "hpcattn_common.cuh"
#include "attention_fwd_mma.cuh"

#if !defined(HPCATTN_THREADS) || !defined(HPCATTN_BLOCK_Q) || !defined(HPCATTN_BLOCK_K_D64) \
    || !defined(HPCATTN_BLOCK_K_D128) || !defined(HPCATTN_MMA_BLOCK_K)
#error "compile with the -D options from hpcattn.gpu.kernels.compile_options()"
#endif

namespace hpcattn {

constexpr int THREADS = HPCATTN_THREADS;
constexpr int BQ = HPCATTN_BLOCK_Q;
constexpr int RPT = 4;  // query rows per thread
static_assert(THREADS % 32 == 0 && BQ == RPT * (THREADS / 8), "BLOCK_Q must be 4 * THREADS / 8");

// Dynamic shared memory (floats): Qt[D][BQ], Kt[D][BK], Vs[BK][D], Ps[BQ][BK].
template <typename T, int D, int BK>
__device__ __forceinline__ void attention_fwd(HPCATTN_ATTENTION_PARAMS(T), float4* smem_raw) {
    static_assert(D % 32 == 0 && BK % 32 == 0, "D and BK must be multiples of 32");
    constexpr int KC = BK / 32;  // 4-column groups of scores per thread
    constexpr int DC = D / 32;   // 4-dim groups of output per thread
    float* Qt = reinterpret_cast<float*>(smem_raw);
    float* Kt = Qt + D * BQ;
    float* Vs = Kt + D * BK;
    float* Ps = Vs + BK * D;

    const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
    const int tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (heads / kv_heads);
    const long long q0 = (long long)tile * BQ;
    const long long q_stride = (long long)heads * D;      // between sequence rows of q/out
    const long long kv_stride = (long long)kv_heads * D;  // between sequence rows of k/v
    const T* qb = q + ((long long)b * n_q * heads + h) * D;
    const T* kb = k + ((long long)b * n_k * kv_heads + hk) * D;
    const T* vb = v + ((long long)b * n_k * kv_heads + hk) * D;

    // Stage Q transposed and scaled; consecutive threads take consecutive rows (conflict-free).
    for (int idx = tid; idx < BQ * D / 8; idx += THREADS) {
        const int row = idx % BQ, dg = idx / BQ;
        float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (q0 + row < n_q) load8(qb + (q0 + row) * q_stride + dg * 8, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) Qt[(dg * 8 + e) * BQ + row] = f[e] * scale_log2;
    }

    long long qp[RPT];
    long long q_min = 0, q_max = 0;
    if (causal) {
        q_min = q_bounds[2 * tile];
        q_max = q_bounds[2 * tile + 1];
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
            const long long row = q0 + ty * RPT + r;
            qp[r] = row < n_q ? q_pos[row] : q_max;
        }
    }
    float m[RPT], l[RPT], acc[RPT][4 * DC];
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
        m[r] = -CUDART_INF_F;
        l[r] = 0.f;
#pragma unroll
        for (int e = 0; e < 4 * DC; ++e) acc[r][e] = 0.f;
    }
    __syncthreads();

    const int n_tiles = (n_k + BK - 1) / BK;
    for (int kt = 0; kt < n_tiles; ++kt) {
        const long long k0 = (long long)kt * BK;
        bool masked = k0 + BK > n_k;  // ragged last tile
        if (causal) {
            if (q_max < k_bounds[2 * kt]) continue;  // every key is in every query's future
            masked = masked || q_min < k_bounds[2 * kt + 1];
        }
        for (int idx = tid; idx < BK * D / 8; idx += THREADS) {  // K transposed
            const int key = idx % BK, dg = idx / BK;
            float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            if (k0 + key < n_k) load8(kb + (k0 + key) * kv_stride + dg * 8, f);
#pragma unroll
            for (int e = 0; e < 8; ++e) Kt[(dg * 8 + e) * BK + key] = f[e];
        }
        for (int idx = tid; idx < BK * D / 8; idx += THREADS) {  // V as is
            const int key = idx / (D / 8), dg = idx % (D / 8);
            float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            if (k0 + key < n_k) load8(vb + (k0 + key) * kv_stride + dg * 8, f);
            float4* dst = reinterpret_cast<float4*>(Vs + key * D + dg * 8);
            dst[0] = make_float4(f[0], f[1], f[2], f[3]);
            dst[1] = make_float4(f[4], f[5], f[6], f[7]);
        }
        __syncthreads();

        float s[RPT][4 * KC];
#pragma unroll
        for (int r = 0; r < RPT; ++r)
#pragma unroll
            for (int j = 0; j < 4 * KC; ++j) s[r][j] = 0.f;
#pragma unroll 4
        for (int d = 0; d < D; ++d) {
            const float4 a4 = *reinterpret_cast<const float4*>(Qt + d * BQ + ty * RPT);
            const float a[RPT] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
            for (int c = 0; c < KC; ++c) {
                const float4 k4 = *reinterpret_cast<const float4*>(Kt + d * BK + c * 32 + tx * 4);
#pragma unroll
                for (int r = 0; r < RPT; ++r) {
                    s[r][c * 4 + 0] += a[r] * k4.x;
                    s[r][c * 4 + 1] += a[r] * k4.y;
                    s[r][c * 4 + 2] += a[r] * k4.z;
                    s[r][c * 4 + 3] += a[r] * k4.w;
                }
            }
        }
        if (masked) {
#pragma unroll
            for (int c = 0; c < KC; ++c)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const long long key = k0 + c * 32 + tx * 4 + i;
                    const bool in_range = key < n_k;
                    const long long kp = (causal && in_range) ? k_pos[key] : 0;
#pragma unroll
                    for (int r = 0; r < RPT; ++r)
                        if (!in_range || (causal && qp[r] < kp)) s[r][c * 4 + i] = -CUDART_INF_F;
                }
        }
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
            float mx = s[r][0];
#pragma unroll
            for (int j = 1; j < 4 * KC; ++j) mx = fmaxf(mx, s[r][j]);
            const float m_new = fmaxf(m[r], group8_max(mx));
            const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;  // row saw no key yet
            const float alpha = exp2f(m[r] - m_use);
            m[r] = m_new;
            float ps = 0.f;
#pragma unroll
            for (int j = 0; j < 4 * KC; ++j) {
                s[r][j] = exp2f(s[r][j] - m_use);
                ps += s[r][j];
            }
            l[r] = l[r] * alpha + ps;  // this thread's columns only; reduced at the end
#pragma unroll
            for (int e = 0; e < 4 * DC; ++e) acc[r][e] *= alpha;
#pragma unroll
            for (int c = 0; c < KC; ++c)
                *reinterpret_cast<float4*>(Ps + (ty * RPT + r) * BK + c * 32 + tx * 4) =
                    make_float4(s[r][c * 4], s[r][c * 4 + 1], s[r][c * 4 + 2], s[r][c * 4 + 3]);
        }
        __syncthreads();

#pragma unroll 2
        for (int k4 = 0; k4 < BK; k4 += 4) {
            float p[RPT][4];
#pragma unroll
            for (int r = 0; r < RPT; ++r) {
                const float4 p4 = *reinterpret_cast<const float4*>(Ps + (ty * RPT + r) * BK + k4);
                p[r][0] = p4.x; p[r][1] = p4.y; p[r][2] = p4.z; p[r][3] = p4.w;
            }
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
#pragma unroll
                for (int c = 0; c < DC; ++c) {
                    const float4 v4 = *reinterpret_cast<const float4*>(Vs + (k4 + kk) * D + c * 32 + tx * 4);
#pragma unroll
                    for (int r = 0; r < RPT; ++r) {
                        acc[r][c * 4 + 0] += p[r][kk] * v4.x;
                        acc[r][c * 4 + 1] += p[r][kk] * v4.y;
                        acc[r][c * 4 + 2] += p[r][kk] * v4.z;
                        acc[r][c * 4 + 3] += p[r][kk] * v4.w;
                    }
                }
        }
        __syncthreads();  // the next tile overwrites Kt, Vs and Ps
    }

#pragma unroll
    for (int r = 0; r < RPT; ++r) {
        const float l_row = group8_sum(l[r]);
        const long long row = q0 + ty * RPT + r;
        if (row < n_q) {
            const float inv = l_row > 0.f ? 1.f / l_row : 0.f;
            T* o = out + ((long long)b * n_q + row) * q_stride + (long long)h * D;
#pragma unroll
            for (int c = 0; c < DC; ++c)
                store4(o + c * 32 + tx * 4,
                       make_float4(acc[r][c * 4] * inv, acc[r][c * 4 + 1] * inv,
                                   acc[r][c * 4 + 2] * inv, acc[r][c * 4 + 3] * inv));
            if (tx == 0)
                lse[((long long)b * heads + h) * n_q + row] =
                    l_row > 0.f ? (m[r] + log2f(l_row)) * CUDART_LN2_F : -CUDART_INF_F;
        }
    }
}

}  // namespace hpcattn

// One extern "C" entry point per (dtype, head_dim) and kernel variant; the argument list is
// declared once in hpcattn/gpu/kernels.py (ATTENTION_FWD_ARGS) and used for both CuPy and the
// CPU emulation.
HPCATTN_ATTENTION_ENTRY(attention_fwd_f32_d64, attention_fwd, float, 64, HPCATTN_BLOCK_K_D64)
HPCATTN_ATTENTION_ENTRY(attention_fwd_f32_d128, attention_fwd, float, 128, HPCATTN_BLOCK_K_D128)
HPCATTN_ATTENTION_ENTRY(attention_fwd_f16_d64, attention_fwd, __half, 64, HPCATTN_BLOCK_K_D64)
HPCATTN_ATTENTION_ENTRY(attention_fwd_f16_d128, attention_fwd, __half, 128, HPCATTN_BLOCK_K_D128)
HPCATTN_ATTENTION_ENTRY(attention_fwd_bf16_d64, attention_fwd, __nv_bfloat16, 64, HPCATTN_BLOCK_K_D64)
HPCATTN_ATTENTION_ENTRY(attention_fwd_bf16_d128, attention_fwd, __nv_bfloat16, 128, HPCATTN_BLOCK_K_D128)

// Tensor-core entry points (sm_80+), fp16/bf16 only.
HPCATTN_ATTENTION_ENTRY(attention_fwd_mma_f16_d64, attention_fwd_mma, __half, 64, HPCATTN_MMA_BLOCK_K)
HPCATTN_ATTENTION_ENTRY(attention_fwd_mma_f16_d128, attention_fwd_mma, __half, 128, HPCATTN_MMA_BLOCK_K)
HPCATTN_ATTENTION_ENTRY(attention_fwd_mma_bf16_d64, attention_fwd_mma, __nv_bfloat16, 64, HPCATTN_MMA_BLOCK_K)
HPCATTN_ATTENTION_ENTRY(attention_fwd_mma_bf16_d128, attention_fwd_mma, __nv_bfloat16, 128, HPCATTN_MMA_BLOCK_K)
