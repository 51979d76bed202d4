// Cascade (tree) attention over the bf16 KV pool, f32 queries in, bf16 out; the GPU side of
// crate::ops::cascade (CPU reference: attend.rs + merge.rs). Sparse attention: with `marks`
// (made by sparse.cu's sparse_select; null = dense) a group reads, per KV head, only the pages
// marked for it, one byte per (group page, KV head) at group_page_indptr[g]·n_kv_heads +
// kv_head·pages(g) + page; key tiles with no marked page are skipped.
//
// The plan (CascadePlan, flat CSR, uploaded as it is): group g holds pages
// page_ids[group_page_indptr[g] ..][..], covering absolute positions
// group_first_page[g]·page_size .. (+pages)·page_size of each of its sequences, and entries
// group_row_indptr[g] .. group_row_indptr[g+1] (an entry e is the pair (g, group_rows[e])).
// Row r at position row_pos[r] reads the positions of the group in max(0, p+1-window) ..= p.
// Row r's entries are row_entries[row_entry_indptr[r] ..][..].
//
// Two kernels:
// - cascade_partial_h{HD}: one block per (task, kv head); a task is a run of at most a few
//   dozen entries of one group (made on the host). The task count is read from device memory
//   (header[0]) and the grid may be larger (blocks beyond it return at once), so that a CUDA
//   graph's launch stays valid while the tree's shape changes. The block walks the group's positions that
//   any of its rows reads, 32 keys at a time staged in shared memory, scores them against
//   every (row, query head of the KV head) of the task (QV = 16·(256/HD) query vectors per
//   pass; a task with more loops over passes), online softmax in log2 units, and writes per
//   (entry, head) the normalised partial output and its natural-log LSE (−∞ when the row
//   reads nothing there) into part_o [kv_head][entry][head in group][HD] and part_lse
//   [kv_head][entry][head in group] (the CPU's layout), with entry_stride (≥ the entries)
//   entries per KV head.
// - cascade_merge: one block per row: merges the row's partials by LSE exactly as
//   merge_states does and writes bf16 out [rows][n_heads][HD]; a row with no live partial
//   (or no entry: the padding rows of a graph step) writes zeros.
// Bad device data never reads out of bounds: page ids beyond the pool read as zeros.
#include "arbor.cuh"

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define FULL 0xffffffffu
// Query vectors per pass per 256/HD threads (as PREFILL_J in attention.cu).
#define CASCADE_J 16
#define KT 32

template <int HD>
__device__ __forceinline__ void cascade_partial(
    const float* __restrict__ q, const u32* __restrict__ header, const u32* __restrict__ tasks,
    const u32* __restrict__ group_page_indptr, const u32* __restrict__ page_ids,
    const u32* __restrict__ group_first_page, const u32* __restrict__ group_rows,
    const u32* __restrict__ row_pos, const bf16_t* __restrict__ pool, int layer, int num_pages,
    int page_size, int n_heads, int n_kv_heads, int entry_stride, float scale, int window,
    const unsigned char* __restrict__ marks, float* __restrict__ part_o,
    float* __restrict__ part_lse) {
    constexpr int R = 256 / HD, NT = HD * R, NW = NT / 32, J = CASCADE_J, QV = J * R;
    constexpr int KS = HD + 4;  // padded K row: one key per lane, fewer bank conflicts
    constexpr int CPW = (QV + NW - 1) / NW;
    __shared__ __align__(16) bf16_t ks[KT * KS];
    __shared__ __align__(16) bf16_t vs[KT * HD];
    __shared__ float ps[QV * KT];
    __shared__ float corr_s[QV], m_s[QV], l_s[QV];
    __shared__ int rlo[QV], rhi[QV];
    __shared__ int kv_range[2];

    const int task = blockIdx.x, kvh = blockIdx.y;
    if (task >= (int)header[0]) return;
    const int gh = n_heads / n_kv_heads;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int d = threadIdx.x % HD, r = threadIdx.x / HD;
    const u32 g = tasks[3 * task], e_begin = tasks[3 * task + 1], e_end = tasks[3 * task + 2];
    const u32 gp0 = group_page_indptr[g], gp1 = group_page_indptr[g + 1];
    const long long g_lo = (long long)group_first_page[g] * page_size;
    const long long g_hi = g_lo + (long long)(gp1 - gp0) * page_size;
    const float qscale = scale * LOG2E;  // scores in log2 units, for exp2f
    // This (group, KV head)'s page marks, or null when every page is read.
    const unsigned char* gm =
        marks ? marks + (u64)gp0 * n_kv_heads + (u64)kvh * (gp1 - gp0) : nullptr;
    auto marked = [&](int kpos) { return gm == nullptr || gm[kpos / page_size] != 0; };
    const int rows_per_pass = QV / gh;   // >= 1 (checked by the wrapper)

    for (u32 e0 = e_begin; e0 < e_end; e0 += rows_per_pass) {
        const int nrow = (int)min((u32)rows_per_pass, e_end - e0);
        const int qv_valid = nrow * gh;
        __syncthreads();  // the previous pass is done with the shared arrays
        for (int i = threadIdx.x; i < nrow; i += NT) {
            const long long pos = row_pos[group_rows[e0 + i]];
            long long lo = window > 0 ? pos + 1 - window : 0;
            lo = max(lo, g_lo);
            const long long hi = min(pos + 1, g_hi);
            rlo[i] = (int)(lo - g_lo);  // local to the group
            rhi[i] = (int)max(hi - g_lo, (long long)(lo - g_lo));
        }
        __syncthreads();
        if (warp == 0) {
            int lo = 0x7fffffff, hi = 0;
            for (int i = lane; i < nrow; i += 32) {
                if (rlo[i] < rhi[i]) {
                    lo = min(lo, rlo[i]);
                    hi = max(hi, rhi[i]);
                }
            }
            for (int o = 16; o > 0; o >>= 1) {
                lo = min(lo, __shfl_xor_sync(FULL, lo, o));
                hi = max(hi, __shfl_xor_sync(FULL, hi, o));
            }
            if (lane == 0) {
                kv_range[0] = lo;
                kv_range[1] = hi;
            }
        }
        __syncthreads();
        const int kv_lo = kv_range[0], kv_hi = kv_range[1];

        float m[CPW], l[CPW];
#pragma unroll
        for (int t = 0; t < CPW; t++) {
            m[t] = ARBOR_NEG_INF;
            l[t] = 0.0f;
        }
        float acc[J];
#pragma unroll
        for (int j = 0; j < J; j++) acc[j] = 0.0f;

        for (int kt = kv_lo; kt < kv_hi; kt += KT) {
            if (gm) {
                // Skipped by every thread alike: the marks are the same for the whole block.
                bool any = false;
                const int last = min(kt + KT, kv_hi) - 1;
                for (int pg = kt / page_size; pg <= last / page_size; ++pg) any |= gm[pg] != 0;
                if (!any) continue;
            }
            __syncthreads();  // the previous key tile's readers are done
            for (int i = threadIdx.x; i < KT * (HD / 8); i += NT) {
                const int key = i / (HD / 8), c = i - key * (HD / 8), kpos = kt + key;
                uint4 kw = make_uint4(0, 0, 0, 0), vw = kw;  // zeros: masked keys stay finite
                if (kpos < kv_hi && marked(kpos)) {
                    const u32 pi = gp0 + (u32)(kpos / page_size);
                    const u32 page = pi < gp1 ? page_ids[pi] : 0xffffffffu;
                    if (page < (u32)num_pages) {
                        const int slot = kpos % page_size;  // g_lo is page-aligned
                        u64 ko = kv_offset(layer, page, 0, kvh, slot, num_pages, n_kv_heads,
                                           page_size, HD);
                        u64 vo = kv_offset(layer, page, 1, kvh, slot, num_pages, n_kv_heads,
                                           page_size, HD);
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

            // Scores and online softmax: warp w owns query vectors w, w + NW, …; a lane one key.
#pragma unroll
            for (int t = 0; t < CPW; t++) {
                const int qv = warp + t * NW;
                if (qv >= QV) continue;  // warp-uniform
                if (qv >= qv_valid) {
                    ps[qv * KT + lane] = 0.0f;
                    if (lane == 0) corr_s[qv] = 1.0f;
                    continue;
                }
                const int rr = qv / gh, gi = qv - rr * gh;
                const u32 row = group_rows[e0 + rr];
                const float4* qp =
                    (const float4*)(q + ((u64)row * n_heads + (u64)kvh * gh + gi) * HD);
                const uint2* kr = (const uint2*)(ks + lane * KS);
                float s = 0.0f;
#pragma unroll 4
                for (int dq = 0; dq < HD / 4; dq++) {
                    const uint2 w = kr[dq];
                    const float4 a = __ldg(qp + dq);
                    s += a.x * bf16_lo(w.x) + a.y * bf16_hi(w.x) + a.z * bf16_lo(w.y) +
                         a.w * bf16_hi(w.y);
                }
                const int kpos = kt + lane;
                const bool valid = kpos >= rlo[rr] && kpos < rhi[rr] && marked(kpos);
                const float x = valid ? s * qscale : ARBOR_NEG_INF;
                const float mn = fmaxf(m[t], warp_max(x));
                float p = 0.0f, corr = 1.0f;
                if (mn != ARBOR_NEG_INF) {
                    p = valid ? exp2f(x - mn) : 0.0f;
                    corr = exp2f(m[t] - mn);  // 0 while m is still −∞
                }
                l[t] = l[t] * corr + warp_sum(p);
                m[t] = mn;
                ps[qv * KT + lane] = p;
                if (lane == 0) corr_s[qv] = corr;
            }
            __syncthreads();

            // Weighted values: thread (d, r) owns dim d of query vectors r + j·R.
#pragma unroll
            for (int j = 0; j < J; j++) {
                const int qv = r + j * R;
                if (qv >= qv_valid) continue;
                float a = acc[j] * corr_s[qv];
                const float* pr = ps + qv * KT;
#pragma unroll 8
                for (int k = 0; k < KT; k++) a += pr[k] * bf16_to_f32(vs[k * HD + d]);
                acc[j] = a;
            }
        }

        // Final (m, l) of each query vector to shared, then normalise and write.
#pragma unroll
        for (int t = 0; t < CPW; t++) {
            const int qv = warp + t * NW;
            if (qv < qv_valid && lane == 0) {
                m_s[qv] = m[t];
                l_s[qv] = l[t];
            }
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < J; j++) {
            const int qv = r + j * R;
            if (qv >= qv_valid) continue;
            const int rr = qv / gh, gi = qv - rr * gh;
            const u64 slot = ((u64)kvh * entry_stride + e0 + rr) * gh + gi;
            const float lsum = l_s[qv];
            part_o[slot * HD + d] = lsum > 0.0f ? acc[j] / lsum : 0.0f;
            if (d == 0)
                part_lse[slot] = lsum > 0.0f ? (m_s[qv] + log2f(lsum)) * LN2 : ARBOR_NEG_INF;
        }
    }
}

#define PARTIAL_ARGS                                                                           \
    const float *q, const u32 *header, const u32 *tasks, const u32 *group_page_indptr,       \
        const u32 *page_ids, const u32 *group_first_page, const u32 *group_rows,              \
        const u32 *row_pos, const bf16_t *pool, int layer, int num_pages, int page_size,      \
        int n_heads, int n_kv_heads, int entry_stride, float scale, int window,                \
        const unsigned char *marks, float *part_o, float *part_lse
#define PARTIAL_CALL(HD)                                                                       \
    cascade_partial<HD>(q, header, tasks, group_page_indptr, page_ids, group_first_page,      \
                        group_rows, row_pos, pool, layer, num_pages, page_size, n_heads,      \
                        n_kv_heads, entry_stride, scale, window, marks, part_o, part_lse)

// The head dims of attention.cu (ATTENTION_HEAD_DIMS), written out so that the compile check
// sees every kernel's name.
extern "C" __global__ void __launch_bounds__(256) cascade_partial_h16(PARTIAL_ARGS) {
    PARTIAL_CALL(16);
}
extern "C" __global__ void __launch_bounds__(256) cascade_partial_h32(PARTIAL_ARGS) {
    PARTIAL_CALL(32);
}
extern "C" __global__ void __launch_bounds__(256) cascade_partial_h64(PARTIAL_ARGS) {
    PARTIAL_CALL(64);
}
extern "C" __global__ void __launch_bounds__(192) cascade_partial_h96(PARTIAL_ARGS) {
    PARTIAL_CALL(96);
}
extern "C" __global__ void __launch_bounds__(256) cascade_partial_h128(PARTIAL_ARGS) {
    PARTIAL_CALL(128);
}
extern "C" __global__ void __launch_bounds__(256) cascade_partial_h256(PARTIAL_ARGS) {
    PARTIAL_CALL(256);
}

// One block per row (grid.x = rows): out[row][h][d] = Σ_e w_e·o_e / Σ_e w_e with
// w_e = exp(lse_e − max lse), over the row's entries; zeros when no entry is live.
extern "C" __global__ void cascade_merge(const float* __restrict__ part_o,
                                         const float* __restrict__ part_lse,
                                         const u32* __restrict__ row_entry_indptr,
                                         const u32* __restrict__ row_entries, int rows,
                                         int n_heads, int n_kv_heads, int head_dim,
                                         int entry_stride, bf16_t* __restrict__ out) {
    const int row = blockIdx.x;
    if (row >= rows) return;
    const int gh = n_heads / n_kv_heads;
    const u32 a = row_entry_indptr[row], b = row_entry_indptr[row + 1];
    bf16_t* o = out + (u64)row * n_heads * head_dim;
    for (int i = threadIdx.x; i < n_heads * head_dim; i += blockDim.x) {
        const int h = i / head_dim, d = i - h * head_dim;
        const int kvh = h / gh, gi = h - kvh * gh;
        float mx = ARBOR_NEG_INF;
        for (u32 k = a; k < b; k++) {
            const u64 slot = ((u64)kvh * entry_stride + row_entries[k]) * gh + gi;
            mx = fmaxf(mx, part_lse[slot]);
        }
        float res = 0.0f;
        if (mx != ARBOR_NEG_INF) {
            float s = 0.0f, acc = 0.0f;
            for (u32 k = a; k < b; k++) {
                const u64 slot = ((u64)kvh * entry_stride + row_entries[k]) * gh + gi;
                const float l = part_lse[slot];
                if (l == ARBOR_NEG_INF) continue;
                const float w = expf(l - mx);
                s += w;
                acc += w * part_o[slot * head_dim + d];
            }
            res = acc * (1.0f / s);
        }
        o[i] = f32_to_bf16(res);
    }
}
