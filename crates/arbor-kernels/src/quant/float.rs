//! The unquantised GGML types: F32, F16 and BF16, stored little-endian, one element per "block".

use half::{bf16, f16};

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

/// F16: IEEE binary16, converted exactly (NaNs stay NaN).
pub(crate) fn dequantize_f16(data: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
        *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
    }
}

/// BF16: the upper 16 bits of an f32.
pub(crate) fn dequantize_bf16(data: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
        *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
    }
}
