"""kernels/moe.cu on the emulator: route (softmax top-k), count, offsets, grouped GEMM and
combine, chained as the runtime chains them (cuda/ops/moe.rs launch shapes), against numpy:
routing exactly (ids; weights to float rounding), the layer's output by NMSE; with uneven and
empty experts, a graph step's padding rows (routed nowhere), statistics, and a shared expert."""

import numpy as np

from emu import Kernels, both_orders, from_bf16, nmse, to_bf16

ROUTE_WARPS, OFFSETS_THREADS, GEMM_WARPS = 4, 1024, 8
TILE_SMALL, TILE_LARGE = (8, GEMM_WARPS * 4, "moe_gemm_m8"), (32, GEMM_WARPS * 2, "moe_gemm_m32")


def max_tiles(a, experts, bm):
    return -(-a // bm) + min(experts, a)


def route_ref(logits, top_k, renorm):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    # Probability descending, index ascending.
    ids = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, ids, 1)
    if renorm:
        w = w / w.sum(1, keepdims=True)
    return ids, w


def case(seed, rows, valid, experts, top_k, hidden, inter, renorm, shared, skew):
    rng = np.random.default_rng(seed)
    i32 = np.int32
    # Skewed router logits: a few experts take most tokens, some none.
    bias = np.where(rng.random(experts) < skew, -30.0, rng.standard_normal(experts) * 3)
    logits = (rng.standard_normal((rows, experts)) + bias).astype(np.float32)
    x = to_bf16(rng.standard_normal((rows, hidden)).astype(np.float32))
    w = to_bf16((rng.standard_normal((experts, inter, hidden)) / np.sqrt(hidden))
                .astype(np.float32))
    a = rows * top_k
    tile = TILE_LARGE if a >= experts * 16 else TILE_SMALL
    bound = max_tiles(a, experts, tile[0])
    cap_tiles = 2 * max_tiles(a, experts, TILE_SMALL[0])
    shared_y = rng.standard_normal((rows, inter)).astype(np.float32)
    gate = rng.standard_normal(hidden).astype(np.float32) * 0.1
    k = Kernels("moe")

    def go():
        lg = k.buf(logits)
        ids = k.buf(np.full(a, 0xEEEEEEEE, np.uint32))
        wts = k.buf(np.full(a, np.nan, np.float32))
        vr = k.buf(np.array([valid], np.uint32))
        k.launch("moe_route_topk", (-(-rows // ROUTE_WARPS),), (ROUTE_WARPS * 32,),
                 lg, i32(rows), vr, i32(1), i32(experts), i32(top_k), i32(renorm), ids, wts)
        rank = k.buf(np.zeros(a, np.uint32))
        counts = k.buf(np.zeros(experts, np.uint32))
        k.launch("moe_count", (experts,), (256,), ids, i32(a), i32(experts), rank, counts)
        offsets = k.buf(np.zeros(experts + 1, np.uint32))
        tile_off = k.buf(np.zeros(experts, np.uint32))
        tiles = k.buf(np.zeros(cap_tiles, np.uint32))
        ntiles = k.buf(np.zeros(1, np.uint32))
        row_token = k.buf(np.zeros(a, np.uint32))
        sorted_pos = k.buf(np.zeros(a, np.uint32))
        sorted_w = k.buf(np.zeros(a, np.float32))
        stats = k.buf(np.full(2 * experts, 5, np.uint64))
        k.launch("moe_offsets", (1,), (OFFSETS_THREADS,), ids, wts, rank, counts, i32(rows),
                 i32(top_k), i32(experts), i32(tile[0]), i32(bound), offsets, tile_off, tiles,
                 ntiles, row_token, sorted_pos, sorted_w, stats, i32(1), i32(1))
        y = k.buf(np.full((a, inter), np.nan, np.float32))
        k.launch(tile[2], (-(-inter // tile[1]), bound), (GEMM_WARPS * 32,), k.buf(x), i32(1),
                 row_token, k.buf(w), i32(inter), i32(hidden), tiles, ntiles, offsets, y)
        out = k.buf(np.full((rows, inter), np.nan, np.float32))
        # The combine sums expert outputs of width `inter` here (the runtime's down projection
        # is one more grouped GEMM of the same kernel).
        xn = k.buf(x[:, :inter].copy())  # the normed input the shared gate reads (bf16)
        k.launch("moe_combine", (rows,), (256,), y, i32(inter), sorted_pos, sorted_w,
                 i32(rows), i32(top_k), i32(shared), k.buf(shared_y), xn,
                 k.buf(gate[:inter].copy()), out)
        return ids.get(), wts.get(), counts.get(), stats.get(), out.get()

    ids, wts, counts, stats, out = both_orders(k, go)
    want_ids, want_w = route_ref(logits[:valid].astype(np.float64), top_k, renorm)
    ids, wts = ids.reshape(rows, top_k), wts.reshape(rows, top_k)
    assert np.array_equal(ids[:valid], want_ids), "routing picked other experts"
    assert np.all(ids[valid:] == experts) and np.all(wts[valid:] == 0), "padding rows routed"
    werr = float(np.abs(wts[:valid] - want_w).max())
    assert werr < 1e-5, f"routing weights off by {werr}"
    want_counts = np.bincount(want_ids.ravel(), minlength=experts)
    assert np.array_equal(counts, want_counts), "expert counts"
    assert np.array_equal(stats[experts:], want_counts + 5) and np.all(stats[:experts] == 5)
    xf = from_bf16(x).astype(np.float64)
    wf = from_bf16(w).astype(np.float64)
    want = np.zeros((rows, inter))
    for t in range(valid):
        order = np.argsort(want_ids[t], kind="stable")
        for i in order:
            e = want_ids[t, i]
            want[t] += wts[t, i] * (wf[e] @ xf[t])
    if shared:
        g = 1.0 / (1.0 + np.exp(-(xf[:, :inter] @ gate[:inter])))
        want += g[:, None] * shared_y
    e = nmse(out, want)
    empty = int((want_counts == 0).sum())
    return e, tile[2], empty, int(want_counts.max())


CASES = [
    # (seed, rows, valid rows, experts, top_k, hidden, inter, renormalize, shared, skew)
    (1, 1, 1, 8, 2, 64, 48, 1, 0, 0.0),       # Mixtral-like decode of one token
    (2, 16, 13, 60, 4, 128, 40, 0, 1, 0.5),   # Qwen2-MoE-like, padding rows, shared expert
    (3, 64, 64, 128, 8, 96, 24, 1, 0, 0.7),   # Qwen3-MoE-like, many empty experts
    (4, 80, 80, 4, 2, 70, 33, 1, 0, 0.0),     # prefill: 32-row tiles, k not a multiple of 8
]


def main():
    worst = 0.0
    for c in CASES:
        e, kernel, empty, most = case(*c)
        worst = max(worst, e)
        print(f"moe rows {c[1]:3d} (valid {c[2]:3d}) experts {c[3]:3d} top-{c[4]} "
              f"{kernel}: {empty:3d} empty experts, busiest {most:3d}, nmse {e:.2e}")
    assert worst < 1e-6, f"moe: nmse {worst:.2e} over 1e-6"
    return worst


if __name__ == "__main__":
    main()
