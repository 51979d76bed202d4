// Block-wide selection over n elements, for blocks of THREADS threads (a multiple of 32, at
// most 1024): radix select of the k-th largest key or of a weight quantile, and the position
// where a running sum crosses a target. Used by the sampler (top-k, top-p, the draw, top
// logprobs) and by sparse page selection. Weights are 64-bit integers, so every sum is exact
// and no result depends on the order of atomics.
#pragma once
#include "arbor.cuh"

typedef unsigned long long ull;

#define SELECT_FULL_MASK 0xffffffffu

// The shared memory the helpers below use (one per block).
template <int THREADS>
struct SelectShared {
    ull bins[256];
    ull wsum[THREADS / 32];
    ull sel_above, target, pbase;
    u32 sel_digit, sel_ok, pick, pos;
};

// Order-preserving map of a (non-NaN) float to u32: ascending keys = Rust's total_cmp order.
__device__ __forceinline__ u32 f2key(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key2f(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ ull warp_sum_ull(ull v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(SELECT_FULL_MASK, v, o);
    return v;
}

// Sum over the block in a fixed order, so every thread gets the same, reproducible value.
template <int THREADS>
__device__ __forceinline__ ull block_sum_ull(ull v, SelectShared<THREADS>& sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_ull(v);
    __syncthreads();
    if (lane == 0) sh.wsum[warp] = v;
    __syncthreads();
    return warp_sum_ull(lane < THREADS / 32 ? sh.wsum[lane] : 0ull);
}

// Adds `w` to bins[bin] for the lanes with `take`, one shared atomic per distinct bin of the
// warp (keys crowd into a few bins, and same-address atomics serialise). All lanes call it.
template <bool COUNT>
__device__ __forceinline__ void hist_add(ull* bins, u32 bin, ull w, bool take) {
    u32 active = __ballot_sync(SELECT_FULL_MASK, take);
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
template <bool COUNT, int THREADS, typename KW>
__device__ Selected radix_select(u32 n, ull target, KW kw, SelectShared<THREADS>& sh) {
    const u32 tid = threadIdx.x, lane = tid & 31;
    u32 prefix = 0, mask = 0;
    ull above = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (u32 i = tid; i < 256; i += THREADS) sh.bins[i] = 0;
        __syncthreads();
        for (u32 base = 0; base < n; base += THREADS) {
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
                ull v = __shfl_up_sync(SELECT_FULL_MASK, incl, o);
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
            u32 hit = __ballot_sync(SELECT_FULL_MASK, cand >= 0);
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
// `target_of(total)`, or n if none. Narrows [lo, hi) by slices of 1/(THREADS/32) (one warp
// each, summed coalesced) until 32 elements remain, which warp 0 scans.
template <int THREADS, typename W, typename TF>
__device__ u32 find_position(u32 n, W weight, TF target_of, SelectShared<THREADS>& sh) {
    constexpr u32 WARPS = THREADS / 32;
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    u32 lo = 0, hi = n;
    ull base = 0, target = 0;
    bool first = true;
    while (hi - lo > 32) {
        u32 len = hi - lo;
        u32 slice = ((len + WARPS - 1) / WARPS + 31) & ~31u;
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
                for (u32 j = 0; j < WARPS; ++j) total += sh.wsum[j];
                sh.target = target_of(total);
            }
            ull t = sh.target, b = base;
            u32 pick = WARPS;
            for (u32 j = 0; j < WARPS; ++j) {
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
        if (pick >= WARPS) return n;
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
            ull v = __shfl_up_sync(SELECT_FULL_MASK, incl, o);
            if ((int)lane >= o) incl += v;
        }
        ull t = first ? target_of(__shfl_sync(SELECT_FULL_MASK, incl, 31)) : target;
        u32 hit = __ballot_sync(SELECT_FULL_MASK, w > 0 && base + incl > t);
        if (lane == 0) sh.pos = hit ? lo + __ffs(hit) - 1 : n;
    }
    __syncthreads();
    return sh.pos;
}
