"""kernels/qkv.cu (qkv_rope_store) on the emulator, launched as cuda/ops/qkv.rs launches it,
against numpy following the CPU decoder layer's steps: bias add, per-head RMSNorm
(ops::rms_norm_rows), RoPE (ops::RopeTable, NeoX and interleaved, partial and over-long
rot_dim, linear and Llama 3 scaling, far positions), KvPool::write at the row's slot.
Rows come from sequences with scattered block tables at page-unaligned positions, plus graph
padding rows (position 0, slot u32::MAX) and one row whose slot is just past the pool. q is
compared by NMSE; V in the pool bit for bit; K within one bf16 ulp; every pool element no row
maps to (other layers, other slots, padding rows) must keep its sentinel."""

import numpy as np

from check_elementwise import bf16_close
from emu import Kernels, both_orders, from_bf16, nmse, to_bf16

THREADS = 256
EPS = np.float32(1e-6)
SENTINEL = 0xEEEE
PAD_SLOT = 0xFFFFFFFF


def inv_freq(rot_dim, base, scaling):
    """RopeTable::new: base^(-2i/rot_dim) in f64 rounded to f32, then the scaling in f32."""
    f32 = np.float32
    i = np.arange(rot_dim // 2, dtype=np.float64)
    f = (1.0 / np.power(np.float64(base), 2.0 * i / rot_dim)).astype(f32)
    if scaling is None:
        return f
    if scaling[0] == "linear":
        return (f / f32(scaling[1])).astype(f32)
    _, factor, low, high, old = scaling  # Llama 3
    factor, low, high, old = f32(factor), f32(low), f32(high), f32(old)
    low_wl, high_wl = old / low, old / high
    out = f.copy()
    for j, fj in enumerate(f):
        wl = f32(2.0 * np.pi) / fj
        if wl > low_wl:
            out[j] = fj / factor
        elif wl >= high_wl:
            smooth = (old / wl - low) / (high - low)
            out[j] = (f32(1.0) - smooth) * fj / factor + smooth * fj
    return out


def rms_rows(x, w):
    """ops::rms_norm_rows on [..., head_dim]: mean square in f64, scale in f32."""
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    inv = (1.0 / np.sqrt(ms + np.float64(EPS))).astype(np.float32)
    return (x * inv) * w


def rope(x, positions, freqs, half, interleaved):
    """RopeTable::apply on [rows, heads, head_dim]: angles in f64, rotation in f32."""
    ang = positions.astype(np.float64)[:, None] * freqs[:half].astype(np.float64)[None, :]
    c = np.cos(ang).astype(np.float32)[:, None, :]
    s = np.sin(ang).astype(np.float32)[:, None, :]
    y = x.copy()
    if interleaved:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        y[..., 0:2 * half:2] = a * c - b * s
        y[..., 1:2 * half:2] = a * s + b * c
    else:
        a, b = x[..., :half], x[..., half:2 * half]
        y[..., :half] = a * c - b * s
        y[..., half:2 * half] = a * s + b * c
    return y


def step(rng, specs, page_size, num_pages, pad_rows, past_pool):
    """Rows of sequences with (context before, new rows), each with its own random block
    table; then `past_pool` rows mapped just past the pool and `pad_rows` graph padding rows.
    Returns positions and slot mapping (u32)."""
    free = list(rng.permutation(num_pages))
    positions, slots = [], []
    for before, new in specs:
        # Only the pages the new rows land in matter here: the table holds those.
        table = {p: int(free.pop()) for p in range(before // page_size,
                                                   -(-(before + new) // page_size))}
        for pos in range(before, before + new):
            positions.append(pos)
            slots.append(table[pos // page_size] * page_size + pos % page_size)
    for _ in range(past_pool):
        positions.append(int(rng.integers(0, 5000)))
        slots.append(num_pages * page_size)
    positions += [0] * pad_rows
    slots += [PAD_SLOT] * pad_rows
    return np.array(positions, np.uint32), np.array(slots, np.uint32)


def case(seed, nh, nkv, hd, rot_dim, interleaved, bias, norms, page_size, specs,
         scaling=None, pad_rows=2, past_pool=1):
    """norms: which heads are RMS-normed, "" or any of "q" and "k"."""
    rng = np.random.default_rng(seed)
    i32 = np.int32
    layers, layer = 3, 1
    need = sum(-(-(b + n) // page_size) - b // page_size for b, n in specs)
    num_pages = need + 3
    positions, slots = step(rng, specs, page_size, num_pages, pad_rows, past_pool)
    rows = len(positions)
    heads = nh + 2 * nkv
    width = heads * hd
    half = min(rot_dim, hd) // 2
    freqs = inv_freq(rot_dim, 10000.0, scaling)
    assert len(freqs) >= half
    qkv = (rng.standard_normal((rows, width)) * 2).astype(np.float32)
    qkv[0] *= 1e20  # squares of 1e40 overflow f32: the norms sum in f64, as the CPU's
    bias_w = (rng.standard_normal(width) * 0.5).astype(np.float32)
    qn = (rng.standard_normal(hd) * 1.5).astype(np.float32)
    kn = (rng.standard_normal(hd) * 1.5).astype(np.float32)
    pool0 = np.full((layers, num_pages, 2, nkv, page_size, hd), SENTINEL, np.uint16)
    qd = nh * hd
    has_qn, has_kn = int("q" in norms), int("k" in norms)
    k = Kernels("qkv")

    def go():
        fb = k.buf(freqs)
        q_out = k.buf(np.full(rows * qd + 3, np.nan, np.float32))  # a tail no row owns
        pool = k.buf(pool0)
        # Absent weights: a flag of 0 and the inv_freq pointer, as the wrapper passes them.
        k.launch("qkv_rope_store", (rows,), (THREADS,), k.buf(qkv), i32(rows), i32(nh),
                 i32(nkv), i32(hd), i32(half), i32(interleaved), EPS,
                 k.buf(bias_w) if bias else fb, i32(bias), k.buf(qn) if has_qn else fb,
                 i32(has_qn), k.buf(kn) if has_kn else fb, i32(has_kn), fb,
                 k.buf(positions), k.buf(slots), pool, i32(layer), i32(num_pages),
                 i32(page_size), q_out)
        return q_out.get(), pool.get()

    q_got, pool_got = both_orders(k, go)

    # The reference: the CPU decoder layer's steps.
    x = qkv + bias_w if bias else qkv.copy()
    q = x[:, :qd].reshape(rows, nh, hd)
    kk = x[:, qd:qd + nkv * hd].reshape(rows, nkv, hd)
    v = x[:, qd + nkv * hd:].reshape(rows, nkv, hd)
    if has_qn:
        q = rms_rows(q, qn)
    if has_kn:
        kk = rms_rows(kk, kn)
    q = rope(q, positions, freqs, half, interleaved)
    kk = rope(kk, positions, freqs, half, interleaved)
    want = pool0.copy()
    k_ref = np.zeros(want.shape, np.float32)  # unrounded K where a row stores it
    written = np.zeros(want.shape, bool)
    for r in range(rows):
        page, slot = divmod(int(slots[r]), page_size)
        if page >= num_pages:
            continue
        want[layer, page, 0, :, slot] = to_bf16(kk[r])
        want[layer, page, 1, :, slot] = to_bf16(v[r])
        k_ref[layer, page, 0, :, slot] = kk[r]
        written[layer, page, 0, :, slot] = True

    assert np.all(np.isnan(q_got[rows * qd:])), "q written past its rows"
    eq = nmse(q_got[:rows * qd].reshape(rows, nh, hd), q)
    # V is the biased input rounded once: exact. So is every element no row maps to.
    assert np.array_equal(pool_got[~written], want[~written]), \
        "pool: V differs, or an element no row maps to was written"
    # K went through f32 arithmetic the reference does in another order: one ulp.
    assert bf16_close(pool_got[written], k_ref[written]), "pool: K off by more than a bf16 ulp"
    ek = nmse(from_bf16(pool_got[written]), from_bf16(want[written]))
    return max(eq, ek), rows


LLAMA3 = ("llama3", 8.0, 1.0, 4.0, 8192)
CASES = [
    # (name, heads, kv heads, head_dim, rot_dim, interleaved, bias, norms, page size,
    #  [(context before, new rows)], scaling)
    ("neox hd64 gqa3 decode", 9, 3, 64, 64, 0, 0, "", 16, [(37, 1), (70, 1), (0, 1)], None),
    ("neox hd128 gqa4 qwen2 bias", 8, 2, 128, 128, 0, 1, "", 16, [(13, 40), (5, 2)], None),
    ("neox hd128 gqa7 qwen2-7b bias", 28, 4, 128, 128, 0, 1, "", 16, [(60, 3), (0, 9)],
     None),
    ("interleaved hd128 gqa4 llama3-8b", 32, 8, 128, 128, 1, 0, "", 32, [(8190, 4)], LLAMA3),
    ("neox hd128 gqa8 qwen3 norm", 8, 1, 128, 128, 0, 1, "qk", 32, [(40, 5)], None),
    ("interleaved hd64 gqa1 bias", 4, 4, 64, 64, 1, 1, "", 8, [(3, 11), (17, 1)], None),
    ("interleaved hd16 gqa7 q norm", 7, 1, 16, 16, 1, 0, "q", 8, [(6, 7)], None),
    ("neox hd96 gqa3 llama3 far", 6, 2, 96, 96, 0, 0, "", 16, [(100_000, 3)], LLAMA3),
    ("interleaved hd128 gqa4 linear far", 4, 1, 128, 128, 1, 0, "qk", 16, [(31_000, 2)],
     ("linear", 4.0)),
    ("neox hd64 partial rot 32 k norm", 4, 2, 64, 32, 0, 0, "k", 16, [(9, 4)], None),
    ("interleaved hd24 partial rot 10", 3, 3, 24, 10, 1, 1, "qk", 8, [(15, 3)], None),
    ("neox hd8 rot_dim past head_dim", 8, 1, 8, 12, 0, 0, "qk", 8, [(2, 5)], None),
    ("neox hd256 gqa1 no rotation", 2, 2, 256, 0, 0, 1, "", 16, [(20, 2)], None),
    ("interleaved hd256 gqa8 norm", 8, 1, 256, 256, 1, 0, "qk", 32, [(33, 2)], None),
]


def main():
    worst = 0.0
    for i, (name, nh, nkv, hd, rot, il, bias, norms, ps, specs, sc) in enumerate(CASES):
        e, rows = case(100 + i, nh, nkv, hd, rot, il, bias, norms, ps, specs, sc)
        worst = max(worst, e)
        print(f"qkv {name:34s} rows {rows:2d} nmse {e:.2e}")
    assert worst < 1e-5, f"qkv: nmse {worst:.2e} over 1e-5"
    return worst


if __name__ == "__main__":
    main()
