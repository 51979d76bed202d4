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

use super::activation::{BlockQ8, BlockQ8K};
use super::interleave::{
    GROUP, Q4K_GROUP_BLOCK, Q4K_MN, Q4K_QS, Q4K_SC, Q5K_GROUP_BLOCK, Q5K_QH, Q6K_QH, Q6K_QL, Q6K_SC,
};
use super::tile::TileArgs;
use super::GgmlType;

/// Four activation bytes `y[4g..4g+4]` in every 32-bit lane.
#[inline(always)]
unsafe fn bcast(y: *const i8, g: usize) -> __m256i {
    _mm256_set1_epi32((y.add(4 * g) as *const i32).read_unaligned())
}

/// How the eight-lane dot products of one block are formed.
trait Dot {
    /// A running sum of 4-bit chunk products: `acc(a, w, y)` adds `w · y` per lane (in 16-bit
    /// pairs without VNNI: at most eight chunks of 4-bit quants), [`Dot::finish`] gives the
    /// 32-bit sums.
    unsafe fn acc(a: __m256i, w: __m256i, y: __m256i) -> __m256i;
    unsafe fn finish(a: __m256i) -> __m256i;
    /// `a + w · y` per 32-bit lane, for `w ≤ 63` (each chunk widened to 32 bits at once).
    unsafe fn acc32(a: __m256i, w: __m256i, y: __m256i) -> __m256i;
    /// Σ over `g` of `w[g] · y[4g..4g+4]` per lane, for unsigned 4-bit `w`.
    unsafe fn nibbles(w: &[__m256i; 8], y: *const i8) -> __m256i;
    /// Signed 8-bit quants as [`Dot::signed`] takes them (once per block, for every row).
    unsafe fn prep_signed(w: [__m256i; 8]) -> [__m256i; 8];
    /// The same as [`Dot::nibbles`] for unsigned 5-bit `w` (too large for 16-bit pair sums of
    /// eight chunks).
    unsafe fn wide(w: &[__m256i; 8], y: *const i8) -> __m256i {
        let mut s = Self::acc32(_mm256_setzero_si256(), w[0], bcast(y, 0));
        for (g, wg) in w.iter().enumerate().skip(1) {
            s = Self::acc32(s, *wg, bcast(y, g));
        }
        s
    }
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
    unsafe fn acc(a: __m256i, w: __m256i, y: __m256i) -> __m256i {
        _mm256_add_epi16(a, _mm256_maddubs_epi16(w, y))
    }

    #[inline(always)]
    unsafe fn finish(a: __m256i) -> __m256i {
        _mm256_madd_epi16(a, _mm256_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn acc32(a: __m256i, w: __m256i, y: __m256i) -> __m256i {
        _mm256_add_epi32(a, Self::finish(_mm256_maddubs_epi16(w, y)))
    }

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
    unsafe fn acc(a: __m256i, w: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(a, w, y)
    }

    #[inline(always)]
    unsafe fn finish(a: __m256i) -> __m256i {
        a
    }

    #[inline(always)]
    unsafe fn acc32(a: __m256i, w: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(a, w, y)
    }

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
    /// Signed 8-bit quants (Q8_0), else unsigned 4- or 5-bit ones with a minimum term `m·s_x`.
    const SIGNED: bool;
    /// 5-bit quants (Q5_0, Q5_1).
    const FIVE: bool = false;
    /// The rows' minimums, given their scales `d`.
    unsafe fn mins(p: *const u8, d: __m256) -> __m256;
    /// The eight registers of the quants at `q`: lane `r` of register `g` holds row `r`'s
    /// elements `4g..4g+4`.
    unsafe fn regs(q: *const u8) -> [__m256i; 8];
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;
struct Q8_0;

/// 5-bit quants: [`nibble_regs`] plus each element's fifth bit from the rows' `qh` (lane `r`
/// holds row `r`'s 32 bits; bit `j` is element `j`'s): four bits at a time are spread to the
/// four bytes of a lane by one multiply (bit `k` lands on bit `8k`, the shifted copies never
/// overlap), then moved to value 16.
#[inline(always)]
unsafe fn five_regs(qh: *const u8, q: *const u8) -> [__m256i; 8] {
    let bits = _mm256_loadu_si256(qh as *const __m256i);
    let (nib, spread) = (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(0x0020_4081));
    let ones = _mm256_set1_epi32(0x0101_0101);
    let fifth = |j: i32| {
        let four = _mm256_and_si256(_mm256_srl_epi32(bits, _mm_cvtsi32_si128(j)), nib);
        let at = _mm256_and_si256(_mm256_mullo_epi32(four, spread), ones);
        _mm256_slli_epi32(at, 4)
    };
    let mut w = nibble_regs(q);
    for c in 0..4 {
        w[c] = _mm256_or_si256(w[c], fifth(4 * c as i32));
        w[4 + c] = _mm256_or_si256(w[4 + c], fifth(16 + 4 * c as i32));
    }
    w
}

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

impl Format for Q5_0 {
    const SIZE: usize = 22;
    const HEAD: usize = 48;
    const SIGNED: bool = false;
    const FIVE: bool = true;
    #[inline(always)]
    unsafe fn mins(_p: *const u8, d: __m256) -> __m256 {
        _mm256_mul_ps(d, _mm256_set1_ps(-16.0))
    }
    #[inline(always)]
    unsafe fn regs(q: *const u8) -> [__m256i; 8] {
        five_regs(q.sub(32), q)
    }
}

impl Format for Q5_1 {
    const SIZE: usize = 24;
    const HEAD: usize = 64;
    const SIGNED: bool = false;
    const FIVE: bool = true;
    #[inline(always)]
    unsafe fn mins(p: *const u8, _d: __m256) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i))
    }
    #[inline(always)]
    unsafe fn regs(q: *const u8) -> [__m256i; 8] {
        five_regs(q.sub(32), q)
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
/// The CPU must support AVX2, FMA and F16C; `ty` must be Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0; `a.w` must hold
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
        GgmlType::Q5_0 => tile_t::<Q5_0, D>(a),
        GgmlType::Q5_1 => tile_t::<Q5_1, D>(a),
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
                let s = match (F::SIGNED, F::FIVE) {
                    (true, _) => D::signed(&wq, y, ysum(j, b)),
                    (false, true) => D::wide(&wq, y),
                    (false, false) => D::nibbles(&wq, y),
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

/// The K-quant kernels (Q4_K, Q5_K, Q6_K; activations in Q8_K blocks): as [`tile`], with those
/// types' group blocks.
///
/// # Safety
/// As [`tile`], with `ty` Q4_K, Q5_K or Q6_K, `a.x` Q8_K blocks and `a.w` whole groups of
/// interleaved rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_kquant(ty: GgmlType, a: TileArgs<BlockQ8K>) {
    match ty {
        GgmlType::Q4K => kquant_for::<Q4kRows, Maddubs>(a),
        GgmlType::Q5K => kquant_for::<Q5kRows, Maddubs>(a),
        _ => kquant_for::<Q6kRows, Maddubs>(a),
    }
}

/// [`tile_kquant`] with `vpdpbusd`: the same results.
///
/// # Safety
/// As [`tile_kquant`], and the CPU must support AVX-512 VNNI and VL.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(crate) unsafe fn tile_kquant_vnni(ty: GgmlType, a: TileArgs<BlockQ8K>) {
    match ty {
        GgmlType::Q4K => kquant_for::<Q4kRows, Dpbusd>(a),
        GgmlType::Q5K => kquant_for::<Q5kRows, Dpbusd>(a),
        _ => kquant_for::<Q6kRows, Dpbusd>(a),
    }
}

/// The operands of one K-quant row tile: (weights, group bytes, groups, blocks per row,
/// activation rows, output, output stride).
type KArgs = (
    *const u8,
    usize,
    usize,
    usize,
    *const BlockQ8K,
    *mut f32,
    usize,
);

/// `R` activation rows against every group of one K-quant type.
trait KRows {
    /// Bytes of one group block.
    const BLOCK: usize;
    unsafe fn rows<D: Dot, const R: usize>(a: KArgs);
}

struct Q4kRows;
struct Q5kRows;
struct Q6kRows;

impl KRows for Q4kRows {
    const BLOCK: usize = Q4K_GROUP_BLOCK;
    #[inline(always)]
    unsafe fn rows<D: Dot, const R: usize>(a: KArgs) {
        q4k_rows::<D, R, false>(a)
    }
}

impl KRows for Q5kRows {
    const BLOCK: usize = Q5K_GROUP_BLOCK;
    #[inline(always)]
    unsafe fn rows<D: Dot, const R: usize>(a: KArgs) {
        q4k_rows::<D, R, true>(a)
    }
}

impl KRows for Q6kRows {
    const BLOCK: usize = 8 * 210;
    #[inline(always)]
    unsafe fn rows<D: Dot, const R: usize>(a: KArgs) {
        q6k_rows::<D, R>(a)
    }
}

#[inline(always)]
unsafe fn kquant_for<K: KRows, D: Dot>(a: TileArgs<BlockQ8K>) {
    let TileArgs {
        w,
        row_bytes,
        x,
        m,
        out,
        ld,
    } = a;
    let group_bytes = GROUP * row_bytes;
    let nb = group_bytes / K::BLOCK;
    let groups = w.len() / group_bytes;
    debug_assert!(x.len() >= m * nb && (m == 0 || out.len() >= (m - 1) * ld + GROUP * groups));
    let mut i0 = 0;
    while i0 < m {
        let rc = (m - i0).min(4);
        let o = out.as_mut_ptr().add(i0 * ld);
        let xs = x.as_ptr().add(i0 * nb);
        let args = (w.as_ptr(), group_bytes, groups, nb, xs, o, ld);
        match rc {
            4 => K::rows::<D, 4>(args),
            3 => K::rows::<D, 3>(args),
            2 => K::rows::<D, 2>(args),
            _ => K::rows::<D, 1>(args),
        }
        i0 += rc;
    }
}

/// `R` activation rows against every Q4_K group: (weights, group bytes, groups, blocks per
/// row, activation rows, output, output stride). Per super-block: each segment's 8 chunks
/// give two sub-blocks' sums per row, weighted by their scales (`vpmulld`); the mins by the
/// activation sums of the sub-blocks, with `vpmaddwd` over pairs of sub-blocks.
#[inline(always)]
/// With `FIVE` (Q5_K) each quant gains its fifth bit from the `qh` chunks, and the chunk sums
/// widen to 32 bits at once (5-bit pair sums of eight chunks would overflow 16 bits).
unsafe fn q4k_rows<D: Dot, const R: usize, const FIVE: bool>(
    (w, group_bytes, groups, nb, x, out, ld): KArgs,
) {
    let block = if FIVE {
        Q5K_GROUP_BLOCK
    } else {
        Q4K_GROUP_BLOCK
    };
    let one = _mm256_set1_epi8(1);
    let add = |a: __m256i, w: __m256i, y: __m256i| match FIVE {
        true => D::acc32(a, w, y),
        false => D::acc(a, w, y),
    };
    let fin = |a: __m256i| if FIVE { a } else { D::finish(a) };
    let mask = _mm256_set1_epi8(0x0F);
    for g in 0..groups {
        let gw = w.add(g * group_bytes);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut mins = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let p = gw.add(b * block);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
            let y: [*const i8; R] = std::array::from_fn(|j| (*x.add(j * nb + b)).qs.as_ptr());
            let mut isc = [_mm256_setzero_si256(); R];
            for s in 0..4 {
                // With one or two activation rows, even and odd chunks go to separate sums so
                // that enough independent chains overlap the instructions' latency.
                let zero = [_mm256_setzero_si256(); R];
                let (mut lo, mut hi) = ([zero; 2], [zero; 2]);
                for c in 0..8 {
                    let raw =
                        _mm256_loadu_si256(p.add(Q4K_QS + 32 * (8 * s + c)) as *const __m256i);
                    let mut wl = _mm256_and_si256(raw, mask);
                    let mut wh = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                    if FIVE {
                        // Bits 2s and 2s + 1 of each qh byte, moved to value 16 (the masks
                        // keep bits shifted in from the next byte out).
                        let qh = _mm256_loadu_si256(p.add(Q5K_QH + 32 * c) as *const __m256i);
                        let bit = |k: i32| {
                            let b =
                                _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(k)), one);
                            _mm256_slli_epi16(b, 4)
                        };
                        wl = _mm256_or_si256(wl, bit(2 * s as i32));
                        wh = _mm256_or_si256(wh, bit(2 * s as i32 + 1));
                    }
                    let h = if R <= 2 { c % 2 } else { 0 };
                    for j in 0..R {
                        lo[h][j] = add(lo[h][j], wl, bcast(y[j], 16 * s + c));
                        hi[h][j] = add(hi[h][j], wh, bcast(y[j], 16 * s + 8 + c));
                    }
                }
                let sum = |a: [[__m256i; R]; 2], j: usize| match R <= 2 {
                    true => _mm256_add_epi32(fin(a[0][j]), fin(a[1][j])),
                    false => fin(a[0][j]),
                };
                let sc = |k: usize| {
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(Q4K_SC + 8 * k) as *const __m128i))
                };
                let (sl, sh) = (sc(2 * s), sc(2 * s + 1));
                for (j, acc) in isc.iter_mut().enumerate() {
                    let t = _mm256_add_epi32(
                        _mm256_mullo_epi32(sum(lo, j), sl),
                        _mm256_mullo_epi32(sum(hi, j), sh),
                    );
                    *acc = _mm256_add_epi32(*acc, t);
                }
            }
            // Lane r of pair register q: (mn[2q][r], mn[2q + 1][r]) as two i16.
            let mn: [__m256i; 4] = std::array::from_fn(|q| {
                let a = _mm_loadl_epi64(p.add(Q4K_MN + 16 * q) as *const __m128i);
                let b2 = _mm_loadl_epi64(p.add(Q4K_MN + 16 * q + 8) as *const __m128i);
                _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b2))
            });
            for j in 0..R {
                let xb = &*x.add(j * nb + b);
                let bs = xb.bsums.as_ptr() as *const __m128i;
                // Sub-block sums: i16 lane k = bsums[2k] + bsums[2k + 1]; 32-bit lane q is the
                // pair (k = 2q, 2q + 1).
                let ys = _mm_hadd_epi16(_mm_loadu_si128(bs), _mm_loadu_si128(bs.add(1)));
                let mut imn = _mm256_setzero_si256();
                for (q, mq) in mn.iter().enumerate() {
                    let pair = _mm256_set1_epi32(ys_lane(ys, q));
                    imn = _mm256_add_epi32(imn, _mm256_madd_epi16(*mq, pair));
                }
                let xd = _mm256_set1_ps(xb.d);
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isc[j]), _mm256_mul_ps(d, xd), acc[j]);
                mins[j] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(imn), _mm256_mul_ps(dmin, xd), mins[j]);
            }
        }
        for j in 0..R {
            _mm256_storeu_ps(out.add(j * ld + g * GROUP), _mm256_sub_ps(acc[j], mins[j]));
        }
    }
}

/// 32-bit lane `q` (0..4) of `v`.
#[inline(always)]
unsafe fn ys_lane(v: __m128i, q: usize) -> i32 {
    match q {
        0 => _mm_extract_epi32::<0>(v),
        1 => _mm_extract_epi32::<1>(v),
        2 => _mm_extract_epi32::<2>(v),
        _ => _mm_extract_epi32::<3>(v),
    }
}

/// `R` activation rows against every Q6_K group (see [`KArgs`]). Per half of a super-block
/// and run of four chunk columns, the four kinds of quants (low/high nibble of the two `ql`
/// runs, each with two bits of `qh`) are rebuilt as bytes `0..=63` and give four sub-blocks'
/// exact sums for all eight rows; each is offset by `32·Σy` and weighted by its scale.
#[inline(always)]
unsafe fn q6k_rows<D: Dot, const R: usize>((w, group_bytes, groups, nb, x, out, ld): KArgs) {
    let m4 = _mm256_set1_epi8(0x0F);
    let m3 = _mm256_set1_epi8(0x03);
    let m30 = _mm256_set1_epi8(0x30);
    let chunk = |p: *const u8, off: usize, i: usize| {
        _mm256_loadu_si256(p.add(off + 32 * i) as *const __m256i)
    };
    for g in 0..groups {
        let gw = w.add(g * group_bytes);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let p = gw.add(b * Q6kRows::BLOCK);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let xbs: [&BlockQ8K; R] = std::array::from_fn(|j| &*x.add(j * nb + b));
            let mut isc = [_mm256_setzero_si256(); R];
            for h in 0..2 {
                for t in 0..2 {
                    // Sums of sub-blocks 8h + 2k + t for the four kinds k.
                    let mut s = [[_mm256_setzero_si256(); R]; 4];
                    for c in 4 * t..4 * t + 4 {
                        let a = chunk(p, Q6K_QL, 16 * h + c);
                        let bq = chunk(p, Q6K_QL, 16 * h + 8 + c);
                        let hb = chunk(p, Q6K_QH, 8 * h + c);
                        let h2 = _mm256_srli_epi16(hb, 2);
                        let q = [
                            _mm256_or_si256(
                                _mm256_and_si256(a, m4),
                                _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(bq, m4),
                                _mm256_slli_epi16(_mm256_and_si256(h2, m3), 4),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(a, 4), m4),
                                _mm256_and_si256(hb, m30),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16(bq, 4), m4),
                                _mm256_and_si256(h2, m30),
                            ),
                        ];
                        for (k, qk) in q.iter().enumerate() {
                            for j in 0..R {
                                let y = xbs[j].qs.as_ptr();
                                s[k][j] = D::acc32(s[k][j], *qk, bcast(y, 32 * h + 8 * k + c));
                            }
                        }
                    }
                    for (k, sk) in s.iter().enumerate() {
                        let sub = 8 * h + 2 * k + t;
                        let sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            p.add(Q6K_SC + 8 * sub) as *const __m128i
                        ));
                        for j in 0..R {
                            let off = _mm256_set1_epi32(32 * xbs[j].bsums[sub] as i32);
                            let v = _mm256_mullo_epi32(_mm256_sub_epi32(sk[j], off), sc);
                            isc[j] = _mm256_add_epi32(isc[j], v);
                        }
                    }
                }
            }
            for j in 0..R {
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(xbs[j].d));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isc[j]), scale, acc[j]);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(j * ld + g * GROUP), *a);
        }
    }
}
