// Emulated cuda_bf16.h for hpcattn's CPU emulation: bfloat16 storage (the upper 16 bits of a
// float), conversions rounded to nearest even (what __float2bfloat16_rn does on the GPU).
#pragma once
#include "cuda_emu.h"

struct __nv_bfloat16 {
    unsigned short __x;
};

__device__ inline float __bfloat162float(__nv_bfloat16 h) { return emu::bf16_to_f32(h.__x); }
__device__ inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{emu::f32_to_bf16_rn(f)}; }
__device__ inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
