//! AVX2 kernels for weights interleaved in groups of eight rows (see [`super::interleave`]).
//!
//! Per group block: the eight rows' `d` (and `m`) are one f16→f32 conversion each; the quants
//! are eight registers `w[g]`, lane `r` holding row `r`'s elements `4g..4g+4`; each activation
//! row multiplies them with its bytes `4g..4g+4` broadcast to every lane, so the eight rows'
//! exact block sums come out in the eight lanes of one register, which one FMA scales into
//! the rows' accumulators. With VNNI a chunk is one `vpdpbusd`; without, `vpmaddubsw` and
//! `vpmaddwd`. The integer sums are exact either way, so both match the portable kernel bit
//! for bit (see the module documentation of `interleave`).

use std::arch::x86_64::*;

use super::activation::BlockQ8;
use super::interleave::GROUP;
use super::tile::TileArgs;
use super::GgmlType;

/// Four activation bytes `y[4g..4g+4]` in every 32-bit lane.
#[inline(always)]
unsafe fn bcast(y: *const i8, g: usize) -> __m256i {
    _mm256_set1_epi32((y.add(4 * g) as *const i32).read_unaligned())
}

/// How the eight-lane dot products of one block are formed.
trait Dot {
    /// Σ over `g` of `w[g] · y[4g..4g+4]` per lane, for unsigned 4-bit `w`.
    unsafe fn nibbles(w: &[__m256i; 8], y: *const i8) -> __m256i;
    /// Signed 8-bit quants as [`Dot::signed`] takes them (once per block, for every row).
    unsafe fn prep_signed(w: [__m256i; 8]) -> [__m256i; 8];
    /// The same as [`Dot::nibbles`] for signed 8-bit `w` (after [`Dot::prep_signed`]);
    /// `ysum = Σ y` (used by the VNNI form).
    unsafe fn signed(w: &[__m256i; 8], y: *const i8, ysum: i32) -> __m256i;
}

/// `vpmaddubsw` + `vpmaddwd` (AVX2).
struct Maddubs;
/// `vpdpbusd` (AVX-512 VNNI on 256-bit registers).
struct Dpbusd;

impl Dot for Maddubs {
    #[inline(always)]
    unsafe fn nibbles(w: &[__m256i; 8], y: *const i8) -> __m256i {
        // 16-bit pair sums are at most 2·15·127; eight of them stay below 2^15.
        let mut s = _mm256_maddubs_epi16(w[0], bcast(y, 0));
        for (g, wg) in w.iter().enumerate().skip(1) {
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(*wg, bcast(y, g)));
        }
        _mm256_madd_epi16(s, _mm256_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn prep_signed(w: [__m256i; 8]) -> [__m256i; 8] {
        w
    }

    #[inline(always)]
    unsafe fn signed(w: &[__m256i; 8], y: *const i8, _ysum: i32) -> __m256i {
        // |w|·(y with w's sign): pair sums up to 2·128·127 fit 16 bits, but not two of them.
        let ones = _mm256_set1_epi16(1);
        let mut s = _mm256_setzero_si256();
        for (g, wg) in w.iter().enumerate() {
            let p = _mm256_maddubs_epi16(
                _mm256_sign_epi8(*wg, *wg),
                _mm256_sign_epi8(bcast(y, g), *wg),
            );
            s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
        }
        s
    }
}

impl Dot for Dpbusd {
    #[inline(always)]
    unsafe fn nibbles(w: &[__m256i; 8], y: *const i8) -> __m256i {
        // Two chains, so that the eight dependent instructions overlap.
        let (mut a, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for g in (0..8).step_by(2) {
            a = _mm256_dpbusd_epi32(a, w[g], bcast(y, g));
            b = _mm256_dpbusd_epi32(b, w[g + 1], bcast(y, g + 1));
        }
        _mm256_add_epi32(a, b)
    }

    /// `w + 128`, unsigned: (w + 128)·y = w·y + 128·Σy, one instruction per chunk.
    #[inline(always)]
    unsafe fn prep_signed(w: [__m256i; 8]) -> [__m256i; 8] {
        let flip = _mm256_set1_epi8(-128);
        w.map(|v| _mm256_xor_si256(v, flip))
    }

    #[inline(always)]
    unsafe fn signed(w: &[__m256i; 8], y: *const i8, ysum: i32) -> __m256i {
        let s = Self::nibbles(w, y);
        _mm256_sub_epi32(s, _mm256_set1_epi32(128 * ysum))
    }
}

/// A group block of one interleaved type.
trait Format {
    /// Bytes of one row's block (a group block is eight of them).
    const SIZE: usize;
    /// Bytes of scales before the quants.
    const HEAD: usize;
    /// Signed 8-bit quants (Q8_0), else unsigned 4-bit ones with a minimum term `m·s_x`.
    const SIGNED: bool;
    /// The rows' minimums, given their scales `d`.
    unsafe fn mins(p: *const u8, d: __m256) -> __m256;
    /// The eight registers of the quants at `q`: lane `r` of register `g` holds row `r`'s
    /// elements `4g..4g+4`.
    unsafe fn regs(q: *const u8) -> [__m256i; 8];
}

struct Q4_0;
struct Q4_1;
struct Q8_0;

/// 4-bit quants: the low nibbles of chunk `c` are elements `4c..`, the high ones `16 + 4c..`.
#[inline(always)]
unsafe fn nibble_regs(q: *const u8) -> [__m256i; 8] {
    let mask = _mm256_set1_epi8(0x0F);
    let mut w = [_mm256_setzero_si256(); 8];
    for c in 0..4 {
        let raw = _mm256_loadu_si256(q.add(32 * c) as *const __m256i);
        w[c] = _mm256_and_si256(raw, mask);
        w[4 + c] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    }
    w
}

impl Format for Q4_0 {
    const SIZE: usize = 18;
    const HEAD: usize = 16;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn mins(_p: *const u8, d: __m256) -> __m256 {
        _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
    }
    #[inline(always)]
    unsafe fn regs(q: *const u8) -> [__m256i; 8] {
        nibble_regs(q)
    }
}

impl Format for Q4_1 {
    const SIZE: usize = 20;
    const HEAD: usize = 32;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn mins(p: *const u8, _d: __m256) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i))
    }
    #[inline(always)]
    unsafe fn regs(q: *const u8) -> [__m256i; 8] {
        nibble_regs(q)
    }
}

impl Format for Q8_0 {
    const SIZE: usize = 34;
    const HEAD: usize = 16;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn mins(_p: *const u8, _d: __m256) -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn regs(q: *const u8) -> [__m256i; 8] {
        std::array::from_fn(|c| _mm256_loadu_si256(q.add(32 * c) as *const __m256i))
    }
}

/// `out[i·ld + r] = dot(weight row r, activation row i)`; see `tile::dot_tile`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `ty` must be Q4_0, Q4_1 or Q8_0; `a.w` must hold
/// whole groups of eight interleaved rows of `a.row_bytes`, `a.x` at least
/// `a.m · row_bytes / SIZE` blocks and `a.out` at least `(m − 1)·ld + rows` values, `ld ≥ rows`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile(ty: GgmlType, a: TileArgs<BlockQ8>) {
    tile_for::<Maddubs>(ty, a)
}

/// [`tile`] with `vpdpbusd`: the same results.
///
/// # Safety
/// As [`tile`], and the CPU must support AVX-512 VNNI and VL.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(crate) unsafe fn tile_vnni(ty: GgmlType, a: TileArgs<BlockQ8>) {
    tile_for::<Dpbusd>(ty, a)
}

#[inline(always)]
unsafe fn tile_for<D: Dot>(ty: GgmlType, a: TileArgs<BlockQ8>) {
    match ty {
        GgmlType::Q4_0 => tile_t::<Q4_0, D>(a),
        GgmlType::Q4_1 => tile_t::<Q4_1, D>(a),
        GgmlType::Q8_0 => tile_t::<Q8_0, D>(a),
        _ => unreachable!("avx2_interleave::tile called with {ty}"),
    }
}

#[inline(always)]
unsafe fn tile_t<F: Format, D: Dot>(a: TileArgs<BlockQ8>) {
    let TileArgs {
        w,
        row_bytes,
        x,
        m,
        out,
        ld,
    } = a;
    let nb = row_bytes / F::SIZE;
    let groups = w.len() / (GROUP * row_bytes);
    debug_assert!(x.len() >= m * nb && (m == 0 || out.len() >= (m - 1) * ld + GROUP * groups));
    // Σ of each activation block's bytes (only the signed VNNI dot reads them).
    let ysums: Vec<i32> = match F::SIGNED {
        false => Vec::new(),
        true => x[..m * nb]
            .iter()
            .map(|b| b.qs.iter().map(|&q| q as i32).sum())
            .collect(),
    };
    let ysum = |k: usize| ysums.get(k).copied().unwrap_or(0);
    let mut i0 = 0;
    while i0 < m {
        let rc = (m - i0).min(4);
        let o = out.as_mut_ptr().add(i0 * ld);
        let xs = x.as_ptr().add(i0 * nb);
        let args = (w.as_ptr(), row_bytes, groups, nb, xs, o, ld);
        let sums = |j: usize, b: usize| ysum((i0 + j) * nb + b);
        match rc {
            4 => groups_rows::<F, D, 4>(args, sums),
            3 => groups_rows::<F, D, 3>(args, sums),
            2 => groups_rows::<F, D, 2>(args, sums),
            _ => groups_rows::<F, D, 1>(args, sums),
        }
        i0 += rc;
    }
}

/// `R` activation rows against every group: (weights, row bytes, groups, blocks per row,
/// activation rows, output, output stride); `ysum(j, b)` is Σ of row `j`'s block `b`.
#[inline(always)]
unsafe fn groups_rows<F: Format, D: Dot, const R: usize>(
    (w, row_bytes, groups, nb, x, out, ld): (
        *const u8,
        usize,
        usize,
        usize,
        *const BlockQ8,
        *mut f32,
        usize,
    ),
    ysum: impl Fn(usize, usize) -> i32,
) {
    for g in 0..groups {
        let gw = w.add(g * GROUP * row_bytes);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut mins = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let p = gw.add(b * GROUP * F::SIZE);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let mn = F::mins(p, d);
            let wq = match F::SIGNED {
                true => D::prep_signed(F::regs(p.add(F::HEAD))),
                false => F::regs(p.add(F::HEAD)),
            };
            for j in 0..R {
                let xb = &*x.add(j * nb + b);
                let y = xb.qs.as_ptr();
                let s = match F::SIGNED {
                    true => D::signed(&wq, y, ysum(j, b)),
                    false => D::nibbles(&wq, y),
                };
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(xb.d));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[j]);
                if !F::SIGNED {
                    mins[j] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xb.s), mins[j]);
                }
            }
        }
        for j in 0..R {
            _mm256_storeu_ps(out.add(j * ld + g * GROUP), _mm256_add_ps(acc[j], mins[j]));
        }
    }
}
