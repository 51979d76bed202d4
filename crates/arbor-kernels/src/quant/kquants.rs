//! The 256-element "K-quant" super-block formats: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K.
//!
//! Layouts (little-endian, packed, as ggml-common.h defines them with QK_K = 256):
//!
//! | type | bytes | fields (in order)                                              |
//! |------|-------|----------------------------------------------------------------|
//! | Q2_K | 84    | u8 scales[16] (low 4 bits scale, high 4 min), u8 qs[64], f16 d, f16 dmin |
//! | Q3_K | 110   | u8 hmask[32], u8 qs[64], u8 scales[12] (16 × 6 bits), f16 d    |
//! | Q4_K | 144   | f16 d, f16 dmin, u8 scales[12] (8 scales + 8 mins, 6 bits), u8 qs[128] |
//! | Q5_K | 176   | f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128]          |
//! | Q6_K | 210   | u8 ql[128], u8 qh[64], i8 scales[16], f16 d                    |
//! | Q8_K | 292   | f32 d, i8 qs[256], i16 bsums[16]                               |
//!
//! The bit positions of each quant are spelled out in the per-type decoders below.

use super::activation::{BlockQ8K, QK_K};
use super::float::f16_le;
use super::GgmlType;

/// Q4_K/Q5_K: the 8 six-bit scales and 8 six-bit mins packed into 12 bytes.
/// Scales 0..4 and mins 0..4 are the low 6 bits of bytes 0..4 and 4..8; scales/mins 4..8 take
/// their low 4 bits from the nibbles of bytes 8..12 and their top 2 bits from the top bits of
/// bytes 0..4 (scales) and 4..8 (mins).
#[inline(always)]
pub(crate) fn k4_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// Q3_K: the 16 signed six-bit scales packed into 12 bytes (already offset by −32).
/// Scale `k` has its low 4 bits in byte `k % 8` (low nibble for k < 8, high nibble otherwise)
/// and its top 2 bits at bit `2·(k / 4)` of byte `8 + k % 4`.
#[inline(always)]
pub(crate) fn k3_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (k, o) in out.iter_mut().enumerate() {
        let lo = if k < 8 { s[k] & 0x0F } else { s[k - 8] >> 4 };
        let hi = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
        *o = (lo | (hi << 4)) as i8 - 32;
    }
    out
}

/// Dequantises whole super-blocks; `data` holds exactly `out.len() / 256` blocks.
/// Arithmetic matches ggml's reference order (scale products first, then `·q − min`).
pub(crate) fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let size = ty.type_size();
    for (b, y) in data.chunks_exact(size).zip(out.chunks_exact_mut(QK_K)) {
        match ty {
            GgmlType::Q2K => dequant_q2k(b, y),
            GgmlType::Q3K => dequant_q3k(b, y),
            GgmlType::Q4K | GgmlType::Q5K => dequant_q45k(ty == GgmlType::Q5K, b, y),
            GgmlType::Q6K => dequant_q6k(b, y),
            GgmlType::Q8K => {
                let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                for (yi, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
                    *yi = d * q as i8 as f32;
                }
            }
            _ => unreachable!("kquants::dequantize called with {ty}"),
        }
    }
}

/// Q2_K: element `128h + 32j + 16s + l` is bits `2j..2j+2` of `qs[32h + 16s + l]`, with scale
/// byte `scales[8h + 2j + s]`.
fn dequant_q2k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_le(&b[80..]), f16_le(&b[82..]));
    for h in 0..2 {
        for j in 0..4 {
            for s in 0..2 {
                let sc = scales[8 * h + 2 * j + s];
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                for l in 0..16 {
                    let q = (qs[32 * h + 16 * s + l] >> (2 * j)) & 3;
                    y[128 * h + 32 * j + 16 * s + l] = dl * q as f32 - ml;
                }
            }
        }
    }
}

/// Q3_K: element `128h + 32j + i` (i < 32) has low bits `2j..2j+2` of `qs[32h + i]` and, as
/// bit 2, bit `4h + j` of `hmask[i]` — a *clear* bit subtracts 4; its scale is number
/// `8h + 2j + i / 16`.
fn dequant_q3k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = k3_scales(&b[96..108]);
    let d = f16_le(&b[108..]);
    for h in 0..2 {
        for j in 0..4 {
            for s in 0..2 {
                let dl = d * scales[8 * h + 2 * j + s] as f32;
                for l in 0..16 {
                    let i = 16 * s + l;
                    let lo = ((qs[32 * h + i] >> (2 * j)) & 3) as i32;
                    let high = (hmask[i] >> (4 * h + j)) & 1;
                    let q = lo - if high == 1 { 0 } else { 4 };
                    y[128 * h + 32 * j + i] = dl * q as f32;
                }
            }
        }
    }
}

/// Q4_K / Q5_K: element `64c + l` (l < 32) is the low nibble of `qs[32c + l]`, element
/// `64c + 32 + l` the high nibble, with scale/min number `2c` and `2c + 1`. Q5_K adds bit
/// `2c` (resp. `2c + 1`) of `qh[l]` as value 16.
fn dequant_q45k(five: bool, b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_le(b), f16_le(&b[2..]));
    let (sc, mn) = k4_scales_mins(&b[4..16]);
    let (qh, qs) = if five {
        (&b[16..48], &b[48..176])
    } else {
        (&b[0..0], &b[16..144])
    };
    for c in 0..4 {
        let (d1, m1) = (d * sc[2 * c] as f32, dmin * mn[2 * c] as f32);
        let (d2, m2) = (d * sc[2 * c + 1] as f32, dmin * mn[2 * c + 1] as f32);
        for l in 0..32 {
            let byte = qs[32 * c + l];
            let (mut lo, mut hi) = (byte & 0x0F, byte >> 4);
            if five {
                lo += ((qh[l] >> (2 * c)) & 1) << 4;
                hi += ((qh[l] >> (2 * c + 1)) & 1) << 4;
            }
            y[64 * c + l] = d1 * lo as f32 - m1;
            y[64 * c + 32 + l] = d2 * hi as f32 - m2;
        }
    }
}

/// Q6_K: in half `h`, for l < 32, elements `128h + l + 32k` (k = 0..4) take their low 4 bits
/// from the low nibble of `ql[64h + l]`, of `ql[64h + 32 + l]`, the high nibble of
/// `ql[64h + l]`, of `ql[64h + 32 + l]`, and their top 2 bits from bits `2k..2k+2` of
/// `qh[32h + l]`; value `q − 32`, scale number `(element / 16)`.
fn dequant_q6k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_le(&b[208..]);
    for h in 0..2 {
        for l in 0..32 {
            for k in 0..4 {
                let q = six_bit(ql, qh, h, l, k) as i32 - 32;
                let e = 128 * h + 32 * k + l;
                y[e] = d * scales[e / 16] as i8 as f32 * q as f32;
            }
        }
    }
}

/// Q6_K's unsigned quant (`0..=63`) of element `128h + 32k + l`.
#[inline(always)]
pub(crate) fn six_bit(ql: &[u8], qh: &[u8], h: usize, l: usize, k: usize) -> u8 {
    let byte = ql[64 * h + 32 * (k & 1) + l];
    let low = if k < 2 { byte & 0x0F } else { byte >> 4 };
    low | (((qh[32 * h + l] >> (2 * k)) & 3) << 4)
}

/// A super-block prepared for an integer dot product against a [`BlockQ8K`] `y`:
/// `dot = y.d · (d · Σ_k sc[k]·Σ_{i in group k} q[i]·y.qs[i] + cd · Σ_k cm[k]·y.bsums[k])`,
/// with groups of 16 elements. Every type decodes to unsigned quants (`0..=63`, Q8_K: 0..=255)
/// and puts its offset or minimum into the `cd`/`cm` correction.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DecodedK {
    pub q: [u8; QK_K],
    pub sc: [i16; 16],
    pub cm: [i16; 16],
    pub d: f32,
    pub cd: f32,
}

/// Decodes any K-quant super-block (portable path).
pub(crate) fn decode_k(ty: GgmlType, b: &[u8]) -> DecodedK {
    let mut out = DecodedK {
        q: [0; QK_K],
        sc: [0; 16],
        cm: [0; 16],
        d: 0.0,
        cd: 0.0,
    };
    match ty {
        GgmlType::Q2K => {
            let qs = &b[16..80];
            for (e, q) in out.q.iter_mut().enumerate() {
                let (h, j, i) = (e / 128, (e % 128) / 32, e % 32);
                *q = (qs[32 * h + i] >> (2 * j)) & 3;
            }
            for (k, &byte) in b[..16].iter().enumerate() {
                out.sc[k] = (byte & 0x0F) as i16;
                out.cm[k] = (byte >> 4) as i16;
            }
            out.d = f16_le(&b[80..]);
            out.cd = -f16_le(&b[82..]);
        }
        GgmlType::Q3K => {
            let (hmask, qs) = (&b[0..32], &b[32..96]);
            for (e, q) in out.q.iter_mut().enumerate() {
                let (h, j, i) = (e / 128, (e % 128) / 32, e % 32);
                let lo = (qs[32 * h + i] >> (2 * j)) & 3;
                *q = lo | (((hmask[i] >> (4 * h + j)) & 1) << 2);
            }
            let sc = k3_scales(&b[96..108]);
            for (k, &s) in sc.iter().enumerate() {
                out.sc[k] = s as i16;
                out.cm[k] = s as i16;
            }
            out.d = f16_le(&b[108..]);
            out.cd = -4.0 * out.d;
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let five = ty == GgmlType::Q5K;
            let (qh, qs) = if five {
                (&b[16..48], &b[48..176])
            } else {
                (&b[0..0], &b[16..144])
            };
            for c in 0..4 {
                for l in 0..32 {
                    let byte = qs[32 * c + l];
                    let (mut lo, mut hi) = (byte & 0x0F, byte >> 4);
                    if five {
                        lo |= ((qh[l] >> (2 * c)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                    }
                    out.q[64 * c + l] = lo;
                    out.q[64 * c + 32 + l] = hi;
                }
            }
            let (sc, mn) = k4_scales_mins(&b[4..16]);
            for k in 0..16 {
                out.sc[k] = sc[k / 2] as i16;
                out.cm[k] = mn[k / 2] as i16;
            }
            out.d = f16_le(b);
            out.cd = -f16_le(&b[2..]);
        }
        GgmlType::Q6K => {
            let (ql, qh) = (&b[0..128], &b[128..192]);
            for (e, q) in out.q.iter_mut().enumerate() {
                let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
                *q = six_bit(ql, qh, h, l, k);
            }
            for k in 0..16 {
                out.sc[k] = b[192 + k] as i8 as i16;
                out.cm[k] = out.sc[k];
            }
            out.d = f16_le(&b[208..]);
            out.cd = -32.0 * out.d;
        }
        GgmlType::Q8K => {
            for (q, &v) in out.q.iter_mut().zip(&b[4..4 + QK_K]) {
                *q = (v as i8 as i16 + 128) as u8;
            }
            out.sc = [1; 16];
            out.cm = [1; 16];
            out.d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            out.cd = -128.0 * out.d;
        }
        _ => unreachable!("decode_k called with {ty}"),
    }
    out
}

/// One decoded super-block against one activation block.
#[inline(always)]
fn block_dot(w: &DecodedK, y: &BlockQ8K) -> f32 {
    let mut sum = 0i32;
    let mut corr = 0i32;
    for k in 0..16 {
        let mut s = 0i32;
        for i in 16 * k..16 * k + 16 {
            s += w.q[i] as i32 * y.qs[i] as i32;
        }
        sum += w.sc[k] as i32 * s;
        corr += w.cm[k] as i32 * y.bsums[k] as i32;
    }
    y.d * (w.d * sum as f32 + w.cd * corr as f32)
}

/// Portable kernel: `out[i·ld + r] = dot(weight row r, activation row i)` for every row of
/// `w` (rows of `row_bytes` bytes of `ty`) and `i < m`; `x` holds `m` rows of blocks.
pub(crate) fn tile_scalar(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ8K],
    m: usize,
    out: &mut [f32],
    ld: usize,
) {
    let size = ty.type_size();
    let nb = row_bytes / size;
    let nrows = w.len() / row_bytes;
    assert!(
        nb * size == row_bytes
            && x.len() >= m * nb
            && (m == 0 || out.len() >= (m - 1) * ld + nrows)
    );
    let mut i0 = 0;
    while i0 < m {
        let rcount = (m - i0).min(4);
        for (r, wrow) in w.chunks_exact(row_bytes).enumerate() {
            let mut acc = [0.0f32; 4];
            for (b, wb) in wrow.chunks_exact(size).enumerate() {
                let dec = decode_k(ty, wb);
                for (j, a) in acc.iter_mut().enumerate().take(rcount) {
                    *a += block_dot(&dec, &x[(i0 + j) * nb + b]);
                }
            }
            for (j, a) in acc.iter().enumerate().take(rcount) {
                out[(i0 + j) * ld + r] = *a;
            }
        }
        i0 += rcount;
    }
}
