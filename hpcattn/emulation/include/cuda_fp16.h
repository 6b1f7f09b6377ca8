// Emulated cuda_fp16.h for hpcattn's CPU emulation: IEEE binary16 storage, float conversions
// rounded to nearest even (what __float2half_rn does on the GPU).
#pragma once
#include "cuda_emu.h"

struct __half {
    unsigned short __x;
    static constexpr bool emu_bf16 = false;
};
__device__ inline unsigned short __half_as_ushort(__half h) { return h.__x; }

__device__ inline float __half2float(__half h) { return emu::f16_to_f32(h.__x); }
__device__ inline __half __float2half_rn(float f) { return __half{emu::f32_to_f16_rn(f)}; }
__device__ inline __half __float2half(float f) { return __float2half_rn(f); }
