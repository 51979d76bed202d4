// Sparse attention on the GPU (Quest style): the per-page key summaries and the page
// selection; the cascade kernel (cascade.cu) then reads only the marked pages. CPU reference:
// crates/arbor-kernels/src/kv/summary.rs and src/ops/cascade/sparse.rs, decision for decision.
//
// Summaries: for every (layer, page, KV head) the per-channel min and max of the keys in the
// page's first `slots` slots, bf16 (the min and max of bf16 keys are bf16 values), laid out
// [layer][page][kv_head][min | max][head_dim]. Two kernels keep them up to date:
// - kv_summarise_rows: after a step's K/V store (qkv.cu), one block per (row, KV head); the
//   last row writing into a page (rows of one page are adjacent, in slot order) recomputes the
//   page's summary over slots 0 ..= its own. Padding rows (slots beyond the pool) do nothing.
// - kv_summarise_pages: after page copies, one block per (page, KV head, layer) over the
//   copied slots.
//
// Selection: sparse_select, one block per (selection, KV head). A selection is one sparse
// row's ranked choice (made on the host: its candidate pages in the CPU's order and how many
// to take); the block scores each candidate by the bound Σ_c max(q_c·min_c, q_c·max_c) (the
// max over the query heads of the KV head; the CPU's eight-lane sum, operation for operation),
// finds the take-th largest by radix select, and marks the pages above it and the earliest
// tied ones. Marks are bytes, one per (group page, KV head) in the layout of `mark_index`
// (cascade/sparse.rs); the host pre-marks sinks, local windows, dense groups and rows whose
// budget covers all of their candidates, and rows of one group mark the union.
#include "select.cuh"

#define SELECT_THREADS 256

// Recomputes the summary of (layer, page, kvh) over slots 0 .. slots; the block's threads
// stride over the channels.
__device__ __forceinline__ void summarise_page(const bf16_t* __restrict__ pool,
                                               bf16_t* __restrict__ summ, int layer, u32 page,
                                               int slots, int kvh, int num_pages,
                                               int n_kv_heads, int page_size, int head_dim) {
    const u64 so = (((u64)layer * num_pages + page) * n_kv_heads + kvh) * 2 * head_dim;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
        float mn = ARBOR_POS_INF, mx = ARBOR_NEG_INF;
        for (int s = 0; s < slots; ++s) {
            const u64 ko =
                kv_offset(layer, page, 0, kvh, s, num_pages, n_kv_heads, page_size, head_dim);
            const float k = bf16_to_f32(pool[ko + c]);
            mn = fminf(mn, k);
            mx = fmaxf(mx, k);
        }
        if (slots == 0) mn = mx = 0.0f;
        summ[so + c] = f32_to_bf16(mn);
        summ[so + head_dim + c] = f32_to_bf16(mx);
    }
}

extern "C" __global__ void kv_summarise_rows(const bf16_t* __restrict__ pool,
                                             const u32* __restrict__ slot_mapping, int rows,
                                             int layer, int num_pages, int page_size,
                                             int n_kv_heads, int head_dim,
                                             bf16_t* __restrict__ summ) {
    const int row = blockIdx.x, kvh = blockIdx.y;
    if (row >= rows) return;
    const u32 slot = slot_mapping[row], page = slot / (u32)page_size;
    if (page >= (u32)num_pages) return;
    if (row + 1 < rows && slot_mapping[row + 1] / (u32)page_size == page) return;
    const int in_page = (int)(slot % (u32)page_size);
    summarise_page(pool, summ, layer, page, in_page + 1, kvh, num_pages, n_kv_heads, page_size,
                   head_dim);
}

// pairs: (page, slots) per copied page; grid (pairs, KV heads, layers).
extern "C" __global__ void kv_summarise_pages(const bf16_t* __restrict__ pool,
                                              const u32* __restrict__ pairs, int n,
                                              int num_pages, int page_size, int n_kv_heads,
                                              int head_dim, bf16_t* __restrict__ summ) {
    const int i = blockIdx.x, kvh = blockIdx.y, layer = blockIdx.z;
    if (i >= n) return;
    const u32 page = pairs[2 * i];
    const int slots = (int)min(pairs[2 * i + 1], (u32)page_size);
    if (page >= (u32)num_pages) return;
    summarise_page(pool, summ, layer, page, slots, kvh, num_pages, n_kv_heads, page_size,
                   head_dim);
}

// The CPU's KeySummaries::bound: eight lane sums of max(q·min, q·max), then summed in order.
__device__ __forceinline__ float page_bound(const float* __restrict__ q,
                                            const bf16_t* __restrict__ mn,
                                            const bf16_t* __restrict__ mx, int head_dim) {
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
    for (int c0 = 0; c0 < head_dim; c0 += 8) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int c = c0 + j;
            if (c < head_dim) {
                const float a = __fmul_rn(q[c], bf16_to_f32(mn[c]));
                const float b = __fmul_rn(q[c], bf16_to_f32(mx[c]));
                acc[j] = __fadd_rn(acc[j], fmaxf(a, b));
            }
        }
    }
    float s = acc[0];
#pragma unroll
    for (int j = 1; j < 8; ++j) s = __fadd_rn(s, acc[j]);
    return s;
}

// counts: (selections, candidates) of this step, read from device memory so that a CUDA
// graph launches a block per selection its buffers hold and replays for any step that fits
// (blocks past the count return). sel: (row, take, first candidate, end candidate) per
// selection, with 0 < take < count. Candidates: cand[3c .. 3c+3] = (pool page, mark index for
// KV head 0, pages of its group: the stride between KV heads' marks). keys: scratch of
// n_kv_heads × total candidates u32.
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
sparse_select(const float* __restrict__ q, int n_heads, int n_kv_heads, int head_dim,
              const bf16_t* __restrict__ summ, int layer, int num_pages,
              const u32* __restrict__ counts, const u32* __restrict__ sel,
              const u32* __restrict__ cand, u32* __restrict__ keys,
              unsigned char* __restrict__ marks) {
    __shared__ SelectShared<SELECT_THREADS> sh;
    const u32 s = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    if (s >= counts[0]) return;
    const u32 total_cands = counts[1];
    const u32 row = sel[4 * s], take = sel[4 * s + 1], c0 = sel[4 * s + 2], c1 = sel[4 * s + 3];
    const u32 n = c1 - c0;
    const int gh = n_heads / n_kv_heads;
    u32* key = keys + (u64)h * total_cands + c0;
    for (u32 c = tid; c < n; c += SELECT_THREADS) {
        const u32 page = cand[3 * (c0 + c)];
        float best = ARBOR_NEG_INF;
        if (page < (u32)num_pages) {
            const bf16_t* sm = summ + (((u64)layer * num_pages + page) * n_kv_heads + h) * 2 *
                                          (u64)head_dim;
            for (int i = 0; i < gh; ++i) {
                const float* qv = q + ((u64)row * n_heads + (u64)h * gh + i) * head_dim;
                best = fmaxf(best, page_bound(qv, sm, sm + head_dim, head_dim));
            }
        }
        key[c] = f2key(best);
    }
    if (take == 0 || take >= n) return;  // the host marks these; never launched so
    const Selected k = radix_select<true>(
        n, take,
        [&](u32 i, u32& kk) -> ull {
            kk = key[i];
            return 1ull;
        },
        sh);
    if (!k.ok) return;
    const u32 K = k.key;
    const ull need = (ull)take - k.above;  // ≥ 1 ties at K, earliest candidates first
    const u32 last = find_position(
        n, [&](u32 i) -> ull { return key[i] == K ? 1ull : 0ull; },
        [&](ull) -> ull { return need - 1; }, sh);
    for (u32 c = tid; c < n; c += SELECT_THREADS) {
        const u32 kk = key[c];
        if (kk > K || (kk == K && c <= last)) {
            const u32* cd = cand + 3 * (c0 + c);
            marks[(u64)cd[1] + (u64)h * cd[2]] = 1;
        }
    }
}
