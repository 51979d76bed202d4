//! AVX2 dot products of an F16 or BF16 weight row with an f32 activation row, converting on
//! the fly (F16C `vcvtph2ps` for f16, a 16-bit shift for bf16), for the matmul's few-row path.
//!
//! Only reached through `float::dot_half_row`, which checks the lengths and the CPU first.

use std::arch::x86_64::*;

use super::avx2_legacy::hsum;

/// Eight 16-bit floats at `p` as f32.
#[inline(always)]
unsafe fn load8<const BF16: bool>(p: *const u8) -> __m256 {
    let raw = _mm_loadu_si128(p as *const __m128i);
    if BF16 {
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
    } else {
        _mm256_cvtph_ps(raw)
    }
}

/// `Σ w[k]·x[k]` over the first `8·⌊x.len() / 8⌋` elements; returns that sum and the count.
///
/// # Safety
/// AVX2, FMA and F16C must be available and `w.len() >= 2·x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_half<const BF16: bool>(w: &[u8], x: &[f32]) -> (f32, usize) {
    debug_assert!(w.len() >= 2 * x.len());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= x.len() {
        for (k, a) in acc.iter_mut().enumerate() {
            let j = i + 8 * k;
            *a = _mm256_fmadd_ps(load8::<BF16>(wp.add(2 * j)), _mm256_loadu_ps(xp.add(j)), *a);
        }
        i += 32;
    }
    while i + 8 <= x.len() {
        acc[0] = _mm256_fmadd_ps(
            load8::<BF16>(wp.add(2 * i)),
            _mm256_loadu_ps(xp.add(i)),
            acc[0],
        );
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    (hsum(s), i)
}

/// `Σ a[k]·b[k]` over the first `8·⌊a.len() / 8⌋` elements; returns that sum and the count.
///
/// # Safety
/// AVX2 and FMA must be available and `b.len() >= a.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> (f32, usize) {
    debug_assert!(b.len() >= a.len());
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= a.len() {
        for (k, s) in acc.iter_mut().enumerate() {
            let j = i + 8 * k;
            *s = _mm256_fmadd_ps(_mm256_loadu_ps(ap.add(j)), _mm256_loadu_ps(bp.add(j)), *s);
        }
        i += 32;
    }
    while i + 8 <= a.len() {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(ap.add(i)),
            _mm256_loadu_ps(bp.add(i)),
            acc[0],
        );
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    (hsum(s), i)
}
