// Mixture of experts: routing (softmax top-k), grouping of the (token, k) assignments by
// expert, the grouped expert GEMM and the weighted combine. CPU references: ops/moe.rs
// (route_softmax_topk, group_by_expert, moe_experts) and MoeBlock::forward (shared expert).
//
// Per MoE layer, all on one stream and with no host round trip (grids depend only on the
// host-known token count, top-k and expert count):
//   moe_route_topk  one warp per token: probabilities in place, top-k (expert, weight)
//   moe_count       one block per expert: each assignment's rank among its expert's, in
//                   assignment order (a block-wide ballot scan), and the expert's count
//   moe_offsets     one block: offsets (exclusive scan of counts), the table of row tiles
//                   (expert, first grouped row) for the GEMMs, the token of every grouped
//                   row, each token's assignments in ascending expert order for the combine,
//                   and the optional per-expert token statistics
//   moe_gemm_m*     grid (column tiles, upper bound of row tiles): a block finds its tile in
//                   the table and exits if there is none; out[p] = x[row p] · W_eᵀ
//   moe_combine     one block per token: Σ weight · expert output in ascending expert order,
//                   plus Qwen2-MoE's sigmoid-gated shared expert
// Everything is deterministic: no atomics, fixed summation orders.
#include "arbor.cuh"

#define MOE_FULL 0xffffffffu
// A grouped position that holds no assignment (an expert id out of range).
#define MOE_NONE 0xffffffffu

// e^x for x ≤ 0, the CPU's exp_nonpos (ops/softmax.rs): same range reduction and
// polynomial, so probabilities agree within an ulp or two. NaN and x < −87 give 0.
__device__ __forceinline__ float moe_exp_nonpos(float x) {
    const float ROUND = 12582912.0f;  // 1.5·2^23
    const float LN2_HI = 0.693359375f;
    const float LN2_LO = -2.121944400e-4f;
    float xc = fminf(fmaxf(x, -87.0f), 0.0f);
    float t = xc * 1.44269504088896341f + ROUND;
    float n = t - ROUND;
    float r = (xc - n * LN2_HI) - n * LN2_LO;
    float p = 1.0f +
              r * (1.0f +
                   r * (1.0f / 2.0f +
                        r * (1.0f / 6.0f +
                             r * (1.0f / 24.0f +
                                  r * (1.0f / 120.0f + r * (1.0f / 720.0f + r * (1.0f / 5040.0f)))))));
    int n_int = (int)(__float_as_uint(t) - __float_as_uint(ROUND));
    float scale = __uint_as_float((u32)(n_int + 127) << 23);
    return x >= -87.0f ? p * scale : 0.0f;
}

// ---- routing ----

// logits: [rows × experts] f32, replaced by the softmax probabilities (NaN counts as −∞; a
// row of −∞ gives zeros; +∞ entries share 1 equally, as softmax_inplace). Then top_k passes,
// each taking the most probable expert after the previous pick in the order (probability
// descending, index ascending) — the CPU's choice, ties to the lower index. ids/weights:
// [rows × top_k]; with `renormalize` the weights are divided by their sum (summed in k order)
// when it is positive. One warp per row; lanes read back only what they wrote. With
// has_valid, rows from *valid_rows on (a CUDA graph's padding rows) are routed nowhere: expert
// id `experts` (out of range: no grouped row, no statistics, nothing combined), weight 0.
extern "C" __global__ void moe_route_topk(float* __restrict__ logits, int rows,
                                          const u32* __restrict__ valid_rows, int has_valid,
                                          int experts, int top_k, int renormalize,
                                          u32* __restrict__ ids, float* __restrict__ weights) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp: no block-wide synchronisation follows
    if (has_valid && (u32)row >= *valid_rows) {
        for (int k = lane; k < top_k; k += 32) {
            ids[(u64)row * top_k + k] = (u32)experts;
            weights[(u64)row * top_k + k] = 0.0f;
        }
        return;
    }
    float* p = logits + (u64)row * experts;
    float mx = ARBOR_NEG_INF;
    for (int e = lane; e < experts; e += 32) mx = fmaxf(mx, p[e]);
    mx = warp_max(mx);
    if (mx == ARBOR_NEG_INF) {
        for (int e = lane; e < experts; e += 32) p[e] = 0.0f;
    } else if (mx == ARBOR_POS_INF) {
        float n = 0.0f;
        for (int e = lane; e < experts; e += 32) n += p[e] == ARBOR_POS_INF ? 1.0f : 0.0f;
        n = warp_sum(n);
        for (int e = lane; e < experts; e += 32) p[e] = p[e] == ARBOR_POS_INF ? 1.0f / n : 0.0f;
    } else {
        double s = 0.0;
        for (int e = lane; e < experts; e += 32) {
            float v = moe_exp_nonpos(p[e] - mx);
            p[e] = v;
            s += v;
        }
        float inv = (float)(1.0 / warp_sum(s));
        for (int e = lane; e < experts; e += 32) p[e] *= inv;
    }
    u32* out_ids = ids + (u64)row * top_k;
    float* out_w = weights + (u64)row * top_k;
    // Probabilities lie in [0, 1], so (+∞, −1) admits every expert on the first pass.
    float pv = ARBOR_POS_INF;
    int pi = -1;
    float sum = 0.0f;
    for (int k = 0; k < top_k; k++) {
        float bv = -1.0f;
        u32 bi = 0xffffffffu;
        for (int e = lane; e < experts; e += 32) {
            float v = p[e];
            bool after = v < pv || (v == pv && e > pi);
            // A lane visits ascending e, so strict > keeps its lowest index on ties.
            if (after && v > bv) {
                bv = v;
                bi = (u32)e;
            }
        }
        warp_argmax(bv, bi);
        pv = bv;
        pi = (int)bi;
        sum += bv;
        if (lane == 0) {
            out_ids[k] = bi;
            out_w[k] = bv;
        }
    }
    if (renormalize && lane == 0 && sum > 0.0f) {
        for (int k = 0; k < top_k; k++) out_w[k] = out_w[k] / sum;
    }
}

// ---- grouping ----

// Block e (of `experts`): for every assignment a (= token · top_k + k) routed to e, its rank
// among e's assignments in ascending a (so tokens stay in order, as group_by_expert), and
// counts[e]. Each block scans all assignments in tiles of blockDim with a ballot prefix sum;
// every rank is written by exactly one block.
extern "C" __global__ void moe_count(const u32* __restrict__ ids, int assignments, int experts,
                                     u32* __restrict__ rank, u32* __restrict__ counts) {
    __shared__ u32 warp_total[32];
    u32 e = blockIdx.x;
    if (e >= (u32)experts) return;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    u32 running = 0;
    for (int base = 0; base < assignments; base += blockDim.x) {
        int a = base + threadIdx.x;
        bool mine = a < assignments && ids[a] == e;
        u32 mask = __ballot_sync(MOE_FULL, mine);
        if (lane == 0) warp_total[warp] = __popc(mask);
        __syncthreads();
        u32 before = 0, total = 0;
        for (int w = 0; w < warps; w++) {
            u32 c = warp_total[w];
            before += w < warp ? c : 0;
            total += c;
        }
        if (mine) rank[a] = running + before + __popc(mask & ((1u << lane) - 1u));
        running += total;
        __syncthreads();  // warp_total is rewritten by the next tile
    }
    if (threadIdx.x == 0) counts[e] = running;
}

// One block (blockDim a multiple of 32). From counts and ranks:
// - offsets[0..=experts]: expert e's grouped rows are offsets[e]..offsets[e+1];
// - tiles[2i], tiles[2i+1]: expert and first grouped row of row tile i (block_rows rows, an
//   expert's last tile may be partial), *ntiles of them (at most max_tiles);
// - row_token[p]: the token of grouped row p;
// - sorted_pos / sorted_w [rows × top_k]: each token's grouped rows and routing weights in
//   ascending expert order (ties by k), the order the CPU sums them in; MOE_NONE for an
//   expert id out of range, which has no grouped row;
// - with stats_on: stats[stats_row · experts + e] += counts[e] (one writer per element).
// tile_off is scratch of `experts` elements.
extern "C" __global__ void moe_offsets(const u32* __restrict__ ids,
                                       const float* __restrict__ weights,
                                       const u32* __restrict__ rank,
                                       const u32* __restrict__ counts, int rows, int top_k,
                                       int experts, int block_rows, int max_tiles,
                                       u32* __restrict__ offsets, u32* __restrict__ tile_off,
                                       u32* __restrict__ tiles, u32* __restrict__ ntiles,
                                       u32* __restrict__ row_token, u32* __restrict__ sorted_pos,
                                       float* __restrict__ sorted_w, u64* __restrict__ stats,
                                       int stats_row, int stats_on) {
    __shared__ u32 warp_a[32], warp_b[32];
    __shared__ u32 carry_a, carry_b;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    u32 bm = (u32)block_rows;
    if (tid == 0) {
        carry_a = 0;
        carry_b = 0;
    }
    __syncthreads();
    // Exclusive scans of the counts and of the tiles per expert, blockDim experts at a time.
    for (int base = 0; base < experts; base += blockDim.x) {
        int e = base + tid;
        u32 c = e < experts ? counts[e] : 0u;
        u32 tl = (c + bm - 1u) / bm;
        u32 ia = c, ib = tl;
        for (int o = 1; o < 32; o <<= 1) {
            u32 xa = __shfl_up_sync(MOE_FULL, ia, o);
            u32 xb = __shfl_up_sync(MOE_FULL, ib, o);
            if (lane >= o) {
                ia += xa;
                ib += xb;
            }
        }
        if (lane == 31) {
            warp_a[warp] = ia;
            warp_b[warp] = ib;
        }
        __syncthreads();
        u32 wa = 0, wb = 0;
        for (int w = 0; w < warp; w++) {
            wa += warp_a[w];
            wb += warp_b[w];
        }
        u32 ea = carry_a + wa + ia - c, eb = carry_b + wb + ib - tl;
        if (e < experts) {
            offsets[e] = ea;
            tile_off[e] = eb;
            if (stats_on) stats[(u64)stats_row * experts + e] += c;
        }
        __syncthreads();  // every thread has read the carries
        if (tid == blockDim.x - 1) {
            carry_a = ea + c;
            carry_b = eb + tl;
        }
        __syncthreads();
    }
    if (tid == 0) {
        offsets[experts] = carry_a;
        *ntiles = min(carry_b, (u32)max_tiles);
    }
    __syncthreads();  // offsets and tile_off are read below by other threads
    for (int e = tid; e < experts; e += blockDim.x) {
        u32 c = counts[e], o = offsets[e], t0 = tile_off[e];
        for (u32 j = 0; j * bm < c; j++) {
            if (t0 + j >= (u32)max_tiles) break;
            tiles[2 * (t0 + j)] = (u32)e;
            tiles[2 * (t0 + j) + 1] = o + j * bm;
        }
    }
    int assignments = rows * top_k;
    for (int a = tid; a < assignments; a += blockDim.x) {
        u32 e = ids[a];
        int k = a % top_k, first = a - k;
        u32 pos = MOE_NONE;
        if (e < (u32)experts) {
            pos = offsets[e] + rank[a];
            row_token[pos] = (u32)(a / top_k);
        }
        // This assignment's place among its token's, by (expert, k).
        int r = 0;
        for (int j = 0; j < top_k; j++) {
            u32 ej = ids[first + j];
            r += (ej < e || (ej == e && j < k)) ? 1 : 0;
        }
        sorted_pos[first + r] = pos;
        sorted_w[first + r] = weights[a];
    }
}

// ---- grouped GEMM ----

#define MOE_GEMM_WARPS 8

// out[p][n] = Σ_k x[row p][k] · w[e][n][k] for each grouped row p of expert e, f32
// accumulation: w is [experts × n_out × k_in] bf16 (each expert row-major, a Linear weight),
// row p of x is x[row_token[p]] when `gather` (the tokens' normed states), else x[p].
//
// Block (MOE_GEMM_WARPS warps) = row tile (blockIdx.y into the tile table: BM grouped rows
// of one expert) × MOE_GEMM_WARPS·CPW output columns (blockIdx.x); a warp owns CPW columns.
// Per chunk of KC inputs, the tile's x rows are staged in shared memory; then each lane
// takes 8 consecutive inputs at a time (one 16-byte load per weight row, a warp reads 512
// contiguous bytes of each row) against all BM staged rows. So every weight element is read
// once per tile of BM rows: decode (a few rows per expert) streams each active expert's
// weights once. Lane partial sums are reduced by shuffles at the end.
template <int BM, int CPW, int KC>
__device__ __forceinline__ void moe_gemm(const bf16_t* __restrict__ x, int gather,
                                         const u32* __restrict__ row_token,
                                         const bf16_t* __restrict__ w, int n_out, int k_in,
                                         const u32* __restrict__ tiles,
                                         const u32* __restrict__ ntiles,
                                         const u32* __restrict__ offsets,
                                         float* __restrict__ out, bf16_t* xs) {
    u32 tile = blockIdx.y;
    if (tile >= *ntiles) return;  // the whole block: more tiles were launched than exist
    u32 e = tiles[2 * tile], row0 = tiles[2 * tile + 1];
    int m = (int)min((u32)BM, offsets[e + 1] - row0);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int n0 = (blockIdx.x * MOE_GEMM_WARPS + warp) * CPW;
    const bf16_t* we = w + (u64)e * (u64)n_out * (u64)k_in;
    bool vec = (k_in & 7) == 0;  // rows start 16-byte aligned
    float acc[CPW][BM];
#pragma unroll
    for (int c = 0; c < CPW; c++)
#pragma unroll
        for (int r = 0; r < BM; r++) acc[c][r] = 0.0f;

    for (int k0 = 0; k0 < k_in; k0 += KC) {
        int kc = min(KC, k_in - k0);
        __syncthreads();  // the previous chunk's reads of xs are done
        for (int i = threadIdx.x; i < BM * (KC / 8); i += blockDim.x) {
            int r = i / (KC / 8), c = (i % (KC / 8)) * 8;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (r < m && c < kc) {
                u32 p = row0 + (u32)r;
                u32 src = gather ? row_token[p] : p;
                const bf16_t* xr = x + (u64)src * (u64)k_in + k0 + c;
                if (vec) {
                    v = *(const uint4*)xr;
                } else {
                    u32 h[8];
#pragma unroll
                    for (int j = 0; j < 8; j++) h[j] = k0 + c + j < k_in ? (u32)xr[j] : 0u;
                    v = make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16),
                                   h[6] | (h[7] << 16));
                }
            }
            *(uint4*)(xs + r * KC + c) = v;
        }
        __syncthreads();
        for (int kk = lane * 8; kk < kc; kk += 256) {
            float wf[CPW][8];
#pragma unroll
            for (int c = 0; c < CPW; c++) {
                int n = n0 + c;
                if (n < n_out) {
                    const bf16_t* wr = we + (u64)n * (u64)k_in + k0 + kk;
                    if (vec) {
                        uint4 q = *(const uint4*)wr;
                        u32 qs[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
                        for (int j = 0; j < 4; j++) {
                            wf[c][2 * j] = bf16_lo(qs[j]);
                            wf[c][2 * j + 1] = bf16_hi(qs[j]);
                        }
                    } else {
#pragma unroll
                        for (int j = 0; j < 8; j++)
                            wf[c][j] = k0 + kk + j < k_in ? bf16_to_f32(wr[j]) : 0.0f;
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < 8; j++) wf[c][j] = 0.0f;
                }
            }
#pragma unroll
            for (int r = 0; r < BM; r++) {
                uint4 q = *(const uint4*)(xs + r * KC + kk);
                u32 qs[4] = {q.x, q.y, q.z, q.w};
                float xf[8];
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    xf[2 * j] = bf16_lo(qs[j]);
                    xf[2 * j + 1] = bf16_hi(qs[j]);
                }
#pragma unroll
                for (int c = 0; c < CPW; c++)
#pragma unroll
                    for (int j = 0; j < 8; j++) acc[c][r] += wf[c][j] * xf[j];
            }
        }
    }
#pragma unroll
    for (int c = 0; c < CPW; c++)
#pragma unroll
        for (int r = 0; r < BM; r++) {
            float v = warp_sum(acc[c][r]);
            int n = n0 + c;
            if (lane == ((c * BM + r) & 31) && r < m && n < n_out)
                out[(u64)(row0 + (u32)r) * (u64)n_out + n] = v;
        }
}

// Decode-sized tiles (8 rows, 32 columns a block) and prefill-sized ones (32 rows, 16
// columns); the wrapper picks by rows per expert and builds the tile table to match.
// Minimum blocks per SM: ptxas (CUDA 13) fits the 8-row kernel in 128 registers (2 blocks)
// without spills; the 32-row one needs ~145 (1 block of 8 warps, each with 64 independent
// accumulators), and spills when squeezed into 128.
#define MOE_GEMM_ARGS                                                                         \
    const bf16_t *x, int gather, const u32 *row_token, const bf16_t *w, int n_out, int k_in, \
        const u32 *tiles, const u32 *ntiles, const u32 *offsets, float *out
#define MOE_GEMM_KERNEL(BM, CPW, KC, MIN_BLOCKS)                                            \
    extern "C" __global__ void __launch_bounds__(MOE_GEMM_WARPS * 32, MIN_BLOCKS)           \
        moe_gemm_m##BM(MOE_GEMM_ARGS) {                                                      \
        __shared__ __align__(16) bf16_t xs[BM * KC];                                        \
        moe_gemm<BM, CPW, KC>(x, gather, row_token, w, n_out, k_in, tiles, ntiles, offsets, \
                              out, xs);                                                     \
    }
MOE_GEMM_KERNEL(8, 4, 2048, 2)
MOE_GEMM_KERNEL(32, 2, 512, 1)

// ---- combine ----

// out[t] = Σ_i sorted_w[t][i] · y[sorted_pos[t][i]] in ascending expert order (y: [grouped
// rows × hidden]), then with `has_shared` + sigmoid(xn[t] · gate) · shared_y[t]. One block
// per token (blockDim a multiple of 32); writes, never accumulates, out.
extern "C" __global__ void moe_combine(const float* __restrict__ y, int hidden,
                                       const u32* __restrict__ sorted_pos,
                                       const float* __restrict__ sorted_w, int rows, int top_k,
                                       int has_shared, const float* __restrict__ shared_y,
                                       const bf16_t* __restrict__ xn,
                                       const float* __restrict__ gate,
                                       float* __restrict__ out) {
    __shared__ float scratch[32];
    int t = blockIdx.x;
    if (t >= rows) return;
    float g = 0.0f;
    if (has_shared) {
        const bf16_t* xr = xn + (u64)t * hidden;
        float z = 0.0f;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) z += bf16_to_f32(xr[i]) * gate[i];
        z = block_sum(z, scratch);
        g = 1.0f / (1.0f + expf(-z));
    }
    const u32* sp = sorted_pos + (u64)t * top_k;
    const float* sw = sorted_w + (u64)t * top_k;
    float* o = out + (u64)t * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < top_k; i++) {
            u32 p = sp[i];
            if (p != MOE_NONE) acc += sw[i] * y[(u64)p * hidden + c];
        }
        if (has_shared) acc += g * shared_y[(u64)t * hidden + c];
        o[c] = acc;
    }
}
