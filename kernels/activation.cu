// SwiGLU: silu(gate) · up, from the stacked gate/up projection.
#include "arbor.cuh"

// silu(g) = g · sigmoid(g), with the sigmoid from exp(−|g|) only (never overflows), as the
// CPU reference computes it; silu(−∞) = 0 and NaN stays NaN.
__device__ __forceinline__ float silu(float g) {
    float e = expf(-fabsf(g));
    float s = g >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
    return (s == 0.0f && g < 0.0f) ? 0.0f : g * s;
}

// gu is [rows × 2·inter] (each row: inter gate values, then inter up values);
// out[r][j] = bf16(silu(gate[r][j]) · up[r][j]). Grid-stride over rows × inter.
extern "C" __global__ void swiglu(const float* __restrict__ gu, int rows, int inter,
                                  bf16_t* __restrict__ out) {
    u64 n = (u64)rows * (u64)inter;
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        u64 r = i / (u64)inter, j = i - r * (u64)inter;
        const float* row = gu + r * 2 * (u64)inter;
        out[i] = f32_to_bf16(silu(row[j]) * row[inter + j]);
    }
}
