// Paged causal GQA attention over the bf16 KV pool, f32 queries in, bf16 out.
//
// Batch description (FlashInfer style): row r belongs to sequence row_seq[r] and sits at
// position positions[r]; sequence s owns rows seq_row_indptr[s]..seq_row_indptr[s+1]
// (contiguous) and pages page_indices[page_indptr[s]..page_indptr[s+1]] in position order.
// A row at position p attends positions lo..=p of its sequence, lo = 0, or max(0, p+1-window)
// with a sliding window. Bad device data never reads out of bounds: page ids beyond the pool
// are skipped, positions beyond a sequence's pages attend only what the pages hold.
//
// Two kernels, split by rows per sequence (the wrapper passes the threshold `split`):
// - decode (sequences with fewer than `split` rows): one block per (row, kv head, group of
//   up to G query heads). The block's warps take interleaved blocks of 32 keys; a lane scores
//   one key against every query head (q in shared memory), so each K/V row is read once per
//   block; online softmax per warp, then the warps merge by log-sum-exp.
// - prefill (sequences with at least `split` rows): one block per (tile of consecutive rows of
//   one sequence, kv head); 32 keys at a time are staged in shared memory once per tile and
//   scored against all of the tile's query vectors (rows × heads of the group), causal per row.
#include "arbor.cuh"

#define LOG2E 1.4426950408889634f
#define DEC_MAX_WARPS 8
#define FULL 0xffffffffu
// Query vectors per thread in the prefill kernel (its tile holds PREFILL_J·256/HD of them).
#define PREFILL_J 16

// EPL consecutive bf16 at p (aligned to EPL·2 bytes when EPL is even) as f32.
template <int EPL>
__device__ __forceinline__ void load_bf16(const bf16_t* p, float* out) {
    if constexpr (EPL % 8 == 0) {
#pragma unroll
        for (int c = 0; c < EPL / 8; c++) {
            uint4 w = ((const uint4*)p)[c];
            u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                out[c * 8 + 2 * i] = bf16_lo(ws[i]);
                out[c * 8 + 2 * i + 1] = bf16_hi(ws[i]);
            }
        }
    } else if constexpr (EPL % 2 == 0) {
#pragma unroll
        for (int i = 0; i < EPL / 2; i++) {
            u32 w = ((const u32*)p)[i];
            out[2 * i] = bf16_lo(w);
            out[2 * i + 1] = bf16_hi(w);
        }
    } else {
#pragma unroll
        for (int i = 0; i < EPL; i++) out[i] = bf16_to_f32(p[i]);
    }
}

// Pages of sequence s as [p0, p1) into page_indices, clamped to its length.
__device__ __forceinline__ void seq_pages(const u32* page_indptr, int s, int n_page_indices,
                                          u32* p0, u32* p1) {
    u32 b = min(page_indptr[s + 1], (u32)n_page_indices);
    *p0 = min(page_indptr[s], b);
    *p1 = b;
}

template <int HD, int G>
__device__ __forceinline__ void attn_decode(
    const float* __restrict__ q, bf16_t* __restrict__ out, const u32* __restrict__ positions,
    const u32* __restrict__ row_seq, const u32* __restrict__ seq_row_indptr,
    const u32* __restrict__ page_indptr, const u32* __restrict__ page_indices,
    int n_page_indices, const bf16_t* __restrict__ pool, int layer, int num_pages,
    int page_size, int n_heads, int n_kv_heads, int rows, int seqs, float scale, int window,
    u32 split) {
    // Value dims per lane; below 32 dims (the test fixtures' 16) lanes ≥ HD hold none.
    constexpr int EPL = HD >= 32 ? HD / 32 : 1;
    __shared__ __align__(16) float qs[G][HD];
    __shared__ __align__(16) float acc_s[G][HD];
    __shared__ float red_m[DEC_MAX_WARPS][G], red_l[DEC_MAX_WARPS][G];
    __shared__ float top_m[G], inv_l[G];

    const int row = blockIdx.x, kvh = blockIdx.y;
    const int group = n_heads / n_kv_heads;
    const int g0 = blockIdx.z * G;
    const int ng = min(G, group - g0);
    if (row >= rows || ng <= 0) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    bf16_t* o = out + ((u64)row * n_heads + (u64)kvh * group + g0) * HD;

    const u32 s = row_seq[row];
    if (s >= (u32)seqs) {
        for (int i = threadIdx.x; i < ng * HD; i += blockDim.x) o[i] = 0;
        return;
    }
    if (seq_row_indptr[s + 1] - seq_row_indptr[s] >= split) return;  // the prefill kernel's
    u32 p0, p1;
    seq_pages(page_indptr, s, n_page_indices, &p0, &p1);
    const long long cap = (long long)(p1 - p0) * page_size;
    const long long pos = positions[row];
    const int end = (int)min(pos + 1, cap);
    const int lo = window > 0 ? (int)max(0ll, pos + 1 - window) : 0;

    const float qscale = scale * LOG2E;  // scores in log2 units, for exp2f
    for (int i = threadIdx.x; i < G * HD; i += blockDim.x) {
        int g = i / HD, d = i - g * HD;
        qs[g][d] = g < ng ? q[((u64)row * n_heads + (u64)kvh * group + g0 + g) * HD + d] * qscale
                          : 0.0f;
    }
    __syncthreads();

    float m[G], l[G], acc[G][EPL];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = ARBOR_NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; e++) acc[g][e] = 0.0f;
    }

    for (int kb = lo + warp * 32; kb < end; kb += nw * 32) {  // warp-uniform
        const int key = kb + lane;
        bool valid = key < end;
        u32 page = 0;
        if (valid) {
            page = page_indices[p0 + key / page_size];
            valid = page < (u32)num_pages;
        }
        float sc[G];
#pragma unroll
        for (int g = 0; g < G; g++) sc[g] = 0.0f;
        if (valid) {
            const uint4* kp = (const uint4*)(pool + kv_offset(layer, page, 0, kvh, key % page_size,
                                                              num_pages, n_kv_heads, page_size, HD));
#pragma unroll 4
            for (int c = 0; c < HD / 8; c++) {
                uint4 w = kp[c];
                float k[8] = {bf16_lo(w.x), bf16_hi(w.x), bf16_lo(w.y), bf16_hi(w.y),
                              bf16_lo(w.z), bf16_hi(w.z), bf16_lo(w.w), bf16_hi(w.w)};
#pragma unroll
                for (int g = 0; g < G; g++) {
                    float4 a = *(const float4*)&qs[g][c * 8];
                    float4 b = *(const float4*)&qs[g][c * 8 + 4];
                    sc[g] += a.x * k[0] + a.y * k[1] + a.z * k[2] + a.w * k[3] + b.x * k[4] +
                             b.y * k[5] + b.z * k[6] + b.w * k[7];
                }
            }
        }
        // Online softmax over these 32 keys; sc becomes the weights p.
#pragma unroll
        for (int g = 0; g < G; g++) {
            float x = valid ? sc[g] : ARBOR_NEG_INF;
            float mn = fmaxf(m[g], warp_max(x));
            float p = 0.0f, corr = 1.0f;
            if (mn != ARBOR_NEG_INF) {
                p = valid ? exp2f(x - mn) : 0.0f;
                corr = exp2f(m[g] - mn);  // 0 while m is still −∞
            }
            l[g] = l[g] * corr + warp_sum(p);
            m[g] = mn;
#pragma unroll
            for (int e = 0; e < EPL; e++) acc[g][e] *= corr;
            sc[g] = p;
        }
        // Weighted values: lane owns dims lane·EPL .. +EPL; key k's weight comes from lane k.
        const int nkeys = min(32, end - kb);
        for (int k = 0; k < nkeys; k++) {
            const u32 pg = __shfl_sync(FULL, page, k);
            if (!__shfl_sync(FULL, (int)valid, k)) continue;  // uniform
            const int kk = kb + k;
            float v[EPL];
            const bool has_dims = HD >= 32 || lane * EPL < HD;
            if (has_dims)
                load_bf16<EPL>(pool + kv_offset(layer, pg, 1, kvh, kk % page_size, num_pages,
                                                n_kv_heads, page_size, HD) + lane * EPL, v);
#pragma unroll
            for (int g = 0; g < G; g++) {
                float p = __shfl_sync(FULL, sc[g], k);  // every lane: the shuffle is warp-wide
#pragma unroll
                for (int e = 0; e < EPL; e++)
                    if (has_dims) acc[g][e] += p * v[e];
            }
        }
    }

    // Merge the warps: rescale each to the block's max, then sum in warp order. Only the warps
    // that can hold keys take part, so the result does not depend on the block's warp count
    // (a CUDA graph launches the most warps; an eager step as many as its context needs).
    const int nw_used = max(1, min(nw, (end - lo + 31) / 32));
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            red_m[warp][g] = m[g];
            red_l[warp][g] = l[g];
        }
    }
    __syncthreads();
    if (threadIdx.x < G) {
        int g = threadIdx.x;
        float mx = ARBOR_NEG_INF, sum = 0.0f;
        for (int w = 0; w < nw_used; w++) mx = fmaxf(mx, red_m[w][g]);
        if (mx != ARBOR_NEG_INF)
            for (int w = 0; w < nw_used; w++) sum += red_l[w][g] * exp2f(red_m[w][g] - mx);
        top_m[g] = mx;
        inv_l[g] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
    __syncthreads();
    for (int w = 0; w < nw_used; w++) {  // block-uniform bound: the loop synchronises
        if (warp == w) {
#pragma unroll
            for (int g = 0; g < G; g++) {
                float f = m[g] == ARBOR_NEG_INF ? 0.0f : exp2f(m[g] - top_m[g]);
#pragma unroll
                for (int e = 0; e < EPL; e++) {
                    if (HD < 32 && lane * EPL >= HD) break;
                    float v = acc[g][e] * f;
                    acc_s[g][lane * EPL + e] = w == 0 ? v : acc_s[g][lane * EPL + e] + v;
                }
            }
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < ng * HD; i += blockDim.x) {
        int g = i / HD, d = i - g * HD;
        o[i] = f32_to_bf16(acc_s[g][d] * inv_l[g]);
    }
}

// Prefill/extend: QV = J·R query vectors per tile (R = 256/HD), HD·R threads; thread t owns
// output dim t % HD of query vectors t/HD + j·R, j < J.
template <int HD>
__device__ __forceinline__ void attn_prefill(
    const float* __restrict__ q, bf16_t* __restrict__ out, const u32* __restrict__ positions,
    const u32* __restrict__ seq_row_indptr, const u32* __restrict__ page_indptr,
    const u32* __restrict__ page_indices, int n_page_indices, const bf16_t* __restrict__ pool,
    int layer, int num_pages, int page_size, int n_heads, int n_kv_heads, int seqs,
    int tiles_per_seq, int tile_rows, float scale, int window, u32 split) {
    constexpr int R = 256 / HD, NT = HD * R, NW = NT / 32, J = PREFILL_J, QV = J * R, KT = 32;
    constexpr int KS = HD + 4;  // padded K row: conflict-free 8-byte reads, one key per lane
    constexpr int CHUNKS = QV / 4, CPW = (CHUNKS + NW - 1) / NW;
    __shared__ __align__(16) bf16_t ks[KT * KS];
    __shared__ __align__(16) bf16_t vs[KT * HD];
    __shared__ __align__(16) float ps[QV * KT];
    __shared__ float corr_s[QV], l_s[QV];
    __shared__ int rlast[QV], rlo[QV];
    __shared__ int kv_range[2];

    const int s = blockIdx.x / tiles_per_seq, kvh = blockIdx.y;
    if (s >= seqs) return;
    const int group = n_heads / n_kv_heads;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int d = threadIdx.x % HD, r = threadIdx.x / HD;
    const u32 row0 = seq_row_indptr[s], nrows_seq = seq_row_indptr[s + 1] - row0;
    if (nrows_seq < split) return;  // the decode kernel's
    u32 p0, p1;
    seq_pages(page_indptr, s, n_page_indices, &p0, &p1);
    const long long cap = (long long)(p1 - p0) * page_size;
    const float qscale = scale * LOG2E;

    // Tiles of one sequence are spread over tiles_per_seq blocks; a longer sequence than the
    // grid was sized for still gets all its tiles.
    for (u32 tile = blockIdx.x % tiles_per_seq; tile * (u32)tile_rows < nrows_seq;
         tile += tiles_per_seq) {
        const u32 rbase = row0 + tile * tile_rows;
        const int nrow = (int)min((u32)tile_rows, nrows_seq - tile * tile_rows);
        const int qv_valid = nrow * group;
        __syncthreads();  // the previous tile is done with the shared arrays
        for (int rr = threadIdx.x; rr < nrow; rr += NT) {
            long long pos = positions[rbase + rr];
            rlast[rr] = (int)min(pos, cap - 1);
            rlo[rr] = window > 0 ? (int)max(0ll, pos + 1 - window) : 0;
        }
        __syncthreads();
        if (warp == 0) {
            int lo = 0x7fffffff, hi = -1;
            for (int rr = lane; rr < nrow; rr += 32) {
                lo = min(lo, rlo[rr]);
                hi = max(hi, rlast[rr]);
            }
            for (int o = 16; o > 0; o >>= 1) {
                lo = min(lo, __shfl_xor_sync(FULL, lo, o));
                hi = max(hi, __shfl_xor_sync(FULL, hi, o));
            }
            if (lane == 0) {
                kv_range[0] = lo;
                kv_range[1] = hi + 1;
            }
        }
        __syncthreads();
        const int kv_lo = kv_range[0], kv_hi = kv_range[1];

        float m[CPW][4], l[CPW][4];
#pragma unroll
        for (int t = 0; t < CPW; t++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                m[t][i] = ARBOR_NEG_INF;
                l[t][i] = 0.0f;
            }
        float acc[J];
#pragma unroll
        for (int j = 0; j < J; j++) acc[j] = 0.0f;
        const int jmax = qv_valid > r ? (qv_valid - r + R - 1) / R : 0;

        for (int kt = kv_lo; kt < kv_hi; kt += KT) {
            __syncthreads();  // the previous key tile's readers are done
            for (int i = threadIdx.x; i < KT * (HD / 8); i += NT) {
                const int key = i / (HD / 8), c = i - key * (HD / 8), kpos = kt + key;
                uint4 kw = make_uint4(0, 0, 0, 0), vw = kw;  // zeros: masked keys stay finite
                if (kpos < kv_hi) {
                    u32 page = page_indices[p0 + kpos / page_size];
                    if (page < (u32)num_pages) {
                        u64 ko = kv_offset(layer, page, 0, kvh, kpos % page_size, num_pages,
                                           n_kv_heads, page_size, HD);
                        u64 vo = kv_offset(layer, page, 1, kvh, kpos % page_size, num_pages,
                                           n_kv_heads, page_size, HD);
                        kw = ((const uint4*)(pool + ko))[c];
                        vw = ((const uint4*)(pool + vo))[c];
                    }
                }
                uint2* kd = (uint2*)(ks + key * KS + c * 8);
                kd[0] = make_uint2(kw.x, kw.y);
                kd[1] = make_uint2(kw.z, kw.w);
                *(uint4*)(vs + key * HD + c * 8) = vw;
            }
            __syncthreads();

            // Scores: a warp takes 4 query vectors at a time, a lane one key.
#pragma unroll
            for (int t = 0; t < CPW; t++) {
                const int c = warp + t * NW;
                if (c >= CHUNKS || 4 * c >= qv_valid) continue;  // warp-uniform
                const float4* qp[4];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    int qv = min(4 * c + i, qv_valid - 1);
                    int rr = qv / group, g = qv - rr * group;
                    qp[i] = (const float4*)(q + ((u64)(rbase + rr) * n_heads +
                                                 (u64)kvh * group + g) * HD);
                }
                float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                const uint2* kr = (const uint2*)(ks + lane * KS);
#pragma unroll 2
                for (int dq = 0; dq < HD / 4; dq++) {
                    uint2 w = kr[dq];
                    float k0 = bf16_lo(w.x), k1 = bf16_hi(w.x), k2 = bf16_lo(w.y), k3 = bf16_hi(w.y);
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        float4 a = __ldg(qp[i] + dq);
                        sc[i] += a.x * k0 + a.y * k1 + a.z * k2 + a.w * k3;
                    }
                }
                const int kpos = kt + lane;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int qv = 4 * c + i;
                    bool valid = false;
                    if (qv < qv_valid) {
                        int rr = qv / group;
                        valid = kpos >= rlo[rr] && kpos <= rlast[rr];
                    }
                    float x = valid ? sc[i] * qscale : ARBOR_NEG_INF;
                    float mn = fmaxf(m[t][i], warp_max(x));
                    float p = 0.0f, corr = 1.0f;
                    if (mn != ARBOR_NEG_INF) {
                        p = valid ? exp2f(x - mn) : 0.0f;
                        corr = exp2f(m[t][i] - mn);
                    }
                    l[t][i] = l[t][i] * corr + warp_sum(p);
                    m[t][i] = mn;
                    ps[qv * KT + lane] = p;
                    if (lane == 0) corr_s[qv] = corr;
                }
            }
            __syncthreads();

            // Weighted values.
#pragma unroll
            for (int j = 0; j < J; j++)
                if (j < jmax) acc[j] *= corr_s[r + j * R];
#pragma unroll
            for (int k4 = 0; k4 < KT / 4; k4++) {
                float v0 = bf16_to_f32(vs[(4 * k4 + 0) * HD + d]);
                float v1 = bf16_to_f32(vs[(4 * k4 + 1) * HD + d]);
                float v2 = bf16_to_f32(vs[(4 * k4 + 2) * HD + d]);
                float v3 = bf16_to_f32(vs[(4 * k4 + 3) * HD + d]);
#pragma unroll
                for (int j = 0; j < J; j++) {
                    if (j < jmax) {
                        float4 p = *(const float4*)&ps[(r + j * R) * KT + 4 * k4];
                        acc[j] += p.x * v0 + p.y * v1 + p.z * v2 + p.w * v3;
                    }
                }
            }
        }

        // Normalise and write.
#pragma unroll
        for (int t = 0; t < CPW; t++) {
            const int c = warp + t * NW;
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (c < CHUNKS && 4 * c + i < qv_valid && lane == 0) l_s[4 * c + i] = l[t][i];
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < J; j++) {
            if (j < jmax) {
                const int qv = r + j * R, rr = qv / group, g = qv - rr * group;
                const float sum = l_s[qv];
                const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
                out[((u64)(rbase + rr) * n_heads + (u64)kvh * group + g) * HD + d] =
                    f32_to_bf16(acc[j] * inv);
            }
        }
    }
}

#define DECODE_ARGS                                                                           \
    const float *q, bf16_t *out, const u32 *positions, const u32 *row_seq,                    \
        const u32 *seq_row_indptr, const u32 *page_indptr, const u32 *page_indices,           \
        int n_page_indices, const bf16_t *pool, int layer, int num_pages, int page_size,      \
        int n_heads, int n_kv_heads, int rows, int seqs, float scale, int window, u32 split
#define DECODE_PASS                                                                           \
    q, out, positions, row_seq, seq_row_indptr, page_indptr, page_indices, n_page_indices,    \
        pool, layer, num_pages, page_size, n_heads, n_kv_heads, rows, seqs, scale, window, split
#define DECODE(HD, G)                                                                         \
    extern "C" __global__ void __launch_bounds__(DEC_MAX_WARPS * 32, HD * G <= 1024 ? 2 : 1) \
        attn_decode_h##HD##_g##G(DECODE_ARGS) {                                               \
        attn_decode<HD, G>(DECODE_PASS);                                                      \
    }
#define PREFILL(HD)                                                                           \
    extern "C" __global__ void __launch_bounds__(HD * (256 / HD), 2) attn_prefill_h##HD(         \
        const float *q, bf16_t *out, const u32 *positions, const u32 *seq_row_indptr,         \
        const u32 *page_indptr, const u32 *page_indices, int n_page_indices,                  \
        const bf16_t *pool, int layer, int num_pages, int page_size, int n_heads,             \
        int n_kv_heads, int seqs, int tiles_per_seq, int tile_rows, float scale, int window,  \
        u32 split) {                                                                          \
        attn_prefill<HD>(q, out, positions, seq_row_indptr, page_indptr, page_indices,        \
                         n_page_indices, pool, layer, num_pages, page_size, n_heads,          \
                         n_kv_heads, seqs, tiles_per_seq, tile_rows, scale, window, split);   \
    }
#define HEAD_DIM(HD) DECODE(HD, 1) DECODE(HD, 2) DECODE(HD, 4) DECODE(HD, 8) PREFILL(HD)

// The head dims of the models arbor runs, and 16 for the tiny test fixtures (the templates
// take 16 and any multiple of 32 up to 256; each instance adds ~1/6 to this file's compile
// time). Keep ATTENTION_HEAD_DIMS in cuda/ops/attention.rs in step.

HEAD_DIM(16)
HEAD_DIM(32)
HEAD_DIM(64)
HEAD_DIM(96)
HEAD_DIM(128)
HEAD_DIM(256)
