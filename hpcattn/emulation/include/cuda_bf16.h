// Emulated cuda_bf16.h for hpcattn's CPU emulation: bfloat16 storage (the upper 16 bits of a
// float), conversions rounded to nearest even (what __float2bfloat16_rn does on the GPU).
#pragma once
#include "cuda_emu.h"

EMU_16BIT_FLOAT(__nv_bfloat16, true, bf16_to_f32, f32_to_bf16_rn, __bfloat162float, __float2bfloat16_rn,
                __float2bfloat16, __bfloat16_as_ushort)
