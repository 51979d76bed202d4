"""kernels/sparse.cu on the emulator: the key summaries (after a step's K/V store, and after
page copies) bit for bit against numpy, and the page selection against a numpy twin of the CPU's
(crates/arbor-kernels/src/ops/cascade/sparse.rs): the same bound, operation for operation in
f32, the `take` highest per (row, KV head), ties to the earlier candidate; marks exact, the
host's pre-marks kept. Launched as cuda/ops/sparse.rs launches them."""

import numpy as np

from check_attention import Pool
from emu import Kernels, both_orders, from_bf16, to_bf16

SELECT_THREADS = 256


def summary_ref(pool, layer, page, kvh, slots):
    """(min, max) bf16 bits of the keys in the page's first `slots` slots."""
    if slots == 0:
        z = np.zeros(pool.hd, np.float32)
        return to_bf16(z), to_bf16(z)
    k = pool.f32[layer, page, 0, kvh, :slots]
    return to_bf16(k.min(0)), to_bf16(k.max(0))


def check_summaries(seed, hd, kv_heads, page_size):
    rng = np.random.default_rng(seed)
    layers, pages = 2, 12
    pool = Pool(rng, layers, pages, kv_heads, page_size, hd)
    # Rows of four sequences: three rows ending a page, two starting one, a single decode row
    # mid-page, a whole page; then padding rows (slots beyond the pool).
    slots = [3 * page_size + s for s in range(page_size - 3, page_size)] + \
            [7 * page_size + 0, 7 * page_size + 1] + [5 * page_size + page_size // 2] + \
            [9 * page_size + s for s in range(page_size)] + [pages * page_size + 5] * 2
    slots = np.array(slots, np.uint32)
    sentinel = np.full((layers, pages, kv_heads, 2, hd), 0xEEEE, np.uint16)
    i32 = np.int32
    k = Kernels("sparse")

    def go():
        summ = k.buf(sentinel)
        k.launch("kv_summarise_rows", (len(slots), kv_heads), (128,), k.buf(pool.bits),
                 k.buf(slots), i32(len(slots)), i32(1), i32(pages), i32(page_size),
                 i32(kv_heads), i32(hd), summ)
        rows_out = summ.get()
        pairs = np.array([[2, page_size], [4, 3], [11, 0], [pages + 3, 4]], np.uint32)
        summ2 = k.buf(sentinel)
        k.launch("kv_summarise_pages", (len(pairs), kv_heads, layers), (128,),
                 k.buf(pool.bits), k.buf(pairs), i32(len(pairs)), i32(pages), i32(page_size),
                 i32(kv_heads), i32(hd), summ2)
        return rows_out, summ2.get()

    rows_out, pages_out = both_orders(k, go)
    want = sentinel.copy()
    # What the last row writing each page covers: slots 0 ..= its own.
    for page, n in [(3, page_size), (7, 2), (5, page_size // 2 + 1), (9, page_size)]:
        for h in range(kv_heads):
            want[1, page, h, 0], want[1, page, h, 1] = summary_ref(pool, 1, page, h, n)
    assert np.array_equal(rows_out, want), "kv_summarise_rows differs"
    want = sentinel.copy()
    for page, n in [(2, page_size), (4, 3), (11, 0)]:
        for layer in range(layers):
            for h in range(kv_heads):
                want[layer, page, h, 0], want[layer, page, h, 1] = \
                    summary_ref(pool, layer, page, h, n)
    assert np.array_equal(pages_out, want), "kv_summarise_pages differs"


def bound_ref(q, mn, mx):
    """KeySummaries::bound over candidates at once: q [hd], mn/mx [n, hd] (f32)."""
    hd = q.shape[0]
    acc = np.zeros((mn.shape[0], 8), np.float32)
    for c in range(hd):
        a = np.float32(q[c]) * mn[:, c]
        b = np.float32(q[c]) * mx[:, c]
        acc[:, c % 8] = acc[:, c % 8] + np.maximum(a, b)
    s = acc[:, 0].copy()
    for j in range(1, 8):
        s = s + acc[:, j]
    return s


def f2key(x):
    b = np.asarray(x, np.float32).view(np.uint32)
    return np.where(b & 0x80000000, ~b, b | 0x80000000).astype(np.uint32)


def check_select(seed, hd, n_heads, kv_heads, n_sel, max_cands, ties):
    rng = np.random.default_rng(seed)
    pages, layers, layer = 300, 2, 1
    gh = n_heads // kv_heads
    summ_f = rng.standard_normal((layers, pages, kv_heads, 2, hd)).astype(np.float32)
    summ_f[..., 0, :], summ_f[..., 1, :] = (np.minimum(summ_f[..., 0, :], summ_f[..., 1, :]),
                                            np.maximum(summ_f[..., 0, :], summ_f[..., 1, :]))
    if ties:
        # Pages 0..9 repeated: candidates with equal bounds.
        summ_f[:, 10:] = summ_f[:, np.arange(10, pages) % 10]
    summ = to_bf16(summ_f)
    summ_v = from_bf16(summ)
    rows = n_sel + 2
    q = rng.standard_normal((rows, n_heads, hd)).astype(np.float32)
    sel, cand = [], []
    n_marks = 4000
    for s in range(n_sel):
        n = int(rng.integers(2, max_cands + 1))
        take = int(rng.integers(1, n))
        c0 = len(cand)
        for _ in range(n):
            stride = int(rng.integers(1, 20))
            cand.append((int(rng.integers(0, pages)), int(rng.integers(0, n_marks - 20 *
                                                                          kv_heads)), stride))
        sel.append((s + 1, take, c0, len(cand)))
    total = len(cand)
    pre = (rng.random(n_marks) < 0.1).astype(np.uint8)
    i32 = np.int32
    k = Kernels("sparse")
    sel_a = np.array(sel, np.uint32).reshape(-1)
    cand_a = np.array(cand, np.uint32).reshape(-1)

    def go():
        marks = k.buf(pre)
        # Three blocks more than selections, as a CUDA graph's capacity launches: they return.
        counts = np.array([n_sel, total], np.uint32)
        k.launch("sparse_select", (n_sel + 3, kv_heads), (SELECT_THREADS,), k.buf(q),
                 i32(n_heads), i32(kv_heads), i32(hd), k.buf(summ), i32(layer), i32(pages),
                 k.buf(counts), k.buf(sel_a), k.buf(cand_a),
                 k.buf(np.zeros(kv_heads * total, np.uint32)), marks)
        return marks.get()

    got = both_orders(k, go)
    want = pre.copy()
    tied = 0
    for row, take, c0, c1 in sel:
        cs = cand[c0:c1]
        pg = np.array([c[0] for c in cs])
        for h in range(kv_heads):
            best = np.full(len(cs), -np.inf, np.float32)
            for i in range(gh):
                b = bound_ref(q[row, h * gh + i], summ_v[layer, pg, h, 0], summ_v[layer, pg, h, 1])
                best = np.fmax(best, b)
            key = f2key(best).astype(np.int64)
            order = np.lexsort((np.arange(len(cs)), -key))  # key descending, index ascending
            tied += int(key[order[take - 1]] == key[order[take]])
            for c in order[:take]:
                want[cs[c][1] + h * cs[c][2]] = 1
    assert np.array_equal(got, want), \
        f"sparse_select marks differ at {np.flatnonzero(got != want)[:10]}"
    return tied


def main():
    for seed, hd, kvh, ps in [(1, 64, 3, 16), (2, 128, 2, 32), (3, 16, 1, 8)]:
        check_summaries(seed, hd, kvh, ps)
        print(f"sparse summaries hd{hd:<3} kv heads {kvh} pages of {ps}: exact")
    for seed, hd, nh, kvh, n_sel, max_cands, ties in [
            (4, 64, 9, 3, 6, 40, False), (5, 128, 8, 2, 3, 700, False),
            (6, 64, 8, 1, 5, 300, True), (7, 32, 7, 7, 4, 30, True)]:
        tied = check_select(seed, hd, nh, kvh, n_sel, max_cands, ties)
        print(f"sparse select hd{hd:<3} gqa{nh // kvh} {n_sel} rows ≤ {max_cands:3d} candidates"
              f"{' (tied bounds)' if ties else ''}: marks exact, {tied} ties at the cut")
    return 0.0


if __name__ == "__main__":
    main()
