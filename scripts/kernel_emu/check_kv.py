"""kernels/kv.cu on the emulator, launched as cuda/ops/kv.rs launches it: copy_pages against
KvPool::copy_page (the first `slots` positions of every layer, K and V, KV head; zero, partial
and whole pages; one source forked to two pages) over a pool of random bit patterns, NaN
payloads included, which must come out bit for bit; and the f32 ↔ bf16 casts, exact against a
bit-level reference (ties to even, subnormals, infinities, rounding up to infinity, NaNs that
must stay NaN) and over every bf16 pattern."""

import numpy as np

from emu import Kernels, both_orders

THREADS = 256
i32 = np.int32


def grid_stride(n):
    return (min(max(-(-n // THREADS), 1), 1 << 16),)


def copy_case(k, rng, layers, num_pages, kvh, page_size, hd, copies):
    pool0 = rng.integers(0, 1 << 16, (layers, num_pages, 2, kvh, page_size, hd),
                         dtype=np.uint16)
    # The wrapper's rules: pages in the pool, slots ≤ page_size, distinct destinations, no
    # page both a source and a destination.
    dsts = [d for _, d, _ in copies]
    assert len(set(dsts)) == len(dsts) and not {s for s, _, _ in copies} & set(dsts)
    flat = np.array(copies, np.uint32).ravel()
    blocks = len(copies) * layers * 2 * kvh

    def go():
        pool = k.buf(pool0)
        k.launch("copy_pages", (blocks,), (THREADS,), k.buf(flat), i32(len(copies)), pool,
                 i32(layers), i32(num_pages), i32(kvh), i32(page_size), i32(hd))
        return pool.get()

    got = both_orders(k, go)
    want = pool0.copy()
    for src, dst, slots in copies:
        want[:, dst, :, :, :slots] = pool0[:, src, :, :, :slots]
    assert np.array_equal(got, want), \
        f"copy_pages {copies} (page size {page_size}, head_dim {hd}): pool differs"


def f32_to_bf16_ref(x):
    """As the half crate converts (the host pool's bf16): keep the top half, plus one when the
    dropped half is over a tie or a tie with an odd kept half; a NaN keeps its sign and top
    payload, made quiet."""
    u = np.asarray(x, np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    up = ((u & 0x8000) != 0) & ((u & 0x17FFF) != 0)
    return np.where(nan, (u >> 16) | 0x40, (u >> 16) + up).astype(np.uint16)


def casts(k, rng):
    edge = np.array([0x00000000, 0x80000000, 0x3F808000, 0x3F818000, 0x3F808001, 0x3F817FFF,
                     0x00000001, 0x00008000, 0x00018000, 0x807FFFFF, 0x7F7FFFFF, 0xFF7F8000,
                     0x7F7F7FFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFF800001,
                     0x7FFFFFFF, 0x7F810000], np.uint32)
    # Edges, random bit patterns, random normals; an odd count, so the last block is partial.
    x = np.concatenate([edge, rng.integers(0, 1 << 32, 5000, dtype=np.uint64).astype(np.uint32),
                        rng.standard_normal(4987).astype(np.float32).view(np.uint32)])
    x = x.view(np.float32)
    n = len(x)
    # Every bf16 pattern, shuffled, and a few more.
    b = np.concatenate([rng.permutation(1 << 16), rng.integers(0, 1 << 16, 77)]).astype(np.uint16)
    m = len(b)

    def go():
        y = k.buf(np.full(n, 0xEEEE, np.uint16))
        k.launch("cast_f32_to_bf16", grid_stride(n), (THREADS,), k.buf(x), y, np.uint64(n))
        z = k.buf(np.full(m, 0xEEEEEEEE, np.uint32))
        k.launch("cast_bf16_to_f32", grid_stride(m), (THREADS,), k.buf(b), z, np.uint64(m))
        return y.get(), z.get()

    y, z = both_orders(k, go)
    want = f32_to_bf16_ref(x)
    bad = np.nonzero(y != want)[0]
    assert len(bad) == 0, \
        f"cast_f32_to_bf16: {x.view(np.uint32)[bad[0]]:#010x} → {y[bad[0]]:#06x}, " \
        f"want {want[bad[0]]:#06x}"
    assert np.array_equal(z, b.astype(np.uint32) << 16), "cast_bf16_to_f32"
    return n, m


def main():
    rng = np.random.default_rng(5)
    k = Kernels("kv")
    cases = [
        # (layers, pages, kv heads, page size, head_dim, [(src, dst, slots)])
        (2, 9, 3, 16, 64, [(1, 4, 5), (2, 7, 16), (1, 0, 9)]),  # page 1 forked twice
        (3, 6, 1, 8, 128, [(5, 2, 7), (0, 3, 0)]),  # zero slots copies nothing
        (1, 5, 8, 32, 16, [(4, 1, 31)]),
        (2, 4, 4, 16, 128, [(3, 0, 16), (2, 1, 1)]),
    ]
    for layers, pages, kvh, ps, hd, copies in cases:
        copy_case(k, rng, layers, pages, kvh, ps, hd, copies)
        print(f"copy_pages {layers} layers × {kvh} kv heads, page {ps:2d}, head_dim {hd:3d}, "
              f"{len(copies)} copies: exact")
    n, m = casts(k, rng)
    print(f"cast_f32_to_bf16 ({n} values), cast_bf16_to_f32 (every pattern, {m}): exact")
    return 0.0


if __name__ == "__main__":
    main()
