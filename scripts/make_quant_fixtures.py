#!/usr/bin/env python3
"""Writes the GGML block-format fixtures under tests/fixtures/quant/.

For each tensor type arbor reads, two files:
  <type>.bin   raw bytes of a few blocks, exactly as a GGUF file stores them
  <type>.f32   the values those blocks stand for, little-endian f32, as the
               `gguf` package (gguf-py, llama.cpp's Python reference) dequantises them

arbor-kernels' unit tests (quant/fixture_tests.rs) dequantise every .bin and compare with
the .f32 bit for bit.

Block contents:
  * types gguf-py can quantise (BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): random normal data plus
    hand-picked edge blocks (all zero, constant, one outlier, huge values near the f16
    limit, tiny values whose scale is an f16 subnormal), quantised with gguf-py;
  * every block type also gets blocks of uniformly random bytes (with the f16/f32 scales
    replaced by chosen finite values), so every quant bit pattern is exercised, including
    ones a quantiser never writes (e.g. -128 in Q8_0);
  * K-quants (Q2_K..Q6_K) are random bytes only (gguf-py has no quantiser for them);
  * Q8_1 and Q8_K are not dequantised by gguf-py (and gguf-py lists a stale 40-byte Q8_1):
    their expected values are d * q computed here, with ggml's current layouts:
    Q8_1 = {f16 d, f16 s, i8 qs[32]} (36 bytes), Q8_K = {f32 d, i8 qs[256], i16 bsums[16]}.

Run from the repository root:  python3 scripts/make_quant_fixtures.py
Needs: pip install gguf numpy
"""

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "quant"
rng = np.random.default_rng(20261123)

# (type, block size, bytes per block, byte offsets of f16 scales inside a block)
LAYOUT = {
    T.Q4_0: (32, 18, [0]),
    T.Q4_1: (32, 20, [0, 2]),
    T.Q5_0: (32, 22, [0]),
    T.Q5_1: (32, 24, [0, 2]),
    T.Q8_0: (32, 34, [0]),
    T.Q8_1: (32, 36, [0, 2]),
    T.Q2_K: (256, 84, [80, 82]),
    T.Q3_K: (256, 110, [108]),
    T.Q4_K: (256, 144, [0, 2]),
    T.Q5_K: (256, 176, [0, 2]),
    T.Q6_K: (256, 210, [208]),
}

# f16 scale values used in the random-byte blocks: ordinary, negative, zero, subnormal, large.
SCALES = np.array([0.0123, -0.0456, 0.0, 6.0e-8, 3.1e-5, 1.5, -0.75, 1000.0], dtype=np.float16)


def edge_rows(block: int) -> np.ndarray:
    """Hand-picked blocks: each row is one block of f32 input."""
    rows = [
        np.zeros(block),
        np.full(block, 0.375),
        np.full(block, -2.5),
        np.where(np.arange(block) == 5, 7.0, 0.01),  # one outlier
        np.linspace(-60000.0, 60000.0, block),  # near the f16 limit
        np.linspace(-1e-6, 2e-6, block),  # scale becomes an f16 subnormal
        np.linspace(-1.0, 1.0, block),
    ]
    return np.stack(rows).astype(np.float32)


def random_blocks(ty: T, n: int) -> np.ndarray:
    """`n` blocks of random bytes whose f16 scales are finite values from SCALES."""
    _, size, offsets = LAYOUT[ty]
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for off in offsets:
        vals = rng.choice(SCALES, size=n).astype(np.float16)
        raw[:, off : off + 2] = vals.view(np.uint8).reshape(n, 2)
    return raw


def write(name: str, raw: np.ndarray, expected: np.ndarray) -> None:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    expected = np.ascontiguousarray(expected, dtype="<f4")
    (OUT / f"{name}.bin").write_bytes(raw.tobytes())
    (OUT / f"{name}.f32").write_bytes(expected.tobytes())
    print(f"{name:5}: {raw.size:6} bytes -> {expected.size:5} values")


def floats() -> None:
    special = np.array(
        [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 1e-40, -1e-45, 3.4e38, 65504.0, 6e-8],
        dtype=np.float32,
    )
    f32 = np.concatenate([special, rng.standard_normal(116).astype(np.float32) * 10])
    write("f32", f32.view(np.uint8), f32)

    # F16: every kind of bit pattern (normals, subnormals, inf, NaN) from random u16 plus specials.
    h = np.concatenate(
        [
            np.array([0x0000, 0x8000, 0x3C00, 0x7C00, 0xFC00, 0x7E00, 0x0001, 0x03FF, 0x7BFF, 0xFBFF], dtype=np.uint16),
            rng.integers(0, 1 << 16, size=118, dtype=np.uint16),
        ]
    )
    write("f16", h.view(np.uint8), quants.dequantize(h.view(np.uint8), T.F16))

    b = np.concatenate(
        [
            np.array([0x0000, 0x8000, 0x3F80, 0x7F80, 0xFF80, 0x7FC0, 0x0001, 0x7F7F], dtype=np.uint16),
            rng.integers(0, 1 << 16, size=120, dtype=np.uint16),
        ]
    )
    write("bf16", b.view(np.uint8), quants.dequantize(b.view(np.uint8), T.BF16))


def legacy() -> None:
    for ty in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        block = LAYOUT[ty][0]
        data = np.concatenate([edge_rows(block), rng.standard_normal((5, block)).astype(np.float32)])
        q = quants.quantize(data, ty).reshape(-1, LAYOUT[ty][1])
        raw = np.concatenate([q, random_blocks(ty, 4)])
        write(ty.name.lower(), raw, quants.dequantize(raw, ty))

    # Q8_1: ggml's layout, dequantised as d * q (the s field does not enter).
    raw = random_blocks(T.Q8_1, 8)
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
    q = raw[:, 4:].view(np.int8).astype(np.float32)
    write("q8_1", raw, (q * d).reshape(-1))


def kquants() -> None:
    for ty in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        raw = random_blocks(ty, 5)
        write(ty.name.lower(), raw, quants.dequantize(raw, ty))

    # Q8_K: f32 d, then 256 i8 quants, then 16 i16 block sums (not used by dequantisation).
    n = 3
    raw = rng.integers(0, 256, size=(n, 292), dtype=np.uint8)
    d = np.array([0.0123, -3.5e-3, 0.0], dtype=np.float32)
    raw[:, 0:4] = d.view(np.uint8).reshape(n, 4)
    q = raw[:, 4:260].view(np.int8).astype(np.float32)
    write("q8_k", raw, (q * d.reshape(n, 1)).reshape(-1))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    floats()
    legacy()
    kquants()


if __name__ == "__main__":
    main()
