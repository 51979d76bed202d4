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
#include "arbor.cuh"

typedef unsigned long long ull;

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
// The most top logprobs a row may ask for (the Rust wrapper rejects more).
#define MAX_TOP_LOGPROBS 1024
#define FULL_MASK 0xffffffffu
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

struct Smem {
    ull bins[256];
    ull wsum[SAMPLE_WARPS];
    double dsum[2][SAMPLE_WARPS];
    float fval[SAMPLE_WARPS];
    u32 fidx[SAMPLE_WARPS];
    u32 top_key[MAX_TOP_LOGPROBS];
    u32 top_idx[MAX_TOP_LOGPROBS];
    ull sel_above, target, pbase;
    u32 sel_digit, sel_ok, pick, pos, count;
};

// NaN → −∞, +∞ → FLT_MAX, as the CPU's `clean`.
__device__ __forceinline__ float clean(float v) {
    return v != v ? ARBOR_NEG_INF : fminf(v, ARBOR_FLT_MAX);
}

// Order-preserving map of a (non-NaN) float to u32: ascending keys = Rust's total_cmp order.
__device__ __forceinline__ u32 f2key(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key2f(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
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

__device__ __forceinline__ ull warp_sum_ull(ull v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Sum over the block in a fixed order, so every thread gets the same, reproducible value.
__device__ __forceinline__ ull block_sum_ull(ull v, Smem& sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_ull(v);
    __syncthreads();
    if (lane == 0) sh.wsum[warp] = v;
    __syncthreads();
    return warp_sum_ull(lane < SAMPLE_WARPS ? sh.wsum[lane] : 0ull);
}

// Two f64 sums over the block, as block_sum_ull.
__device__ __forceinline__ void block_sum2_f64(double& a, double& b, Smem& sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    a = warp_sum_f64(a);
    b = warp_sum_f64(b);
    __syncthreads();
    if (lane == 0) {
        sh.dsum[0][warp] = a;
        sh.dsum[1][warp] = b;
    }
    __syncthreads();
    a = warp_sum_f64(lane < SAMPLE_WARPS ? sh.dsum[0][lane] : 0.0);
    b = warp_sum_f64(lane < SAMPLE_WARPS ? sh.dsum[1][lane] : 0.0);
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

// Adds `w` to bins[bin] for the lanes with `take`, one shared atomic per distinct bin of the
// warp (logits crowd into a few bins, and same-address atomics serialise). All lanes call it.
template <bool COUNT>
__device__ __forceinline__ void hist_add(ull* bins, u32 bin, ull w, bool take) {
    u32 active = __ballot_sync(FULL_MASK, take);
    if (!take) return;
    u32 peers = __match_any_sync(active, bin);
    ull sum;
    if (COUNT) {
        sum = (ull)__popc(peers);
    } else {
        // 21-bit limbs: 32 lanes × 2^21 fits the u32 that __reduce_add_sync sums in.
        u32 l0 = __reduce_add_sync(peers, (u32)(w & 0x1fffffull));
        u32 l1 = __reduce_add_sync(peers, (u32)((w >> 21) & 0x1fffffull));
        u32 l2 = __reduce_add_sync(peers, (u32)(w >> 42));
        sum = (ull)l0 + ((ull)l1 << 21) + ((ull)l2 << 42);
    }
    if ((threadIdx.x & 31) == (u32)(__ffs(peers) - 1)) atomicAdd(&bins[bin], sum);
}

struct Selected {
    u32 key;    // the selected key
    ull above;  // weight of the keys above it
    bool ok;
};

// The largest key K such that the weight of keys ≥ K reaches `target` (over elements of
// weight > 0), by 8-bit radix digits from the top. `kw(i, key)` sets element i's key and
// returns its weight (0 leaves it out). With COUNT, weights must be 0 or 1: K is then the
// target-th largest key.
template <bool COUNT, typename KW>
__device__ Selected radix_select(u32 n, ull target, KW kw, Smem& sh) {
    const u32 tid = threadIdx.x, lane = tid & 31;
    u32 prefix = 0, mask = 0;
    ull above = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        if (tid < 256) sh.bins[tid] = 0;
        __syncthreads();
        for (u32 base = 0; base < n; base += SAMPLE_THREADS) {
            u32 i = base + tid, key = 0;
            ull w = i < n ? kw(i, key) : 0ull;
            bool take = w > 0 && (key & mask) == prefix;
            hist_add<COUNT>(sh.bins, (key >> shift) & 255u, w, take);
        }
        __syncthreads();
        if (tid < 32) {
            // Lane l scans digits 255 − 8l … 248 − 8l, descending.
            ull b[8], s = 0;
            for (int j = 0; j < 8; ++j) {
                b[j] = sh.bins[255 - 8 * lane - j];
                s += b[j];
            }
            ull incl = s;
            for (int o = 1; o < 32; o <<= 1) {
                ull v = __shfl_up_sync(FULL_MASK, incl, o);
                if ((int)lane >= o) incl += v;
            }
            ull run = above + incl - s, cand_above = 0;
            int cand = -1;
            for (int j = 0; j < 8; ++j) {
                if (cand < 0 && b[j] > 0 && run + b[j] >= target) {
                    cand = j;
                    cand_above = run;
                }
                run += b[j];
            }
            u32 hit = __ballot_sync(FULL_MASK, cand >= 0);
            if (hit == 0 && lane == 0) sh.sel_ok = 0;
            if (hit != 0 && lane == (u32)(__ffs(hit) - 1)) {
                sh.sel_ok = 1;
                sh.sel_digit = 255 - 8 * lane - cand;
                sh.sel_above = cand_above;
            }
        }
        __syncthreads();
        if (!sh.sel_ok) return Selected{0, 0, false};
        prefix |= sh.sel_digit << shift;
        mask |= 255u << shift;
        above = sh.sel_above;
    }
    return Selected{prefix, above, true};
}

// The first index i < n (ascending) at which the running sum of weight(0..=i) exceeds
// `target_of(total)`, or n if none. Narrows [lo, hi) by slices of 1/32 (one warp each, summed
// coalesced) until 32 elements remain, which warp 0 scans.
template <typename W, typename TF>
__device__ u32 find_position(u32 n, W weight, TF target_of, Smem& sh) {
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    u32 lo = 0, hi = n;
    ull base = 0, target = 0;
    bool first = true;
    while (hi - lo > 32) {
        u32 len = hi - lo;
        u32 slice = ((len + SAMPLE_WARPS - 1) / SAMPLE_WARPS + 31) & ~31u;
        u32 s0 = min(hi, lo + warp * slice), s1 = min(hi, s0 + slice);
        ull acc = 0;
        for (u32 i = s0 + lane; i < s1; i += 32) acc += weight(i);
        acc = warp_sum_ull(acc);
        __syncthreads();
        if (lane == 0) sh.wsum[warp] = acc;
        __syncthreads();
        if (tid == 0) {
            if (first) {
                ull total = 0;
                for (int j = 0; j < SAMPLE_WARPS; ++j) total += sh.wsum[j];
                sh.target = target_of(total);
            }
            ull t = sh.target, b = base;
            u32 pick = SAMPLE_WARPS;
            for (u32 j = 0; j < SAMPLE_WARPS; ++j) {
                if (t < b + sh.wsum[j]) {
                    pick = j;
                    break;
                }
                b += sh.wsum[j];
            }
            sh.pick = pick;
            sh.pbase = b;
        }
        __syncthreads();
        u32 pick = sh.pick;
        if (pick >= SAMPLE_WARPS) return n;
        base = sh.pbase;
        target = sh.target;
        first = false;
        lo += pick * slice;
        hi = min(hi, lo + slice);
    }
    if (warp == 0) {
        u32 i = lo + lane;
        ull w = i < hi ? weight(i) : 0ull;
        ull incl = w;
        for (int o = 1; o < 32; o <<= 1) {
            ull v = __shfl_up_sync(FULL_MASK, incl, o);
            if ((int)lane >= o) incl += v;
        }
        ull t = first ? target_of(__shfl_sync(FULL_MASK, incl, 31)) : target;
        u32 hit = __ballot_sync(FULL_MASK, w > 0 && base + incl > t);
        if (lane == 0) sh.pos = hit ? lo + __ffs(hit) - 1 : n;
    }
    __syncthreads();
    return sh.pos;
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
