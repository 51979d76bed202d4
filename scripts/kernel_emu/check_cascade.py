"""kernels/cascade.cu (partial + merge) on the emulator, on random search trees, against plain
per-row attention (check_attention.reference), launched as cuda/ops/cascade.rs launches them:
a grid with more task blocks than tasks (the header holds the count), an entry stride above
the entry count, and padding rows with no entries (they must come out as zeros). Sparse
cases pass page marks (as sparse.cu's selection leaves them): each (group, KV head) reads only
its marked pages, checked against a reference that drops the others' keys."""

import numpy as np

from check_attention import Pool, reference
from emu import Kernels, both_orders, from_bf16, nmse

TASK_ROWS, CASCADE_J = 32, 16


def random_tree(rng, depth, width, pages_per_node, page_size):
    """Nodes of whole pages (parent, page count), then per leaf its path of nodes and the
    positions of its rows (1–3 rows at the end, the last page partly filled)."""
    nodes = [(-1, rng.integers(1, pages_per_node + 1))]
    frontier = [0]
    for _ in range(depth - 1):
        nxt = []
        for n in frontier:
            for _ in range(rng.integers(max(1, width // 2), width + 1)):
                nodes.append((n, rng.integers(1, pages_per_node + 1)))
                nxt.append(len(nodes) - 1)
        frontier = nxt
    leaves = []
    for leaf in frontier:
        path, n = [], leaf
        while n >= 0:
            path.append(n)
            n = nodes[n][0]
        path.reverse()
        length = sum(nodes[n][1] for n in path) * page_size - rng.integers(0, page_size)
        nrows = int(rng.integers(1, 4))
        leaves.append((path, list(range(length - nrows, length))))
    return nodes, leaves


def plan(nodes, leaves, page_ids):
    """The CascadePlan arrays: one group per node, an entry per (node, row below it)."""
    rows = [(path, pos) for path, ps in leaves for pos in ps]
    first = {}
    for path, _ in leaves:
        at = 0
        for n in path:
            first[n] = at
            at += nodes[n][1]
    group_page_indptr, flat_pages, group_first_page, group_rows, group_row_indptr = \
        [0], [], [], [], [0]
    entries_of_row = [[] for _ in rows]
    for g in range(len(nodes)):
        flat_pages += page_ids[g]
        group_page_indptr.append(len(flat_pages))
        group_first_page.append(first.get(g, 0))
        for r, (path, _) in enumerate(rows):
            if g in path:
                entries_of_row[r].append(len(group_rows))
                group_rows.append(r)
        group_row_indptr.append(len(group_rows))
    tasks = []
    for g in range(len(nodes)):
        for lo in range(group_row_indptr[g], group_row_indptr[g + 1], TASK_ROWS):
            tasks += [g, lo, min(lo + TASK_ROWS, group_row_indptr[g + 1])]
    row_entry_indptr = np.cumsum([0] + [len(e) for e in entries_of_row])
    u = lambda x: np.array(x, np.uint32)
    return dict(tasks=u(tasks), group_page_indptr=u(group_page_indptr), page_ids=u(flat_pages),
                group_first_page=u(group_first_page), group_rows=u(group_rows),
                row_pos=u([p for _, p in rows]), row_entry_indptr=u(row_entry_indptr),
                row_entries=u([e for es in entries_of_row for e in es]), rows=rows)


def masked_reference(q, pool, pl, page_ids, marks, n_heads, scale, window):
    """Per row and head: attention over the row's context with the keys of pages unmarked for
    (group, KV head) left out; zeros when nothing is left."""
    hd, ps, gh = pool.hd, pool.page_size, n_heads // pool.kv_heads
    gpi, first = pl["group_page_indptr"], pl["group_first_page"]
    out = np.zeros_like(q)
    for r, (path, pos) in enumerate(pl["rows"]):
        lo = max(0, pos + 1 - window) if window else 0
        for h in range(n_heads):
            kvh = h // gh
            keep = []
            for g in path:
                n = len(page_ids[g])
                base = int(gpi[g]) * pool.kv_heads + kvh * n
                for j in range(n):
                    if not marks[base + j]:
                        continue
                    for slot in range(ps):
                        p = (int(first[g]) + j) * ps + slot
                        if lo <= p <= pos:
                            keep.append((page_ids[g][j], slot))
            if not keep:
                continue
            k = np.stack([pool.f32[1, pg, 0, kvh, sl] for pg, sl in keep])
            v = np.stack([pool.f32[1, pg, 1, kvh, sl] for pg, sl in keep])
            s = (k @ q[r, h * hd:(h + 1) * hd].astype(np.float64)) * scale
            w = np.exp(s - s.max())
            out[r, h * hd:(h + 1) * hd] = (w / w.sum()) @ v
    return out


def case(seed, hd, n_heads, kv_heads, depth, width, window=0, page_size=16, pad_rows=3,
         sparse=False):
    rng = np.random.default_rng(seed)
    nodes, leaves = random_tree(rng, depth, width, 3, page_size)
    total = sum(int(n[1]) for n in nodes)
    pool = Pool(rng, 2, total + 2, kv_heads, page_size, hd)
    free = [int(p) for p in rng.permutation(pool.pages)]
    page_ids = [[free.pop() for _ in range(int(n[1]))] for n in nodes]
    pl = plan(nodes, leaves, page_ids)
    rows = len(pl["rows"])
    q = rng.standard_normal((rows + pad_rows, n_heads * hd)).astype(np.float32)
    q[rows:] = 0.0
    gh = n_heads // kv_heads
    entries = len(pl["group_rows"])
    stride = 1 << (entries + 5).bit_length()  # a capacity above the entries, as PlanLayout's
    n_tasks = len(pl["tasks"]) // 3
    task_blocks = 1 << n_tasks.bit_length()  # more blocks than tasks
    rei = np.concatenate([pl["row_entry_indptr"],
                          np.full(pad_rows, pl["row_entry_indptr"][-1], np.uint32)])
    i32 = np.int32
    k = Kernels("cascade")
    # Sparse: about 60% of the (group page, KV head) marks set, so tiles of none occur too.
    marks = (rng.random(len(pl["page_ids"]) * kv_heads) < 0.6).astype(np.uint8) if sparse \
        else None

    def go():
        bufs = [k.buf(np.array([n_tasks], np.uint32))] + [
            k.buf(pl[a]) for a in ("tasks", "group_page_indptr", "page_ids", "group_first_page",
                                   "group_rows", "row_pos")]
        part_o = k.buf(np.full(stride * n_heads * hd, np.nan, np.float32))
        part_lse = k.buf(np.full(stride * n_heads, np.nan, np.float32))
        qb, poolb = k.buf(q), k.buf(pool.bits)
        scale = np.float32(1.0 / np.sqrt(hd))
        mk = k.buf(marks) if sparse else k.null()
        k.launch(f"cascade_partial_h{hd}", (task_blocks, kv_heads), (hd * (256 // hd),),
                 qb, *bufs, poolb, i32(1), i32(pool.pages), i32(page_size), i32(n_heads),
                 i32(kv_heads), i32(stride), scale, i32(window), mk, part_o, part_lse)
        out = k.buf(np.full((rows + pad_rows, n_heads * hd), 0x7FC0, np.uint16))
        k.launch("cascade_merge", (rows + pad_rows,), (256,), part_o, part_lse, k.buf(rei),
                 k.buf(pl["row_entries"]), i32(rows + pad_rows), i32(n_heads), i32(kv_heads),
                 i32(hd), i32(stride), out)
        return out.get()

    got = from_bf16(both_orders(k, go))
    if sparse:
        want = masked_reference(q[:rows], pool, pl, page_ids, marks, n_heads,
                                1.0 / np.sqrt(hd), window)
    else:
        seqs = [([p for n in path for p in page_ids[n]], [pos]) for path, pos in pl["rows"]]
        want = reference(q[:rows], pool, 1, seqs, n_heads, 1.0 / np.sqrt(hd), window)
    assert np.all(got[rows:] == 0.0), "padding rows must be zeros"
    return nmse(got[:rows], want), rows, len(nodes), entries


CASES = [
    # (seed, head_dim, heads, kv heads, depth, width, window)
    (1, 64, 9, 3, 1, 1, 0),
    (2, 64, 9, 3, 3, 3, 0),
    (3, 128, 8, 2, 4, 2, 0),
    (4, 16, 4, 4, 2, 6, 0),
    (5, 32, 7, 1, 3, 2, 0),
    (6, 64, 8, 1, 2, 4, 24),
    (7, 16, 8, 2, 6, 1, 0),
    (8, 128, 16, 2, 2, 40, 0),  # a root of 40+ rows: several tasks, 4 rows per pass
]
# Sparse (marked pages), with page sizes 16 (two pages per key tile) and 64 (one).
SPARSE_CASES = [
    # (seed, head_dim, heads, kv heads, depth, width, window, page size)
    (11, 64, 9, 3, 3, 3, 0, 16),
    (12, 128, 8, 2, 2, 5, 0, 16),
    (13, 32, 7, 1, 4, 2, 40, 16),
    (14, 64, 8, 4, 2, 3, 0, 64),
]


def main():
    worst = 0.0
    for seed, hd, nh, kvh, depth, width, window in CASES:
        e, rows, groups, entries = case(seed, hd, nh, kvh, depth, width, window)
        worst = max(worst, e)
        print(f"cascade hd{hd:<3} gqa{nh // kvh} depth {depth} width {width:<2} "
              f"window {window:<2}: {rows:3d} rows, {groups:3d} groups, {entries:4d} entries, "
              f"nmse {e:.2e}")
    for seed, hd, nh, kvh, depth, width, window, ps in SPARSE_CASES:
        e, rows, groups, entries = case(seed, hd, nh, kvh, depth, width, window, ps,
                                        sparse=True)
        worst = max(worst, e)
        print(f"cascade hd{hd:<3} gqa{nh // kvh} depth {depth} width {width:<2} "
              f"window {window:<2} sparse, pages of {ps}: {rows:3d} rows, {groups:3d} groups, "
              f"nmse {e:.2e}")
    assert worst < 1e-4, f"cascade: nmse {worst:.2e} over 1e-4"
    return worst


if __name__ == "__main__":
    main()
