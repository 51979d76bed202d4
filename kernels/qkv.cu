// The attention input stage, fused per row: split the qkv projection, add the bias, RMS-norm
// each q/k head (Qwen3), rotate q and k (RoPE), write q (f32) and store k and v (bf16) into the
// paged KV pool at the row's slot.
#include "arbor.cuh"

#define QKV_THREADS 256
#define QKV_WARPS (QKV_THREADS / 32)
#define QKV_MAX_HEAD_DIM 256

// One block (QKV_THREADS) per row; each warp takes whole heads (q heads, then k, then v).
//   qkv:          [rows × (n_heads + 2·n_kv_heads)·head_dim] f32, q then k then v.
//   bias:         that row width, added when has_bias.
//   q_norm/k_norm: head_dim weights of the per-head RMSNorm, applied when has_q/k_norm.
//   rot_half:     rotated pairs per head (rot_dim/2, rot_dim ≤ head_dim); interleaved picks
//                 pairs (2i, 2i+1), else (i, i + rot_half) (NeoX).
//   inv_freq:     rot_half inverse frequencies; pair i turns by positions[row]·inv_freq[i],
//                 computed in double as the CPU reference does.
//   slot_mapping: page·page_size + slot of each row; a slot beyond the pool skips the store.
//   q_out:        [rows × n_heads·head_dim] f32.
extern "C" __global__ void __launch_bounds__(QKV_THREADS)
qkv_rope_store(const float* __restrict__ qkv, int rows, int n_heads, int n_kv_heads,
               int head_dim, int rot_half, int interleaved, float eps,
               const float* __restrict__ bias, int has_bias,
               const float* __restrict__ q_norm, int has_q_norm,
               const float* __restrict__ k_norm, int has_k_norm,
               const float* __restrict__ inv_freq, const u32* __restrict__ positions,
               const u32* __restrict__ slot_mapping, bf16_t* __restrict__ pool, int layer,
               int num_pages, int page_size, float* __restrict__ q_out) {
    __shared__ float cos_t[QKV_MAX_HEAD_DIM / 2], sin_t[QKV_MAX_HEAD_DIM / 2];
    __shared__ float head_buf[QKV_WARPS][QKV_MAX_HEAD_DIM];
    int row = blockIdx.x;
    if (row >= rows) return;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    double pos = (double)positions[row];
    for (int i = threadIdx.x; i < rot_half; i += blockDim.x) {
        double s, c;
        sincos(pos * (double)inv_freq[i], &s, &c);
        cos_t[i] = (float)c;
        sin_t[i] = (float)s;
    }
    __syncthreads();

    u32 slot = slot_mapping[row];
    u32 page = slot / (u32)page_size;
    int in_page = (int)(slot % (u32)page_size);
    bool store = page < (u32)num_pages;

    int heads = n_heads + 2 * n_kv_heads;
    const float* in = qkv + (u64)row * heads * head_dim;
    float* buf = head_buf[warp];
    for (int h = warp; h < heads; h += QKV_WARPS) {
        int base = h * head_dim;
        int kind = h < n_heads ? 0 : (h < n_heads + n_kv_heads ? 1 : 2);  // q, k, v
        double ss = 0.0;  // in f64, as the CPU: squares of huge values overflow f32
        for (int d = lane; d < head_dim; d += 32) {
            float x = in[base + d];
            if (has_bias) x += bias[base + d];
            buf[d] = x;
            ss += (double)x * (double)x;
        }
        const float* nw = kind == 0 && has_q_norm ? q_norm : (kind == 1 && has_k_norm ? k_norm : 0);
        if (nw) {
            float inv = rms_inv(warp_sum(ss), head_dim, eps);
            // Each lane rescales the elements it wrote.
            for (int d = lane; d < head_dim; d += 32) buf[d] = buf[d] * inv * nw[d];
        }
        __syncwarp();
        for (int d = lane; d < head_dim; d += 32) {
            float x = buf[d], y = x;
            if (kind != 2 && d < 2 * rot_half) {
                if (interleaved) {
                    int i = d >> 1;
                    y = (d & 1) ? buf[d - 1] * sin_t[i] + x * cos_t[i]
                                : x * cos_t[i] - buf[d + 1] * sin_t[i];
                } else if (d < rot_half) {
                    y = x * cos_t[d] - buf[d + rot_half] * sin_t[d];
                } else {
                    int i = d - rot_half;
                    y = buf[i] * sin_t[i] + x * cos_t[i];
                }
            }
            if (kind == 0) {
                q_out[((u64)row * n_heads + h) * head_dim + d] = y;
            } else if (store) {
                int kv_head = kind == 1 ? h - n_heads : h - n_heads - n_kv_heads;
                pool[kv_offset(layer, page, kind - 1, kv_head, in_page, num_pages, n_kv_heads,
                               page_size, head_dim) + d] = f32_to_bf16(y);
            }
        }
        // The next head overwrites buf.
        __syncwarp();
    }
}
