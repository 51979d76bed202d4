//! Activation rows quantised to 8 bits, the right-hand side of every quantised block dot
//! product (as llama.cpp does: a row of `x` is quantised once per matmul, then each weight
//! block is multiplied with integer arithmetic).
//!
//! These are arbor's own in-memory formats, never stored in files: scales are kept as f32
//! (not f16 as in ggml's Q8_0/Q8_1), which only makes them more precise.

use crate::ops::softmax::with_wide_vectors;

/// Elements per [`BlockQ8`].
pub const QK8: usize = 32;
/// Elements per [`BlockQ8K`].
pub const QK_K: usize = 256;

/// 32 activations as `d * qs[i]`, with `s = d * Σ qs[i]` for the weight types that carry a
/// minimum (Q4_1, Q5_1, and Q4_0/Q5_0, whose offset is folded into a minimum).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    /// Scale.
    pub d: f32,
    /// `d * Σ qs`.
    pub s: f32,
    /// Quantised values in `-127..=127`.
    pub qs: [i8; QK8],
}

/// 256 activations as `d * qs[i]`, with the sums of each 16 quants (Q8_K's layout), the
/// right-hand side for the K-quants.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale.
    pub d: f32,
    /// Quantised values in `-127..=127`.
    pub qs: [i8; QK_K],
    /// `bsums[j] = Σ qs[16j..16j+16]`.
    pub bsums: [i16; QK_K / 16],
}

impl BlockQ8 {
    /// An all-zero block.
    pub const ZERO: BlockQ8 = BlockQ8 {
        d: 0.0,
        s: 0.0,
        qs: [0; QK8],
    };
}

impl BlockQ8K {
    /// An all-zero block.
    pub const ZERO: BlockQ8K = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
}

/// Symmetric 8-bit quantisation of `x` into `q`; returns the scale `d` (`x ≈ d * q`).
/// A block of zeros (or one whose largest magnitude is not finite-positive) gets `d = 0`.
#[inline]
fn quantize_symmetric(x: &[f32], q: &mut [i8]) -> f32 {
    let (d, id) = scales(abs_max(x));
    for (qi, &xi) in q.iter_mut().zip(x) {
        *qi = round_to_i8(xi * id);
    }
    d
}

/// The scale `d = amax / 127` of a block whose largest magnitude is `amax`, and its inverse
/// (0 where `d` is not positive).
#[inline(always)]
pub(super) fn scales(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

/// The largest |x_i| (0 for an empty slice; NaN ignored), in eight lanes: max is exact in any
/// order, and a single running max is a chain of dependent compares that does not vectorise
/// (it was the larger half of quantising a row).
#[inline(always)]
fn abs_max(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.max(v.abs());
        }
    }
    let lanes = acc.iter().fold(0.0f32, |a, &b| a.max(b));
    chunks.remainder().iter().fold(lanes, |a, v| a.max(v.abs()))
}

/// `y.round() as i8` (half away from zero, saturating, NaN to 0), without the `roundf` call
/// that `f32::round` compiles to: clamped into i8's range first (which changes no result),
/// truncated, and moved one step out where the dropped fraction is at least a half (exact:
/// `y − trunc(y)` is representable). A loop of these vectorises.
#[inline(always)]
fn round_to_i8(y: f32) -> i8 {
    let c = y.clamp(-128.0, 127.0);
    let t = c as i32;
    let f = c - t as f32;
    (t + (f >= 0.5) as i32 - (f <= -0.5) as i32) as i8
}

/// Quantises one activation row: `x.len()` must be `32 * out.len()`.
///
/// # Panics
/// If the lengths disagree (a caller bug: [`matmul()`](crate::ops::matmul::matmul) checks shapes first).
pub fn quantize_row_q8(x: &[f32], out: &mut [BlockQ8]) {
    assert_eq!(x.len(), out.len() * QK8, "quantize_row_q8: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected; the lengths were checked.
        return unsafe { super::avx2_activation::quantize_row_q8(x, out) };
    }
    portable_q8(x, out)
}

/// [`quantize_row_q8`] without explicit vectors.
fn portable_q8(x: &[f32], out: &mut [BlockQ8]) {
    with_wide_vectors(
        #[inline(always)]
        || {
            for (b, xb) in out.iter_mut().zip(x.chunks_exact(QK8)) {
                b.d = quantize_symmetric(xb, &mut b.qs);
                let sum: i32 = b.qs.iter().map(|&v| v as i32).sum();
                b.s = b.d * sum as f32;
            }
        },
    )
}

/// Quantises one activation row into 256-blocks: `x.len()` must be `256 * out.len()`.
///
/// # Panics
/// If the lengths disagree (a caller bug: [`matmul()`](crate::ops::matmul::matmul) checks shapes first).
pub fn quantize_row_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(
        x.len(),
        out.len() * QK_K,
        "quantize_row_q8k: length mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected; the lengths were checked.
        return unsafe { super::avx2_activation::quantize_row_q8k(x, out) };
    }
    portable_q8k(x, out)
}

/// [`quantize_row_q8k`] without explicit vectors.
fn portable_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    with_wide_vectors(
        #[inline(always)]
        || {
            for (b, xb) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
                b.d = quantize_symmetric(xb, &mut b.qs);
                for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
                    *s = q.iter().map(|&v| v as i16).sum();
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_to_i8_is_round_then_saturate() {
        let mut ys = vec![
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            126.5,
            -127.5,
            127.49,
            127.5,
            128.0,
            -128.5,
            -129.0,
            0.0,
            -0.0,
            1e-30,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -1e30,
            0.49999997,
        ];
        // Every tie and its neighbours up to ±130, and a dense sweep.
        for i in -260..=260 {
            let h = i as f32 * 0.5;
            ys.extend([h, h.next_up(), h.next_down()]);
        }
        ys.extend((0..100_000).map(|i| (i as f32 - 50_000.0) * 0.002_7));
        for y in ys {
            assert_eq!(round_to_i8(y), y.round() as i8, "{y:e}");
        }
    }

    #[test]
    fn q8_round_trip_is_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.13)
            .collect();
        let mut b = [BlockQ8::ZERO; 2];
        quantize_row_q8(&x, &mut b);
        for (blk, xb) in b.iter().zip(x.chunks(32)) {
            let sum: i32 = blk.qs.iter().map(|&v| v as i32).sum();
            assert_eq!(blk.s, blk.d * sum as f32);
            for (q, v) in blk.qs.iter().zip(xb) {
                assert!((*q as f32 * blk.d - v).abs() <= blk.d * 0.5 + 1e-7);
            }
        }
    }

    #[test]
    fn q8k_sums_and_zero_block() {
        let mut x = vec![0.0f32; 512];
        for (i, v) in x[256..].iter_mut().enumerate() {
            *v = (i as f32 - 128.0) * 0.01;
        }
        let mut b = [BlockQ8K::ZERO; 2];
        quantize_row_q8k(&x, &mut b);
        assert_eq!(b[0].d, 0.0);
        assert!(b[0].qs.iter().all(|&q| q == 0));
        for (j, s) in b[1].bsums.iter().enumerate() {
            let want: i16 = b[1].qs[16 * j..16 * j + 16].iter().map(|&v| v as i16).sum();
            assert_eq!(*s, want);
        }
        assert!(b[1].qs.iter().any(|&q| q == -127 || q == 127));
    }

    /// Rows with every kind of block: random spreads, ties at every half step of the scale,
    /// zeros, a lone value, NaN and infinities.
    fn awkward_rows(n: usize) -> Vec<f32> {
        let mut s = 0x9E37_79B9u32;
        let mut x: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 8.0
            })
            .collect();
        // Block 1: exact ties (amax 127 → d = 1, id = 1).
        for (i, v) in x[32..64].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { i as f32 - 15.5 };
        }
        x[64..96].fill(0.0);
        x[96..128].fill(0.0);
        x[100] = -3.0;
        x[130] = f32::NAN;
        x[170] = f32::INFINITY;
        x[200] = f32::NEG_INFINITY;
        x[201] = f32::NAN;
        x
    }

    #[test]
    fn vector_quantisation_equals_the_portable_code_bit_for_bit() {
        let x = awkward_rows(1024);
        let mut want = vec![BlockQ8::ZERO; 32];
        let mut got = vec![BlockQ8::ZERO; 32];
        portable_q8(&x, &mut want);
        quantize_row_q8(&x, &mut got);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(w.qs, g.qs, "block {i}");
            assert_eq!(
                (w.d.to_bits(), w.s.to_bits()),
                (g.d.to_bits(), g.s.to_bits()),
                "block {i}"
            );
        }
        let mut want = vec![BlockQ8K::ZERO; 4];
        let mut got = vec![BlockQ8K::ZERO; 4];
        portable_q8k(&x, &mut want);
        quantize_row_q8k(&x, &mut got);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!((w.qs, w.bsums), (g.qs, g.bsums), "block {i}");
            assert_eq!(w.d.to_bits(), g.d.to_bits(), "block {i}");
        }
    }

    #[test]
    fn non_finite_inputs_do_not_panic() {
        let mut x = vec![1.0f32; 32];
        x[3] = f32::NAN;
        x[4] = f32::INFINITY;
        let mut b = [BlockQ8::ZERO];
        quantize_row_q8(&x, &mut b);
    }
}
