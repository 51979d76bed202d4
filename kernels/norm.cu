// RMSNorm (plain and fused with the residual add), a plain residual add, and a row gather for
// picking logit rows.
// One block per row; the mean square is summed in f64 (as the CPU does: squares of huge
// values overflow f32), per thread, then over the block.
#include "arbor.cuh"

// out[r] = bf16(x[r] / sqrt(mean(x[r]²) + eps) · w), for r < rows.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float eps, int rows, int hidden,
                                    bf16_t* __restrict__ out) {
    __shared__ double scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (u64)r * hidden;
    double ss = 0.0;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += (double)xr[i] * (double)xr[i];
    float inv = rms_inv(block_sum(ss, scratch), hidden, eps);
    bf16_t* o = out + (u64)r * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = f32_to_bf16(xr[i] * inv * w[i]);
}

// x[r] += delta[r] (in place, f32), then out[r] = bf16(rmsnorm(x[r]) · w).
extern "C" __global__ void add_rms_norm(float* __restrict__ x, const float* __restrict__ delta,
                                        const float* __restrict__ w, float eps, int rows,
                                        int hidden, bf16_t* __restrict__ out) {
    __shared__ double scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    float* xr = x + (u64)r * hidden;
    const float* dr = delta + (u64)r * hidden;
    double ss = 0.0;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = xr[i] + dr[i];
        xr[i] = v;
        ss += (double)v * (double)v;
    }
    float inv = rms_inv(block_sum(ss, scratch), hidden, eps);
    bf16_t* o = out + (u64)r * hidden;
    // Each thread reads back only the elements it wrote above.
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = f32_to_bf16(xr[i] * inv * w[i]);
}

// x[i] += delta[i] for i < n, grid-stride: the last layer's residual add (the output norm runs
// on the logit rows only, so there is no norm to fuse with).
extern "C" __global__ void add_inplace(float* __restrict__ x, const float* __restrict__ delta,
                                       u64 n) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) x[i] += delta[i];
}

// out[i] = x[idx[i]] (rows of `width` f32), for i < n; an index at or beyond `src_rows`
// yields a row of zeros.
extern "C" __global__ void gather_rows(const float* __restrict__ x, int width, int src_rows,
                                       const u32* __restrict__ idx, int n,
                                       float* __restrict__ out) {
    int i = blockIdx.x;
    if (i >= n) return;
    u32 s = idx[i];
    float* o = out + (u64)i * width;
    if (s >= (u32)src_rows) {
        for (int j = threadIdx.x; j < width; j += blockDim.x) o[j] = 0.0f;
        return;
    }
    const float* xr = x + (u64)s * width;
    for (int j = threadIdx.x; j < width; j += blockDim.x) o[j] = xr[j];
}
