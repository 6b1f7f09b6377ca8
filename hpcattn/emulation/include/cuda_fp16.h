// Emulated cuda_fp16.h for hpcattn's CPU emulation: IEEE binary16 storage, float conversions
// rounded to nearest even (what __float2half_rn does on the GPU).
#pragma once
#include "cuda_emu.h"

EMU_16BIT_FLOAT(__half, false, f16_to_f32, f32_to_f16_rn, __half2float, __float2half_rn, __float2half,
                __half_as_ushort)
