//! AVX2 tiles of F32, F16 or BF16 weight rows with f32 activation rows, converting 16-bit
//! weights on the fly (F16C `vcvtph2ps` for f16, a 16-bit shift for bf16).
//!
//! Only reached through the matmul's `float_tile`, which checks the sizes and the CPU first.

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

/// A weight element type the float tiles read: f32, or a 16-bit float converted on load.
trait Elem {
    const BYTES: usize;
    /// Eight elements at `p` as f32.
    unsafe fn load8(p: *const u8) -> __m256;
    /// One element at `p` as f32.
    unsafe fn load1(p: *const u8) -> f32;
}

struct F32E;
struct F16E;
struct Bf16E;

impl Elem for F32E {
    const BYTES: usize = 4;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_loadu_ps(p as *const f32)
    }
    #[inline(always)]
    unsafe fn load1(p: *const u8) -> f32 {
        (p as *const f32).read_unaligned()
    }
}

impl Elem for F16E {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        load8::<false>(p)
    }
    #[inline(always)]
    unsafe fn load1(p: *const u8) -> f32 {
        half::f16::from_bits((p as *const u16).read_unaligned()).to_f32()
    }
}

impl Elem for Bf16E {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        load8::<true>(p)
    }
    #[inline(always)]
    unsafe fn load1(p: *const u8) -> f32 {
        f32::from_bits(((p as *const u16).read_unaligned() as u32) << 16)
    }
}

/// `out[i·ld + r] = Σ_k W[r][k]·x[i][k]` for the `nr` weight rows at `w` (`cols` elements of
/// `ty`: F32, F16 or BF16, row after row) and the `m` rows of `x`.
///
/// Every (weight row, activation row) pair is computed the same way whatever `m` and
/// whichever tile it falls in: one 8-lane FMA chain over the whole multiples of 8, its
/// horizontal sum, then the remaining elements in order. So a row's result does not depend
/// on its batch (tiles of up to 4 activation rows × 2 weight rows, or 4 weight rows for one
/// activation row, keep enough chains in flight).
///
/// # Safety
/// AVX2, FMA and F16C must be available; `w` must hold `nr·cols` elements of `ty`, `x` at least
/// `m·cols` values and `out` at least `(m − 1)·ld + nr`, `ld ≥ nr`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile_float(
    ty: crate::quant::GgmlType,
    w: *const u8,
    nr: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    ld: usize,
) {
    use crate::quant::GgmlType;
    debug_assert!(x.len() >= m * cols && (m == 0 || out.len() >= (m - 1) * ld + nr));
    let (x, o) = (x.as_ptr(), out.as_mut_ptr());
    match ty {
        GgmlType::F16 => tile_e::<F16E>(w, nr, cols, x, m, o, ld),
        GgmlType::BF16 => tile_e::<Bf16E>(w, nr, cols, x, m, o, ld),
        _ => tile_e::<F32E>(w, nr, cols, x, m, o, ld),
    }
}

#[inline(always)]
unsafe fn tile_e<E: Elem>(
    w: *const u8,
    nr: usize,
    cols: usize,
    x: *const f32,
    m: usize,
    out: *mut f32,
    ld: usize,
) {
    let mut i0 = 0;
    while i0 < m {
        let rc = (m - i0).min(4);
        let (xs, o) = (x.add(i0 * cols), out.add(i0 * ld));
        let mut r = 0;
        // (weight rows per tile, activation rows): R rows of x against WR rows of W.
        macro_rules! run {
            ($wr:literal, $r:literal) => {{
                while r + $wr <= nr {
                    pair::<E, $wr, $r>(w, r, cols, xs, o, ld);
                    r += $wr;
                }
                while r < nr {
                    pair::<E, 1, $r>(w, r, cols, xs, o, ld);
                    r += 1;
                }
            }};
        }
        match rc {
            4 => run!(2, 4),
            3 => run!(2, 3),
            2 => run!(2, 2),
            _ => run!(4, 1),
        }
        i0 += rc;
    }
}

/// Weight rows `r0..r0 + WR` against activation rows `0..R` (see [`tile_float`]).
#[inline(always)]
unsafe fn pair<E: Elem, const WR: usize, const R: usize>(
    w: *const u8,
    r0: usize,
    cols: usize,
    x: *const f32,
    out: *mut f32,
    ld: usize,
) {
    let row = |q: usize| w.add((r0 + q) * cols * E::BYTES);
    let mut acc = [[_mm256_setzero_ps(); R]; WR];
    let full = cols / 8 * 8;
    let mut k = 0;
    while k < full {
        let wv: [__m256; WR] = std::array::from_fn(|q| E::load8(row(q).add(k * E::BYTES)));
        for j in 0..R {
            let xv = _mm256_loadu_ps(x.add(j * cols + k));
            for (aq, wq) in acc.iter_mut().zip(&wv) {
                aq[j] = _mm256_fmadd_ps(*wq, xv, aq[j]);
            }
        }
        k += 8;
    }
    for (q, aq) in acc.iter().enumerate() {
        for (j, a) in aq.iter().enumerate() {
            let mut s = hsum(*a);
            for t in full..cols {
                s += E::load1(row(q).add(t * E::BYTES)) * *x.add(j * cols + t);
            }
            *out.add(j * ld + r0 + q) = s;
        }
    }
}
