// Shared device helpers for hpcattn kernels: dtype conversion and warp reductions.
//
// Everything here must compile three ways: NVRTC (what CuPy uses at run time), NVRTC in CI for
// sm_80/89/90 without a GPU, and the host C++ compiler through hpcattn/emulation (which supplies
// its own cuda_fp16.h / cuda_bf16.h / math_constants.h). Use only what the emulator provides:
// __syncthreads, __shfl_xor_sync with a full mask, float4/uint2/uint4, the conversions below.
// NVRTC rejects INFINITY: use CUDART_INF_F from math_constants.h.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>

// The parameter list of every attention entry point, in the order of
// hpcattn.gpu.kernels.ATTENTION_FWD_ARGS (the emulation build checks the kinds match).
#define HPCATTN_ATTENTION_PARAMS(T)                                                              \
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,                  \
        T* __restrict__ out, float* __restrict__ lse, const long long* __restrict__ q_pos,      \
        const long long* __restrict__ k_pos, const long long* __restrict__ q_bounds,            \
        const long long* __restrict__ k_bounds, int n_q, int n_k, int heads, int kv_heads,      \
        float scale_log2, int causal
#define HPCATTN_ATTENTION_ARGS \
    q, k, v, out, lse, q_pos, k_pos, q_bounds, k_bounds, n_q, n_k, heads, kv_heads, scale_log2, causal

// extern "C" entry point NAME running IMPL<T, D, BK> on the block's dynamic shared memory.
#define HPCATTN_ATTENTION_ENTRY(NAME, IMPL, T, D, BK)                                            \
    extern "C" __global__ void __launch_bounds__(HPCATTN_THREADS) NAME(HPCATTN_ATTENTION_PARAMS(T)) { \
        extern __shared__ float4 hpcattn_smem[];                                                \
        hpcattn::IMPL<T, D, BK>(HPCATTN_ATTENTION_ARGS, hpcattn_smem);                          \
    }

namespace hpcattn {

// 8 consecutive elements (16-byte aligned for fp16/bf16, 32-byte for float) -> float[8].
__device__ __forceinline__ void load8(const float* p, float f[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

__device__ __forceinline__ void load8(const __half* p, float f[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __half* h = reinterpret_cast<const __half*>(&raw);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = __half2float(h[e]);
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float f[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = __bfloat162float(h[e]);
}

// float4 -> 4 consecutive elements (16-byte aligned for float, 8-byte for fp16/bf16).
__device__ __forceinline__ void store4(float* p, float4 v) {
    *reinterpret_cast<float4*>(p) = v;
}

__device__ __forceinline__ void store4(__half* p, float4 v) {
    uint2 raw;
    __half* h = reinterpret_cast<__half*>(&raw);
    h[0] = __float2half_rn(v.x); h[1] = __float2half_rn(v.y);
    h[2] = __float2half_rn(v.z); h[3] = __float2half_rn(v.w);
    *reinterpret_cast<uint2*>(p) = raw;
}

__device__ __forceinline__ void store4(__nv_bfloat16* p, float4 v) {
    uint2 raw;
    __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(&raw);
    h[0] = __float2bfloat16_rn(v.x); h[1] = __float2bfloat16_rn(v.y);
    h[2] = __float2bfloat16_rn(v.z); h[3] = __float2bfloat16_rn(v.w);
    *reinterpret_cast<uint2*>(p) = raw;
}

// Reductions over groups of 8 consecutive lanes (lane ^ 1, 2, 4 stays inside the group).
__device__ __forceinline__ float group8_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
    return x;
}

__device__ __forceinline__ float group8_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    x += __shfl_xor_sync(0xffffffffu, x, 4);
    return x;
}

}  // namespace hpcattn
