// Emulated cuda_bf16.h for hpcattn's CPU emulation: bfloat16 storage (the upper 16 bits of a
// float), conversions rounded to nearest even (what __float2bfloat16_rn does on the GPU).
#pragma once
#include "cuda_emu.h"

struct __nv_bfloat16 {
    unsigned short __x;
    static constexpr bool emu_bf16 = true;
};
__device__ inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }

__device__ inline float __bfloat162float(__nv_bfloat16 h) { return emu::bf16_to_f32(h.__x); }
__device__ inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{emu::f32_to_bf16_rn(f)}; }
__device__ inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
