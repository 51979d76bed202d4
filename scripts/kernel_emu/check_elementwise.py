"""kernels/norm.cu (rms_norm, add_rms_norm, add_inplace, gather_rows), kernels/embedding.cu
and kernels/activation.cu (swiglu) on the emulator, launched as cuda/ops/{norm,embedding,
activation}.rs launch them, against numpy written from the CPU ops (ops::rms_norm with its f64
mean square, ops::add_rms_norm, ops::embedding, ops::swiglu). bf16 outputs must lie within one
bf16 ulp of the unrounded reference (NMSE against the rounded one is reported); the residual
adds, the row gather and the embedding gather are exact, including their zero rows for
indices out of range; outputs carry a NaN tail or sentinel no thread may write."""

import numpy as np

from emu import Kernels, both_orders, from_bf16, nmse, to_bf16

THREADS = 256
EPS = np.float32(1e-5)
i32, u32 = np.int32, np.uint32


def bf16_close(got_bits, want):
    """Each bf16 in `got_bits` is within one bf16 ulp (at |want|) of `want`; NaN where
    `want` is NaN, the same infinity where it is infinite."""
    got = from_bf16(got_bits).astype(np.float64)
    want = np.asarray(want, np.float64)
    nan = np.isnan(want)
    if not np.array_equal(np.isnan(got), nan):
        return False
    inf = np.isinf(want)
    if not np.array_equal(got[inf], want[inf]):
        return False
    fin = ~nan & ~inf
    _, e = np.frexp(want[fin])
    ulp = np.maximum(np.ldexp(1.0, e - 8), 2.0 ** -133)  # bf16: 8 significant bits
    return bool(np.all(np.abs(got[fin] - want[fin]) <= ulp))


def grid_stride(n):
    return (min(max(-(-n // THREADS), 1), 1 << 16),)


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32 if a.dtype == np.float32 else a.dtype)


def rms_ref(x, w):
    """ops::rms_norm per row: mean square in f64, 1/rms rounded to f32, x·inv·w in f32."""
    ms = np.mean(x.astype(np.float64) ** 2, axis=1, keepdims=True)
    inv = (1.0 / np.sqrt(ms + np.float64(EPS))).astype(np.float32)
    return (x * inv) * w


def norm_case(k, rng, rows, hidden):
    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    delta = rng.standard_normal((rows, hidden)).astype(np.float32)
    x[1] *= 3e-3  # a mean square near eps, which then counts
    delta[1] *= 3e-3
    x[2] = 0.0  # a padding row: only eps keeps it finite
    delta[2] = -x[2]
    x[-1] *= 1e15  # squares near 1e30: the f32 block sum must not overflow
    x[-2] *= 1e20  # squares of 1e40 overflow f32: the sum is in f64, as the CPU's
    delta[-2] *= 1e20
    w = (1.0 + 0.3 * rng.standard_normal(hidden)).astype(np.float32)

    def go():
        out = k.buf(np.full((rows, hidden), 0x7FC0, np.uint16))
        k.launch("rms_norm", (rows,), (THREADS,), k.buf(x), k.buf(w), EPS, i32(rows),
                 i32(hidden), out)
        xs, out2 = k.buf(x), k.buf(np.full((rows, hidden), 0x7FC0, np.uint16))
        k.launch("add_rms_norm", (rows,), (THREADS,), xs, k.buf(delta), k.buf(w), EPS,
                 i32(rows), i32(hidden), out2)
        return out.get(), xs.get(), out2.get()

    out, xs, out2 = both_orders(k, go)
    want = rms_ref(x, w)
    assert bf16_close(out, want), f"rms_norm {rows}×{hidden}: off by more than a bf16 ulp"
    summed = x + delta
    assert np.array_equal(bits(xs), bits(summed)), "add_rms_norm: residual not x + delta"
    want2 = rms_ref(summed, w)
    assert bf16_close(out2, want2), f"add_rms_norm {rows}×{hidden}: off by more than an ulp"
    return max(nmse(from_bf16(out), from_bf16(to_bf16(want))),
               nmse(from_bf16(out2), from_bf16(to_bf16(want2))))


def add_inplace_case(k, rng, n):
    x = rng.standard_normal(n).astype(np.float32)
    d = rng.standard_normal(n).astype(np.float32)

    def go():
        xb = k.buf(x)
        k.launch("add_inplace", grid_stride(n), (THREADS,), xb, k.buf(d), np.uint64(n))
        return xb.get()

    assert np.array_equal(bits(both_orders(k, go)), bits(x + d)), f"add_inplace n={n}"


def gather_case(k, rng, src_rows, width, idx):
    # A partial row after the whole ones: the wrapper's src_rows (len / width) excludes it.
    x = rng.standard_normal(src_rows * width + width // 2).astype(np.float32)
    idx = np.array(idx, np.uint32)
    n = len(idx)
    tail = 4

    def go():
        out = k.buf(np.full(n * width + tail, np.nan, np.float32))
        k.launch("gather_rows", (n,), (THREADS,), k.buf(x), i32(width),
                 i32(len(x) // width), k.buf(idx), i32(n), out)
        return out.get()

    got = both_orders(k, go)
    rows = x[:src_rows * width].reshape(src_rows, width)
    want = np.stack([rows[i] if i < src_rows else np.zeros(width, np.float32) for i in idx])
    assert np.array_equal(bits(got[:n * width]), bits(want.ravel())), "gather_rows"
    assert np.all(np.isnan(got[n * width:])), "gather_rows wrote past n rows"


def embedding_case(k, rng, vocab, hidden, tokens):
    # Every bf16 pattern may appear (NaN payloads too): the gather must be bit-exact. A
    # partial row at the end is not a token (vocab = len / hidden).
    table = rng.integers(0, 1 << 16, vocab * hidden + hidden - 1, dtype=np.uint16)
    tokens = np.array(tokens, np.uint32)
    rows = len(tokens)

    def go():
        out = k.buf(np.full((rows, hidden), 0x7FBADBAD, np.uint32).view(np.float32))
        k.launch("embedding", (rows,), (THREADS,), k.buf(table), k.buf(tokens), i32(rows),
                 i32(hidden), i32(len(table) // hidden), out)
        return out.get()

    got = both_orders(k, go)
    t = table[:vocab * hidden].reshape(vocab, hidden)
    want = np.zeros((rows, hidden), np.uint32)
    for r, tok in enumerate(tokens):
        if tok < vocab:
            want[r] = t[tok].astype(np.uint32) << 16
    assert np.array_equal(bits(got), want), f"embedding vocab {vocab} hidden {hidden}"


def silu_ref(g):
    """ops::swiglu's silu in f64: the sigmoid from exp(-|g|); silu(-inf) = 0."""
    e = np.exp(-np.abs(g))
    s = np.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    with np.errstate(invalid="ignore"):
        return np.where((s == 0) & (g < 0), 0.0, g * s)


def swiglu_case(k, rng, rows, inter):
    gu = (rng.standard_normal((rows, 2 * inter)) * 4).astype(np.float32)
    # Edges of the sigmoid: infinities, NaN, exp(-|g|) subnormal or zero, signed zeros.
    special = [-np.inf, np.inf, np.nan, -100.0, -88.0, -87.5, 0.0, -0.0, 1e-40, 90.0]
    gu[0, :len(special)] = special
    gu[-1, inter] = np.nan  # a NaN up value

    def go():
        out = k.buf(np.full((rows, inter), 0x7FC0, np.uint16))
        k.launch("swiglu", grid_stride(rows * inter), (THREADS,), k.buf(gu), i32(rows),
                 i32(inter), out)
        return out.get()

    got = both_orders(k, go)
    g, up = gu[:, :inter].astype(np.float64), gu[:, inter:].astype(np.float64)
    want = silu_ref(g) * up
    assert bf16_close(got, want), f"swiglu {rows}×{inter}: off by more than a bf16 ulp"
    fin = np.isfinite(want)
    return nmse(from_bf16(got)[fin], from_bf16(to_bf16(want.astype(np.float32)))[fin])


def main():
    rng = np.random.default_rng(11)
    worst = 0.0
    k = Kernels("norm")
    for rows, hidden in [(5, 897), (4, 4096), (4, 64), (4, 3)]:
        e = norm_case(k, rng, rows, hidden)
        worst = max(worst, e)
        print(f"rms_norm + add_rms_norm {rows}×{hidden:<5d} nmse {e:.2e}")
    add_inplace_case(k, rng, 10007)
    gather_case(k, rng, 7, 37, [6, 0, 7, 3, 3, 0xFFFFFFFF, 1, 100])
    gather_case(k, rng, 3, 896, [2, 1])
    print("add_inplace, gather_rows exact")
    k = Kernels("embedding")
    embedding_case(k, rng, 1001, 64, [0, 1000, 5, 5, 1001, 0xFFFFFFFF, 77, 0])
    embedding_case(k, rng, 151, 896, [150, 3, 0])
    embedding_case(k, rng, 9, 3, [8, 9, 2])
    print("embedding exact")
    k = Kernels("activation")
    for rows, inter in [(3, 1001), (1, 17), (4, 257)]:
        e = swiglu_case(k, rng, rows, inter)
        worst = max(worst, e)
        print(f"swiglu {rows}×{inter:<5d} nmse {e:.2e}")
    assert worst < 1e-5, f"elementwise: nmse {worst:.2e} over 1e-5"
    return worst


if __name__ == "__main__":
    main()
