// Emulated math_constants.h (the subset hpcattn's kernels use).
#pragma once
#include <limits>

#define CUDART_INF_F (std::numeric_limits<float>::infinity())
#define CUDART_NAN_F (std::numeric_limits<float>::quiet_NaN())
#define CUDART_LN2_F 0.693147181F
#define CUDART_L2E_F 1.44269502e+0f
