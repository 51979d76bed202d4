// KV pool utilities: copy-on-write page copies, and f32 ↔ bf16 casts.
#include "arbor.cuh"

// copies holds n triples (src page, dst page, slots). For each triple, every layer, K and V
// and every KV head, the first `slots` positions of src are copied to dst (the host pool's
// copy_page). One block per (triple, layer, k|v, head). Triples must be independent (no page
// both a source and a destination); the wrapper checks that and the page bounds.
extern "C" __global__ void copy_pages(const u32* __restrict__ copies, int n, bf16_t* pool,
                                      int num_layers, int num_pages, int num_kv_heads,
                                      int page_size, int head_dim) {
    u64 per_copy = (u64)num_layers * 2 * num_kv_heads;
    u64 b = blockIdx.x;
    u64 c = b / per_copy;
    if (c >= (u64)n) return;
    int combo = (int)(b - c * per_copy);
    int head = combo % num_kv_heads;
    int kv = (combo / num_kv_heads) % 2;
    int layer = combo / (2 * num_kv_heads);
    u32 src = copies[3 * c], dst = copies[3 * c + 1], slots = copies[3 * c + 2];
    if (src >= (u32)num_pages || dst >= (u32)num_pages || slots > (u32)page_size) return;
    const bf16_t* s = pool + kv_offset(layer, src, kv, head, 0, num_pages, num_kv_heads,
                                       page_size, head_dim);
    bf16_t* d = pool + kv_offset(layer, dst, kv, head, 0, num_pages, num_kv_heads, page_size,
                                 head_dim);
    u32 count = slots * (u32)head_dim;
    for (u32 i = threadIdx.x; i < count; i += blockDim.x) d[i] = s[i];
}

// y = bf16(x) (round to nearest even), n elements, grid-stride.
extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ x,
                                            bf16_t* __restrict__ y, u64 n) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = f32_to_bf16(x[i]);
}

// y = f32(x) (exact), n elements, grid-stride.
extern "C" __global__ void cast_bf16_to_f32(const bf16_t* __restrict__ x,
                                            float* __restrict__ y, u64 n) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = bf16_to_f32(x[i]);
}
