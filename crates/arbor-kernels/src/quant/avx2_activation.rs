//! Activation rows quantised to 8 bits with AVX2: the values and scales of the portable code
//! in `activation.rs`, bit for bit (tested), eight lanes at a time. LLVM kept the portable
//! loops scalar (the float→int cast saturates, the running max is a chain), which made
//! quantising a wide batch's inputs a twentieth of a decode step.

use super::activation::{scales, BlockQ8, BlockQ8K, QK8, QK_K};
use std::arch::x86_64::*;

/// max |x| over `n` values at `p` (`n` a multiple of 8), NaN ignored as `f32::max` does: the
/// running max is `max_ps`'s second operand, which it returns where the other is NaN.
#[inline(always)]
unsafe fn abs_max(p: *const f32, n: usize) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for c in 0..n / 8 {
        m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * c))), m);
    }
    let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)))
}

/// Eight values `x · id` rounded half away from zero into −128..=127, NaN to 0: the portable
/// `round_to_i8` lane by lane (clamp, truncate, one step out where the dropped fraction is at
/// least a half).
#[inline(always)]
unsafe fn round8(x: __m256, id: __m256) -> __m256i {
    let y = _mm256_mul_ps(x, id);
    let y = _mm256_and_ps(y, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
    let c = _mm256_min_ps(
        _mm256_max_ps(y, _mm256_set1_ps(-128.0)),
        _mm256_set1_ps(127.0),
    );
    let t = _mm256_cvttps_epi32(c);
    let f = _mm256_sub_ps(c, _mm256_cvtepi32_ps(t));
    // Compare masks are −1 where true.
    let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(f, _mm256_set1_ps(0.5)));
    let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(f, _mm256_set1_ps(-0.5)));
    _mm256_add_epi32(_mm256_sub_epi32(t, up), down)
}

/// [`round8`] of the 32 values at `p`.
#[inline(always)]
unsafe fn round32(p: *const f32, id: __m256) -> [__m256i; 4] {
    [
        round8(_mm256_loadu_ps(p), id),
        round8(_mm256_loadu_ps(p.add(8)), id),
        round8(_mm256_loadu_ps(p.add(16)), id),
        round8(_mm256_loadu_ps(p.add(24)), id),
    ]
}

/// Thirty-two i32 lanes (`q[0]` first) narrowed to i8 in order at `out`.
#[inline(always)]
unsafe fn store32(q: [__m256i; 4], out: *mut i8) {
    let a = _mm256_packs_epi32(q[0], q[1]);
    let b = _mm256_packs_epi32(q[2], q[3]);
    // The packs work within 128-bit halves: put the eight 4-byte groups back in order.
    let bytes = _mm256_packs_epi16(a, b);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    _mm256_storeu_si256(out.cast(), _mm256_permutevar8x32_epi32(bytes, order));
}

/// Σ of the eight i32 lanes of `v`.
#[inline(always)]
unsafe fn sum_i32(v: __m256i) -> i32 {
    let h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let h = _mm_add_epi32(h, _mm_shuffle_epi32::<0b01_00_11_10>(h));
    _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32::<0b10_11_00_01>(h)))
}

/// [`super::quantize_row_q8`] for `x.len() == 32 · out.len()`.
///
/// # Safety
/// The CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_row_q8(x: &[f32], out: &mut [BlockQ8]) {
    for (b, xb) in out.iter_mut().zip(x.chunks_exact(QK8)) {
        let p = xb.as_ptr();
        let (d, id) = scales(abs_max(p, QK8));
        let idv = _mm256_set1_ps(id);
        let q = round32(p, idv);
        store32(q, b.qs.as_mut_ptr());
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        b.d = d;
        b.s = d * sum_i32(sum) as f32;
    }
}

/// [`super::quantize_row_q8k`] for `x.len() == 256 · out.len()`.
///
/// # Safety
/// The CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_row_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    for (b, xb) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        let p = xb.as_ptr();
        let (d, id) = scales(abs_max(p, QK_K));
        let idv = _mm256_set1_ps(id);
        for g in 0..QK_K / 32 {
            let q = round32(p.add(32 * g), idv);
            store32(q, b.qs.as_mut_ptr().add(32 * g));
            // Sixteen quants per sum: |Σ| ≤ 16 · 128 fits i16.
            b.bsums[2 * g] = sum_i32(_mm256_add_epi32(q[0], q[1])) as i16;
            b.bsums[2 * g + 1] = sum_i32(_mm256_add_epi32(q[2], q[3])) as i16;
        }
        b.d = d;
    }
}
