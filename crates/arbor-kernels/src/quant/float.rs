//! The unquantised GGML types: F32, F16 and BF16, stored little-endian, one element per "block".

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// Elements converted per batch (a stack buffer of u16 bits, so unaligned bytes are fine).
const BATCH: usize = 256;

/// Reads the little-endian f16 at `b[0..2]` as f32 (exact).
#[inline]
pub(crate) fn f16_le(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// F32: `data` holds `out.len()` little-endian f32 values.
pub(crate) fn dequantize_f32(data: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// F16: IEEE binary16, converted exactly (NaNs stay NaN). Uses `half`'s slice conversion,
/// which runs F16C eight at a time where the CPU has it.
pub(crate) fn dequantize_f16(data: &[u8], out: &mut [f32]) {
    let mut bits = [0u16; BATCH];
    for (o, d) in out.chunks_mut(BATCH).zip(data.chunks(2 * BATCH)) {
        let bits = &mut bits[..o.len()];
        for (b, c) in bits.iter_mut().zip(d.chunks_exact(2)) {
            *b = u16::from_le_bytes([c[0], c[1]]);
        }
        bits.reinterpret_cast::<f16>().convert_to_f32_slice(o);
    }
}

/// BF16: the upper 16 bits of an f32.
pub(crate) fn dequantize_bf16(data: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
        *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
    }
}

/// `Σ_k W[k]·x[k]` for one F16 or BF16 weight row (`w.len() == 2·x.len()`), converting
/// through a small f32 buffer: the portable path (AVX2 CPUs use `avx2_float::tile_float`).
///
/// # Panics
/// If `ty` is not F16/BF16 or the lengths disagree (callers check shapes first).
pub(crate) fn dot_half_row(ty: super::GgmlType, w: &[u8], x: &[f32]) -> f32 {
    use super::GgmlType;
    assert!(matches!(ty, GgmlType::F16 | GgmlType::BF16) && w.len() == 2 * x.len());
    let bf = ty == GgmlType::BF16;
    let mut sum = 0.0f32;
    let mut buf = [0.0f32; BATCH];
    for (xc, wc) in x.chunks(BATCH).zip(w.chunks(2 * BATCH)) {
        let b = &mut buf[..xc.len()];
        if bf {
            dequantize_bf16(wc, b);
        } else {
            dequantize_f16(wc, b);
        }
        sum += b.iter().zip(xc).map(|(a, c)| a * c).sum::<f32>();
    }
    sum
}

/// `Σ a[k]·b[k]` (`a.len() == b.len()`) in 16 portable partial sums (AVX2 CPUs use
/// `avx2_float::tile_float`).
pub(crate) fn dot_f32_row(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f32_row: length mismatch");
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}
