// Blockwise attention forward on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate).
//
// Same contract and arguments as the SIMT kernel in attention_fwd.cu; FlashAttention-2 order.
// Four warps; warp w owns query rows 16w..16w+15 of the block's BLOCK_Q = 64 rows and keeps its
// scores, running max/sum and output accumulator in registers, in the fragment layouts the PTX
// ISA documents for mma.m16n8k16 (lane = 4 * group + tig):
//   A (16x16, row-major)  reg0: (row g,   k 2t..2t+1)   reg1: (row g+8, k 2t..)
//                         reg2: (row g,   k 2t+8..)     reg3: (row g+8, k 2t+8..)
//   B (16x8, "col")       reg0: (k 2t..2t+1, col g)      reg1: (k 2t+8.., col g)
//   C/D (16x8, fp32)      c0,c1: (row g, col 2t, 2t+1)   c2,c3: (row g+8, ...)
// so the scores of two n8 tiles are exactly the A fragment of P for the next product (no trip
// through shared memory). Shared memory holds Q and K as loaded ([row][D+8]) and V transposed
// ([D][BK+8]); the +8 padding makes the 32-bit fragment loads conflict-free.
// The CPU emulation runs this file unmodified except the one mma instruction, which
// hpcattn/emulation/include/cuda_emu.h implements from the same documented layout.
#pragma once

#include "hpcattn_common.cuh"

namespace hpcattn {

__device__ __forceinline__ unsigned bits16(__half h) { return __half_as_ushort(h); }
__device__ __forceinline__ unsigned bits16(__nv_bfloat16 h) { return __bfloat16_as_ushort(h); }
__device__ __forceinline__ __half from_float(float x, __half) { return __float2half_rn(x); }
__device__ __forceinline__ __nv_bfloat16 from_float(float x, __nv_bfloat16) { return __float2bfloat16_rn(x); }

template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    return bits16(from_float(lo, T())) | (bits16(from_float(hi, T())) << 16);
}

// d += a * b for one m16n8k16 tile (the last argument picks the input type).
#if defined(HPCATTN_EMULATION)
template <typename T>
__device__ __forceinline__ void mma16816(float d[4], const unsigned a[4], const unsigned b[2], T) {
    emu::mma_m16n8k16<T>(d, a, b);
}
#else
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define HPCATTN_MMA(TYPE)                                                                        \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 "                  \
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                        \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
#else
#define HPCATTN_MMA(TYPE) __trap()  // hpcattn.gpu selects the SIMT kernel below sm_80
#endif
__device__ __forceinline__ void mma16816(float d[4], const unsigned a[4], const unsigned b[2], __half) {
    HPCATTN_MMA("f16");
}
__device__ __forceinline__ void mma16816(float d[4], const unsigned a[4], const unsigned b[2], __nv_bfloat16) {
    HPCATTN_MMA("bf16");
}
#undef HPCATTN_MMA
#endif

// Shared memory (bytes): Qs[BQ][D+8] T, Ks[BK][D+8] T, Vt[D][BK+8] T.
template <typename T, int D, int BK>
__device__ __forceinline__ void attention_fwd_mma(HPCATTN_ATTENTION_PARAMS(T), float4* smem_raw) {
    constexpr int BQ = HPCATTN_BLOCK_Q, THREADS = HPCATTN_THREADS, LD = D + 8, LDV = BK + 8;
    static_assert(BQ == 16 * (THREADS / 32), "each warp owns 16 query rows");
    constexpr int NT = BK / 8;  // n8 score tiles per row block
    constexpr int DT = D / 8;   // n8 output tiles
    static_assert(D % 16 == 0 && BK % 16 == 0, "D and BK must be multiples of 16");
    T* Qs = reinterpret_cast<T*>(smem_raw);
    T* Ks = Qs + BQ * LD;
    T* Vt = Ks + BK * LD;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (heads / kv_heads);
    const long long q0 = (long long)tile * BQ;
    const long long q_stride = (long long)heads * D, kv_stride = (long long)kv_heads * D;
    const T* qb = q + ((long long)b * n_q * heads + h) * D;
    const T* kb = k + ((long long)b * n_k * kv_heads + hk) * D;
    const T* vb = v + ((long long)b * n_k * kv_heads + hk) * D;
    const uint4 zero = {0u, 0u, 0u, 0u};

    for (int idx = tid; idx < BQ * D / 8; idx += THREADS) {
        const int row = idx / (D / 8), c = idx % (D / 8);
        *reinterpret_cast<uint4*>(Qs + row * LD + c * 8) =
            q0 + row < n_q ? *reinterpret_cast<const uint4*>(qb + (q0 + row) * q_stride + c * 8) : zero;
    }
    long long qp[2] = {0, 0}, q_min = 0, q_max = 0;
    if (causal) {
        q_min = q_bounds[2 * tile];
        q_max = q_bounds[2 * tile + 1];
        for (int i = 0; i < 2; ++i) {
            const long long row = q0 + warp * 16 + g + 8 * i;
            qp[i] = row < n_q ? q_pos[row] : q_max;
        }
    }
    __syncthreads();
    unsigned qa[D / 16][4];  // this warp's Q rows as A fragments, for the whole loop
    const T* qw = Qs + (warp * 16 + g) * LD + 2 * t;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        qa[ks][0] = *reinterpret_cast<const unsigned*>(qw + ks * 16);
        qa[ks][1] = *reinterpret_cast<const unsigned*>(qw + 8 * LD + ks * 16);
        qa[ks][2] = *reinterpret_cast<const unsigned*>(qw + ks * 16 + 8);
        qa[ks][3] = *reinterpret_cast<const unsigned*>(qw + 8 * LD + ks * 16 + 8);
    }

    float o[DT][4], m[2] = {-CUDART_INF_F, -CUDART_INF_F}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;

    const int n_tiles = (n_k + BK - 1) / BK;
    for (int kt = 0; kt < n_tiles; ++kt) {
        const long long k0 = (long long)kt * BK;
        bool masked = k0 + BK > n_k;
        if (causal) {
            if (q_max < k_bounds[2 * kt]) continue;  // every key is in every query's future
            masked = masked || q_min < k_bounds[2 * kt + 1];
        }
        __syncthreads();  // the previous tile's K/V are no longer read
        for (int idx = tid; idx < BK * D / 8; idx += THREADS) {
            const int key = idx / (D / 8), c = idx % (D / 8);
            *reinterpret_cast<uint4*>(Ks + key * LD + c * 8) =
                k0 + key < n_k ? *reinterpret_cast<const uint4*>(kb + (k0 + key) * kv_stride + c * 8) : zero;
        }
        for (int idx = tid; idx < BK * D / 8; idx += THREADS) {  // V transposed: Vt[d][key]
            const int key = idx % BK, c = idx / BK;
            const uint4 raw = k0 + key < n_k ? *reinterpret_cast<const uint4*>(vb + (k0 + key) * kv_stride + c * 8)
                                             : zero;
            const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int j = 0; j < 8; ++j) Vt[(c * 8 + j) * LDV + key] = e[j];
        }
        __syncthreads();

        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
            const T* kr = Ks + (nt * 8 + g) * LD + 2 * t;
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
                const unsigned kf[2] = {*reinterpret_cast<const unsigned*>(kr + ks * 16),
                                        *reinterpret_cast<const unsigned*>(kr + ks * 16 + 8)};
                mma16816(s[nt], qa[ks], kf, T());
            }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
        if (masked) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const long long key = k0 + nt * 8 + 2 * t + j;
                    const bool in_range = key < n_k;
                    const long long kp = (causal && in_range) ? k_pos[key] : 0;
#pragma unroll
                    for (int i = 0; i < 2; ++i)
                        if (!in_range || (causal && qp[i] < kp)) s[nt][2 * i + j] = -CUDART_INF_F;
                }
        }
        float alpha[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {  // rows g (i = 0) and g + 8 (i = 1)
            float mx = -CUDART_INF_F;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * i], s[nt][2 * i + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[i], mx);
            const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;
            alpha[i] = exp2f(m[i] - m_use);
            m[i] = m_new;
            float ps = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    s[nt][2 * i + j] = exp2f(s[nt][2 * i + j] - m_use);
                    ps += s[nt][2 * i + j];
                }
            l[i] = l[i] * alpha[i] + ps;  // this lane's columns; reduced at the end
        }
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            o[dt][0] *= alpha[0]; o[dt][1] *= alpha[0];
            o[dt][2] *= alpha[1]; o[dt][3] *= alpha[1];
        }
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            const unsigned pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                    pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                const T* vr = Vt + (dt * 8 + g) * LDV + kk * 16 + 2 * t;
                const unsigned vf[2] = {*reinterpret_cast<const unsigned*>(vr),
                                        *reinterpret_cast<const unsigned*>(vr + 8)};
                mma16816(o[dt], pa, vf, T());
            }
        }
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float lt = l[i];
        lt += __shfl_xor_sync(0xffffffffu, lt, 1);
        lt += __shfl_xor_sync(0xffffffffu, lt, 2);
        const long long row = q0 + warp * 16 + g + 8 * i;
        if (row < n_q) {
            const float inv = lt > 0.f ? 1.f / lt : 0.f;
            T* orow = out + ((long long)b * n_q + row) * q_stride + (long long)h * D + 2 * t;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
                *reinterpret_cast<unsigned*>(orow + dt * 8) = pack2<T>(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
            if (t == 0)
                lse[((long long)b * heads + h) * n_q + row] =
                    lt > 0.f ? (m[i] + log2f(lt)) * CUDART_LN2_F : -CUDART_INF_F;
        }
    }
}

}  // namespace hpcattn
