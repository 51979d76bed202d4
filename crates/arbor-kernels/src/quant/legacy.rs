//! The 32-element GGML block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1.
//!
//! Layouts (little-endian, packed, as ggml-common.h defines them):
//!
//! | type | bytes | fields                                             | value            |
//! |------|-------|----------------------------------------------------|------------------|
//! | Q4_0 | 18    | f16 d, u8 qs[16]                                   | d·(q − 8)        |
//! | Q4_1 | 20    | f16 d, f16 m, u8 qs[16]                            | d·q + m          |
//! | Q5_0 | 22    | f16 d, u32 qh, u8 qs[16]                           | d·(q − 16)       |
//! | Q5_1 | 24    | f16 d, f16 m, u32 qh, u8 qs[16]                    | d·q + m          |
//! | Q8_0 | 34    | f16 d, i8 qs[32]                                   | d·q              |
//! | Q8_1 | 36    | f16 d, f16 s (= d·Σq, unused here), i8 qs[32]      | d·q              |
//!
//! In the 4/5-bit types byte `j` of `qs` holds element `j` in its low nibble and element
//! `j + 16` in its high nibble; bit `j` of `qh` is the fifth bit of element `j`.

use super::activation::{BlockQ8, QK8};
use super::float::f16_le;
use super::GgmlType;

/// Elements per legacy block.
pub const QK: usize = 32;

/// The fifth bits of a Q5 block: element `j`'s bit, shifted to value 16.
#[inline]
fn q5_high(qh: u32, j: usize) -> u8 {
    (((qh >> j) & 1) << 4) as u8
}

#[inline]
fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Dequantises whole blocks of a legacy type; `data` holds exactly `out.len() / 32` blocks.
/// Arithmetic matches ggml's reference (`x·d` then `+ m`, in f32).
pub(crate) fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let size = ty.type_size();
    for (b, y) in data.chunks_exact(size).zip(out.chunks_exact_mut(QK)) {
        match ty {
            GgmlType::Q4_0 => {
                let d = f16_le(b);
                for j in 0..16 {
                    y[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                    y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16_le(b), f16_le(&b[2..]));
                for j in 0..16 {
                    y[j] = (b[4 + j] & 0x0F) as f32 * d + m;
                    y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
            GgmlType::Q5_0 => {
                let d = f16_le(b);
                let qh = u32_le(&b[2..]);
                for j in 0..16 {
                    let lo = (b[6 + j] & 0x0F) | q5_high(qh, j);
                    let hi = (b[6 + j] >> 4) | q5_high(qh, j + 16);
                    y[j] = (lo as i32 - 16) as f32 * d;
                    y[j + 16] = (hi as i32 - 16) as f32 * d;
                }
            }
            GgmlType::Q5_1 => {
                let (d, m) = (f16_le(b), f16_le(&b[2..]));
                let qh = u32_le(&b[4..]);
                for j in 0..16 {
                    let lo = (b[8 + j] & 0x0F) | q5_high(qh, j);
                    let hi = (b[8 + j] >> 4) | q5_high(qh, j + 16);
                    y[j] = lo as f32 * d + m;
                    y[j + 16] = hi as f32 * d + m;
                }
            }
            GgmlType::Q8_0 | GgmlType::Q8_1 => {
                let d = f16_le(b);
                let off = if ty == GgmlType::Q8_0 { 2 } else { 4 };
                for (yj, &q) in y.iter_mut().zip(&b[off..off + QK]) {
                    *yj = q as i8 as f32 * d;
                }
            }
            _ => unreachable!("legacy::dequantize called with {ty}"),
        }
    }
}

/// A legacy weight block prepared for an integer dot product: element `j` is `d·q[j] + m`.
/// Q4_0/Q5_0 keep their unsigned quants and fold the −8/−16 offset into `m`, so every
/// 4/5-bit type reads `q` in `0..=31`; Q8_0/Q8_1 have signed `q` and `m = 0`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Decoded {
    pub q: [i8; QK],
    pub d: f32,
    pub m: f32,
}

/// A legacy block format, for the generic kernels.
pub(crate) trait LegacyFormat {
    /// Bytes per block.
    const SIZE: usize;
    /// Decodes the block at the start of `b` (`b.len() >= SIZE`).
    fn decode(b: &[u8]) -> Decoded;
}

/// Marker types naming each legacy format.
pub(crate) struct Q4_0;
pub(crate) struct Q4_1;
pub(crate) struct Q5_0;
pub(crate) struct Q5_1;
pub(crate) struct Q8_0;
pub(crate) struct Q8_1;

#[inline(always)]
fn nibbles(qs: &[u8], q: &mut [i8; QK]) {
    for j in 0..16 {
        q[j] = (qs[j] & 0x0F) as i8;
        q[j + 16] = (qs[j] >> 4) as i8;
    }
}

#[inline(always)]
fn add_fifth_bits(qh: u32, q: &mut [i8; QK]) {
    for (j, v) in q.iter_mut().enumerate() {
        *v |= q5_high(qh, j) as i8;
    }
}

impl LegacyFormat for Q4_0 {
    const SIZE: usize = 18;
    #[inline(always)]
    fn decode(b: &[u8]) -> Decoded {
        let d = f16_le(b);
        let mut q = [0i8; QK];
        nibbles(&b[2..18], &mut q);
        Decoded { q, d, m: -8.0 * d }
    }
}

impl LegacyFormat for Q4_1 {
    const SIZE: usize = 20;
    #[inline(always)]
    fn decode(b: &[u8]) -> Decoded {
        let mut q = [0i8; QK];
        nibbles(&b[4..20], &mut q);
        Decoded {
            q,
            d: f16_le(b),
            m: f16_le(&b[2..]),
        }
    }
}

impl LegacyFormat for Q5_0 {
    const SIZE: usize = 22;
    #[inline(always)]
    fn decode(b: &[u8]) -> Decoded {
        let d = f16_le(b);
        let mut q = [0i8; QK];
        nibbles(&b[6..22], &mut q);
        add_fifth_bits(u32_le(&b[2..]), &mut q);
        Decoded { q, d, m: -16.0 * d }
    }
}

impl LegacyFormat for Q5_1 {
    const SIZE: usize = 24;
    #[inline(always)]
    fn decode(b: &[u8]) -> Decoded {
        let mut q = [0i8; QK];
        nibbles(&b[8..24], &mut q);
        add_fifth_bits(u32_le(&b[4..]), &mut q);
        Decoded {
            q,
            d: f16_le(b),
            m: f16_le(&b[2..]),
        }
    }
}

impl LegacyFormat for Q8_0 {
    const SIZE: usize = 34;
    #[inline(always)]
    fn decode(b: &[u8]) -> Decoded {
        let mut q = [0i8; QK];
        for (v, &x) in q.iter_mut().zip(&b[2..34]) {
            *v = x as i8;
        }
        Decoded {
            q,
            d: f16_le(b),
            m: 0.0,
        }
    }
}

impl LegacyFormat for Q8_1 {
    const SIZE: usize = 36;
    #[inline(always)]
    fn decode(b: &[u8]) -> Decoded {
        let mut q = [0i8; QK];
        for (v, &x) in q.iter_mut().zip(&b[4..36]) {
            *v = x as i8;
        }
        Decoded {
            q,
            d: f16_le(b),
            m: 0.0,
        }
    }
}

/// `Σ_blocks d_w·d_x·Σ q_w·q_x + m_w·s_x` for one decoded block against one activation block.
#[inline(always)]
fn block_dot(w: &Decoded, x: &BlockQ8) -> f32 {
    let mut sum = 0i32;
    for j in 0..QK8 {
        sum += w.q[j] as i32 * x.qs[j] as i32;
    }
    w.d * x.d * sum as f32 + w.m * x.s
}

/// Portable kernel: `out[i·ld + r] = dot(weight row r, activation row i)` for every row `r`
/// of `w` (rows of `row_bytes`) and `i < m`; `x` holds `m` rows of `row_bytes / SIZE` blocks.
pub(crate) fn tile_scalar<F: LegacyFormat>(
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ8],
    m: usize,
    out: &mut [f32],
    ld: usize,
) {
    let nb = row_bytes / F::SIZE;
    let nrows = w.len() / row_bytes;
    assert!(
        nb * F::SIZE == row_bytes
            && x.len() >= m * nb
            && (m == 0 || out.len() >= (m - 1) * ld + nrows)
    );
    let mut i0 = 0;
    while i0 < m {
        let rcount = (m - i0).min(4);
        for (r, wrow) in w.chunks_exact(row_bytes).enumerate() {
            let mut acc = [0.0f32; 4];
            for (b, wb) in wrow.chunks_exact(F::SIZE).enumerate() {
                let dec = F::decode(wb);
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
