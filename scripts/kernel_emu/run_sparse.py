"""Runs kernels/sparse.cu's summaries and page selection on the emulator for inputs a Rust test
prepared (crates/arbor-kernels/tests/cuda/emulator.rs), whose reference is the CPU's own
selection (ops::cascade::select_pages): the test builds the host half with `SparseHostPlan`
exactly as the GPU path does, writes it to DIR, runs
    python3 scripts/kernel_emu/run_sparse.py DIR
and compares DIR/marks.u8 with the pages the CPU selects.

DIR holds meta.txt ("layers pages kv_heads page_size head_dim n_heads layer selections
candidates marks pairs"), pool.u16 (the bf16 pool), pairs.u32 ((page, slots) to summarise in
every layer), q.f32, sel.u32, cand.u32 and init.u8, raw little-endian. Both orders of blocks
and threads must give the same marks.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from emu import Kernels, both_orders  # noqa: E402

SUMMARY_THREADS, SELECT_THREADS = 128, 256  # as cuda/ops/sparse.rs


def main(d):
    (layers, pages, kvh, ps, hd, n_heads, layer, n_sel, n_cands, n_marks,
     n_pairs) = (int(v) for v in open(os.path.join(d, "meta.txt")).read().split())

    def load(name, dtype):
        return np.fromfile(os.path.join(d, name), dtype)

    pool, pairs = load("pool.u16", np.uint16), load("pairs.u32", np.uint32)
    q, sel, cand = load("q.f32", np.float32), load("sel.u32", np.uint32), load("cand.u32", np.uint32)
    init = load("init.u8", np.uint8)
    if pool.size != layers * pages * 2 * kvh * ps * hd or init.size != n_marks:
        raise SystemExit("run_sparse: inputs do not match meta.txt")
    i32 = np.int32
    k = Kernels("sparse")

    def go():
        summ = k.buf(np.zeros(layers * pages * kvh * 2 * hd, np.uint16))
        poolb = k.buf(pool)
        k.launch("kv_summarise_pages", (n_pairs, kvh, layers), (SUMMARY_THREADS,), poolb,
                 k.buf(pairs), i32(n_pairs), i32(pages), i32(ps), i32(kvh), i32(hd), summ)
        marks = k.buf(init)
        if n_sel:
            counts = np.array([n_sel, n_cands], np.uint32)
            k.launch("sparse_select", (n_sel, kvh), (SELECT_THREADS,), k.buf(q), i32(n_heads),
                     i32(kvh), i32(hd), summ, i32(layer), i32(pages), k.buf(counts), k.buf(sel),
                     k.buf(cand), k.buf(np.zeros(max(kvh * n_cands, 1), np.uint32)), marks)
        return marks.get()

    both_orders(k, go).tofile(os.path.join(d, "marks.u8"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: run_sparse.py DIR")
    main(sys.argv[1])
