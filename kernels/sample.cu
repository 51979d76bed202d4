// Sampling, one block of SAMPLE_THREADS per row: the GPU twin of the CPU sampler
// (crates/arbor-kernels/src/ops/sample.rs; read its module doc for the rules). The host
// prepares per row: the draw's uniform number u, the cleaned parameters and the penalty
// history as (token, count) pairs.
//
// Passes over the row (V = vocabulary; every pass reads the row from global memory/L2):
//   1   raw max + argmax (and, with penalties, the cleaned copy into `scratch`)
//   1   Σ e and Σ e·d of the raw logits (log-sum-exp, entropy)
//   1   penalised max + argmax (penalties only; the penalties touch history tokens only)
//   4   top-k: radix select of the k-th largest logit (8-bit digits, count histograms)
//   5   top-p: total kept mass, then a radix select of the logit where the mass reaches p
//   1+  draw: per-slice masses, then narrowing to the token (slices of V/32, V/1024, …)
//   6+  top-n logprobs: radix select of the n-th largest, the ties in id order, a gather
// Greedy rows stop after the first three. Masses are fixed-point integers (weight · 2^s with
// V · 2^s < 2^63), so every sum is exact and the result does not depend on the order of
// atomics: a row's output is deterministic. Weights use the CPU's exp_nonpos bit for bit,
// and float arithmetic that the CPU does unfused is written with _rn intrinsics so that
// NVRTC cannot contract it into FMAs.
#include "select.cuh"

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
// The most top logprobs a row may ask for (the Rust wrapper rejects more).
#define MAX_TOP_LOGPROBS 1024
#define FULL_MASK SELECT_FULL_MASK
#define ARBOR_FLT_MAX __int_as_float(0x7f7fffff)

#define FLAG_GREEDY 1u
#define FLAG_PENALTIES 2u
#define FLAG_TOP_P 4u
#define FLAG_MIN_P 8u

// Laid out as `RowParams` in crates/arbor-kernels/src/cuda/ops/sample.rs.
struct RowParams {
    double u;            // the draw's uniform number in [0, 1)
    double top_p;        // in [0, 1) when FLAG_TOP_P
    double ln_min_p;     // ln(min(min_p, 1)) when FLAG_MIN_P
    double temperature;  // the f32 temperature, widened
    float inv_t;         // 1 / temperature, in f32 as the CPU computes it
    float rep;           // repetition penalty (1 = off)
    float presence;
    float frequency;
    u32 top_k;           // 0 = off; else < vocab
    u32 top_n;           // top logprobs to report (≤ min(vocab, MAX_TOP_LOGPROBS))
    u32 top_off;         // first slot of this row in out_top
    u32 hist_start;      // this row's (token, count) pairs
    u32 hist_len;
    u32 scratch_row;     // row of `scratch` holding the penalised logits
    u32 flags;
    u32 pad;
};
static_assert(sizeof(RowParams) == 80, "RowParams must match the Rust struct");

struct Smem : SelectShared<SAMPLE_THREADS> {
    double dsum[2][SAMPLE_WARPS];
    float fval[SAMPLE_WARPS];
    u32 fidx[SAMPLE_WARPS];
    u32 top_key[MAX_TOP_LOGPROBS];
    u32 top_idx[MAX_TOP_LOGPROBS];
    u32 count;
};

// NaN → −∞, +∞ → FLT_MAX, as the CPU's `clean`.
__device__ __forceinline__ float clean(float v) {
    return v != v ? ARBOR_NEG_INF : fminf(v, ARBOR_FLT_MAX);
}

// The CPU's exp_nonpos (crates/arbor-kernels/src/ops/softmax.rs), operation for operation.
__device__ __forceinline__ float exp_nonpos(float x) {
    const float ROUND = 12582912.0f;
    const float LN2_HI = 0.693359375f;
    const float LN2_LO = -2.12194440e-4f;
    float xc = fminf(fmaxf(x, -87.0f), 0.0f);
    float t = __fadd_rn(__fmul_rn(xc, 1.44269504088896340736f), ROUND);
    float n = __fsub_rn(t, ROUND);
    float r = __fsub_rn(__fsub_rn(xc, __fmul_rn(n, LN2_HI)), __fmul_rn(n, LN2_LO));
    float h = __fdiv_rn(1.0f, 5040.0f);
    h = __fadd_rn(__fdiv_rn(1.0f, 720.0f), __fmul_rn(r, h));
    h = __fadd_rn(__fdiv_rn(1.0f, 120.0f), __fmul_rn(r, h));
    h = __fadd_rn(__fdiv_rn(1.0f, 24.0f), __fmul_rn(r, h));
    h = __fadd_rn(__fdiv_rn(1.0f, 6.0f), __fmul_rn(r, h));
    h = __fadd_rn(__fdiv_rn(1.0f, 2.0f), __fmul_rn(r, h));
    h = __fadd_rn(1.0f, __fmul_rn(r, h));
    float p = __fadd_rn(1.0f, __fmul_rn(r, h));
    u32 n_int = __float_as_uint(t) - __float_as_uint(ROUND);
    float scale = __uint_as_float((n_int + 127u) << 23);
    return x >= -87.0f ? __fmul_rn(p, scale) : 0.0f;
}

// Two f64 sums over the block, as block_sum_ull.
__device__ __forceinline__ void block_sum2_f64(double& a, double& b, Smem& sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    a = warp_sum(a);
    b = warp_sum(b);
    __syncthreads();
    if (lane == 0) {
        sh.dsum[0][warp] = a;
        sh.dsum[1][warp] = b;
    }
    __syncthreads();
    a = warp_sum(lane < SAMPLE_WARPS ? sh.dsum[0][lane] : 0.0);
    b = warp_sum(lane < SAMPLE_WARPS ? sh.dsum[1][lane] : 0.0);
}

// (max, lowest index holding it) over the block; every thread gets it.
__device__ __forceinline__ void block_argmax(float& v, u32& idx, Smem& sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int pass = 0; pass < 2; ++pass) {
        warp_argmax(v, idx);
        if (pass == 1) break;
        __syncthreads();
        if (lane == 0) {
            sh.fval[warp] = v;
            sh.fidx[warp] = idx;
        }
        __syncthreads();
        v = lane < SAMPLE_WARPS ? sh.fval[lane] : ARBOR_NEG_INF;
        idx = lane < SAMPLE_WARPS ? sh.fidx[lane] : 0xffffffffu;
    }
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_rows(const float* __restrict__ logits, u32 vocab, const RowParams* __restrict__ params,
            const u32* __restrict__ hist_tok, const u32* __restrict__ hist_cnt,
            float* __restrict__ scratch, u32* __restrict__ out) {
    __shared__ Smem sh;
    // out: 4 words per row (token, logprob, entropy, top count), then 2 per top slot.
    u32* out_top = out + 4 * (size_t)gridDim.x;
    const u32 tid = threadIdx.x, row = blockIdx.x;
    const RowParams p = params[row];
    const float* x = logits + (size_t)row * vocab;
    const bool penal = (p.flags & FLAG_PENALTIES) != 0;
    float* z = penal ? scratch + (size_t)p.scratch_row * vocab : nullptr;
    u32* o = out + (size_t)row * 4;

    // Raw statistics.
    float raw_max = ARBOR_NEG_INF;
    u32 raw_arg = 0xffffffffu;
    for (u32 i = tid; i < vocab; i += SAMPLE_THREADS) {
        float v = clean(x[i]);
        if (penal) z[i] = v;
        if (v > raw_max) {
            raw_max = v;
            raw_arg = i;
        }
    }
    block_argmax(raw_max, raw_arg, sh);
    if (raw_max == ARBOR_NEG_INF) {
        if (tid == 0) {
            o[0] = 0;
            o[1] = __float_as_uint(ARBOR_NEG_INF);
            o[2] = __float_as_uint(0.0f);
            o[3] = 0;
        }
        return;
    }
    double s = 0.0, t = 0.0;
    for (u32 i = tid; i < vocab; i += SAMPLE_THREADS) {
        float d = __fsub_rn(clean(x[i]), raw_max);
        float e = exp_nonpos(d);
        s += (double)e;
        t += (double)__fmul_rn(e, fmaxf(d, -88.0f));
    }
    block_sum2_f64(s, t, sh);
    const double ln_s = log(s);
    auto logprob = [&](float v) {
        return __double2float_rn(__dsub_rn(__dsub_rn((double)v, (double)raw_max), ln_s));
    };

    // Penalties on the working copy.
    float zmax = raw_max;
    u32 zarg = raw_arg;
    if (penal) {
        __syncthreads();
        for (u32 j = tid; j < p.hist_len; j += SAMPLE_THREADS) {
            u32 tok = hist_tok[p.hist_start + j], cnt = hist_cnt[p.hist_start + j];
            float l = z[tok];
            if (l == ARBOR_NEG_INF) continue;
            l = l > 0.0f ? __fdiv_rn(l, p.rep) : __fmul_rn(l, p.rep);
            float sub = __fadd_rn(p.presence, __fmul_rn(p.frequency, __uint2float_rn(cnt)));
            z[tok] = clean(__fsub_rn(l, sub));
        }
        __syncthreads();
        zmax = ARBOR_NEG_INF;
        zarg = 0xffffffffu;
        for (u32 i = tid; i < vocab; i += SAMPLE_THREADS) {
            float v = z[i];
            if (v > zmax) {
                zmax = v;
                zarg = i;
            }
        }
        block_argmax(zmax, zarg, sh);
    }
    auto Z = [&](u32 i) { return penal ? z[i] : clean(x[i]); };

    u32 token;
    if (zmax == ARBOR_NEG_INF) {
        token = raw_arg;  // penalties pushed every token to −∞
    } else if (p.flags & FLAG_GREEDY) {
        token = zarg;
    } else {
        // Fixed point: V · 2^s < 2^63.
        const double scale = ldexp(1.0, 62 - (31 - __clz((int)vocab)));
        auto q = [&](float v) -> ull {
            float w = exp_nonpos(__fmul_rn(__fsub_rn(v, zmax), p.inv_t));
            return __double2ull_rz((double)w * scale);
        };
        float cut = ARBOR_NEG_INF;
        if (p.top_k > 0) {
            Selected k = radix_select<true>(vocab, p.top_k, [&](u32 i, u32& key) -> ull {
                key = f2key(Z(i));
                return 1ull;
            }, sh);
            float kth = key2f(k.key);
            if (k.ok && kth > ARBOR_NEG_INF) cut = kth;
        }
        if (p.flags & FLAG_TOP_P) {
            const float kc = cut;
            ull part = 0;
            for (u32 i = tid; i < vocab; i += SAMPLE_THREADS) {
                float v = Z(i);
                if (v >= kc) part += q(v);
            }
            ull total = block_sum_ull(part, sh);
            double tgt = ceil(p.top_p * (double)total);
            ull target = tgt >= (double)total ? total : (ull)tgt;
            Selected c = radix_select<false>(vocab, target, [&](u32 i, u32& key) -> ull {
                float v = Z(i);
                key = f2key(v);
                return v >= kc ? q(v) : 0ull;
            }, sh);
            if (c.ok) cut = fmaxf(cut, key2f(c.key));
        }
        if (p.flags & FLAG_MIN_P) {
            double m = __dadd_rn((double)zmax, __dmul_rn(p.temperature, p.ln_min_p));
            cut = fmaxf(cut, __double2float_rn(m));
        }
        const float kcut = cut;
        const double u = p.u;
        u32 pos = find_position(
            vocab,
            [&](u32 i) -> ull {
                float v = Z(i);
                return (v > ARBOR_NEG_INF && v >= kcut) ? q(v) : 0ull;
            },
            [&](ull total) -> ull {
                if (total == 0) return ~0ull;
                ull tg = __double2ull_rz(u * (double)total);
                return tg < total ? tg : total - 1;
            },
            sh);
        token = pos < vocab ? pos : zarg;  // no kept mass cannot happen: zmax keeps 2^s
    }
    if (tid == 0) {
        o[0] = token;
        o[1] = __float_as_uint(logprob(clean(x[token])));
        o[2] = __float_as_uint((float)fmax(ln_s - t / s, 0.0));
    }

    // Top-n logprobs of the raw distribution: the n-th largest key K, the keys above it, and
    // the lowest-id ties at K; then ranked by (value desc, id asc).
    const u32 n = p.top_n;
    if (n == 0) {
        if (tid == 0) o[3] = 0;
        return;
    }
    auto raw_key = [&](u32 i) { return f2key(clean(x[i])); };
    Selected k = radix_select<true>(vocab, n, [&](u32 i, u32& key) -> ull {
        key = raw_key(i);
        return 1ull;
    }, sh);
    if (!k.ok) {
        if (tid == 0) o[3] = 0;
        return;
    }
    const u32 K = k.key;
    const ull need = (ull)n - k.above;  // ≥ 1 ties at K to take, lowest ids first
    u32 last = find_position(
        vocab, [&](u32 i) -> ull { return raw_key(i) == K ? 1ull : 0ull; },
        [&](ull) -> ull { return need - 1; }, sh);
    if (tid == 0) sh.count = 0;
    __syncthreads();
    for (u32 i = tid; i < vocab; i += SAMPLE_THREADS) {
        u32 key = raw_key(i);
        if (key > K || (key == K && i <= last)) {
            u32 slot = atomicAdd(&sh.count, 1u);
            if (slot < MAX_TOP_LOGPROBS) {
                sh.top_key[slot] = key;
                sh.top_idx[slot] = i;
            }
        }
    }
    __syncthreads();
    const u32 m = min(min(sh.count, n), (u32)MAX_TOP_LOGPROBS);
    for (u32 a = tid; a < m; a += SAMPLE_THREADS) {
        u32 ka = sh.top_key[a], ia = sh.top_idx[a], rank = 0;
        for (u32 b = 0; b < m; ++b) {
            u32 kb = sh.top_key[b], ib = sh.top_idx[b];
            rank += (kb > ka || (kb == ka && ib < ia)) ? 1u : 0u;
        }
        u32* slot = out_top + 2 * ((size_t)p.top_off + rank);
        slot[0] = ia;
        slot[1] = __float_as_uint(logprob(key2f(ka)));
    }
    if (tid == 0) o[3] = m;
}
