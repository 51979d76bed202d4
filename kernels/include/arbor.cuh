// Shared helpers of arbor's kernels: bf16 conversion, warp and block reductions.
// Kept free of CUDA headers (NVRTC compiles it with no include path); bf16 travels as its
// 16-bit pattern.
#pragma once

typedef unsigned short bf16_t;
typedef unsigned int u32;

// −∞ and +∞ without math headers.
#define ARBOR_NEG_INF __int_as_float(0xff800000)
#define ARBOR_POS_INF __int_as_float(0x7f800000)

// bf16 → f32: the high half of the f32 bit pattern.
__device__ __forceinline__ float bf16_to_f32(bf16_t x) {
    return __uint_as_float(((u32)x) << 16);
}

// f32 → bf16, round to nearest even; NaN stays NaN.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// (max, lowest index holding it) over the warp; every lane gets it.
__device__ __forceinline__ void warp_argmax(float& v, u32& idx) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        u32 oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > v || (ov == v && oi < idx)) {
            v = ov;
            idx = oi;
        }
    }
}

__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// 1 / sqrt(mean square + eps) from a sum of squares in f64, rounded to f32: as the CPU's
// rms_norm (crates/arbor-kernels/src/ops/norm.rs), so rows whose squares overflow f32 still
// normalise.
__device__ __forceinline__ float rms_inv(double sum_sq, int n, float eps) {
    return (float)(1.0 / sqrt(sum_sq / (double)n + (double)eps));
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), in float or double; every
// thread gets it. `scratch` is 32 elements of shared memory; the call synchronises the block.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : (T)0;
    return warp_sum(v);
}

// Max over the block, as block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : ARBOR_NEG_INF;
    return warp_max(v);
}

typedef unsigned long long u64;

// Element offset of (layer, page, k|v, kv_head, slot) in the KV pool laid out
// [layer][page][k|v][kv_head][slot][head_dim] — the formula of cuda/kv.rs (the host pool is
// head-major instead, for CPU streaming), in
// 64 bits (a pool may hold more than 2^31 elements).
__device__ __forceinline__ u64 kv_offset(int layer, u32 page, int kv, int head, int slot,
                                         int num_pages, int num_kv_heads, int page_size,
                                         int head_dim) {
    u64 o = (u64)layer * (u64)num_pages + (u64)page;
    o = (o * 2 + (u64)kv) * (u64)num_kv_heads + (u64)head;
    o = o * (u64)page_size + (u64)slot;
    return o * (u64)head_dim;
}

// The two bf16 halves of a 32-bit word (element 0 in the low half, as in memory).
__device__ __forceinline__ float bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }
