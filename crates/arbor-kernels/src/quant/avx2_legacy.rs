//! AVX2 kernels for the 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1)
//! against [`BlockQ8`] activations.
//!
//! Each weight block is unpacked once into 32 bytes in one register, then multiplied with the
//! activation bytes of up to four activation rows (`vpmaddubsw` + `vpmaddwd`, 32 products per
//! pair of instructions), scaled in f32 with one FMA per block and row. The 4/5-bit types are
//! unsigned (0..=31) and carry a minimum (`m·s_x` added in scalar); Q8_0/Q8_1 are signed and use
//! the sign trick (`|w|` times `x` with `w`'s sign).
//!
//! Where the CPU also has AVX-512 VNNI (with VL), [`tile_vnni`] runs the same kernels with one
//! `vpdpbusd` per 32 products instead of the pair: the sums are the same integers (the pair
//! never saturates here: |u| ≤ 128 and |y| ≤ 127 give at most 2·128·127 < 2^15 per 16-bit
//! lane), so the results are bitwise those of [`tile`].
//!
//! Only reached through [`super::tile::dot_tile`], which checks every length first and calls
//! these only when the CPU has AVX2, FMA and F16C (and VNNI for [`tile_vnni`]).

use std::arch::x86_64::*;

use super::activation::BlockQ8;
use super::tile::TileArgs;
use super::GgmlType;

/// f16 → f32 with F16C.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    let h = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// Two adjacent f16 (`d`, `m`) → f32.
#[inline(always)]
unsafe fn f16x2_at(p: *const u8) -> (f32, f32) {
    let h = (p as *const u32).read_unaligned();
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(h as i32));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// 16 bytes of nibbles → 32 bytes `0..=15`: low nibbles first (elements 0..16), then the high
/// nibbles (elements 16..32), matching ggml's element order.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// The 32 bits of `qh` as 32 bytes: byte `j` is 16 when bit `j` is set, else 0.
#[inline(always)]
unsafe fn fifth_bits(qh: u32) -> __m256i {
    // Byte j of the result reads byte j / 8 of qh and tests bit j % 8.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh as i32),
        _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(16))
}

/// A legacy block as AVX2 loads it: quants in one register, plus `d` and the minimum `m`
/// (element = `d·q + m`). Q4_0/Q5_0 fold their offset into `m`, as in `legacy::Decoded`.
trait Block {
    const SIZE: usize;
    /// Signed quants (Q8_0/Q8_1) rather than `0..=31` with a minimum.
    const SIGNED: bool;
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32);
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;
struct Q8_0;
struct Q8_1;

impl Block for Q4_0 {
    const SIZE: usize = 18;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        let d = f16_at(p);
        (nibbles(p.add(2)), d, -8.0 * d)
    }
}

impl Block for Q4_1 {
    const SIZE: usize = 20;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        let (d, m) = f16x2_at(p);
        (nibbles(p.add(4)), d, m)
    }
}

impl Block for Q5_0 {
    const SIZE: usize = 22;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        let d = f16_at(p);
        let qh = (p.add(2) as *const u32).read_unaligned();
        (
            _mm256_or_si256(nibbles(p.add(6)), fifth_bits(qh)),
            d,
            -16.0 * d,
        )
    }
}

impl Block for Q5_1 {
    const SIZE: usize = 24;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        let (d, m) = f16x2_at(p);
        let qh = (p.add(4) as *const u32).read_unaligned();
        (_mm256_or_si256(nibbles(p.add(8)), fifth_bits(qh)), d, m)
    }
}

impl Block for Q8_0 {
    const SIZE: usize = 34;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        (
            _mm256_loadu_si256(p.add(2) as *const __m256i),
            f16_at(p),
            0.0,
        )
    }
}

impl Block for Q8_1 {
    const SIZE: usize = 36;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> (__m256i, f32, f32) {
        (
            _mm256_loadu_si256(p.add(4) as *const __m256i),
            f16_at(p),
            0.0,
        )
    }
}

/// Sum of the 8 lanes.
#[inline(always)]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Eight i32 sums of four products each, of 32 unsigned bytes `u` with 32 signed bytes `y`.
trait Dot4 {
    unsafe fn dot(u: __m256i, y: __m256i) -> __m256i;
}

/// `vpmaddubsw` then `vpmaddwd` by ones (AVX2).
struct Maddubs;

/// `vpdpbusd` (AVX-512 VNNI on 256-bit registers).
struct Dpbusd;

impl Dot4 for Maddubs {
    #[inline(always)]
    unsafe fn dot(u: __m256i, y: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), _mm256_set1_epi16(1))
    }
}

impl Dot4 for Dpbusd {
    #[inline(always)]
    unsafe fn dot(u: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, y)
    }
}

/// `out[i·ld + r] = dot(weight row r, activation row i)`; see `tile::dot_tile`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `ty` must be a legacy type; `a.w` must hold whole
/// rows of `a.row_bytes` (a multiple of the block size), `a.x` at least
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

/// The kernels, inlined into the entry point whose target features they compile for.
#[inline(always)]
unsafe fn tile_for<D: Dot4>(ty: GgmlType, a: TileArgs<BlockQ8>) {
    let TileArgs {
        w,
        row_bytes,
        x,
        m,
        out,
        ld,
    } = a;
    match ty {
        GgmlType::Q4_0 => tile_t::<Q4_0, D>(w, row_bytes, x, m, out, ld),
        GgmlType::Q4_1 => tile_t::<Q4_1, D>(w, row_bytes, x, m, out, ld),
        GgmlType::Q5_0 => tile_t::<Q5_0, D>(w, row_bytes, x, m, out, ld),
        GgmlType::Q5_1 => tile_t::<Q5_1, D>(w, row_bytes, x, m, out, ld),
        GgmlType::Q8_0 => tile_t::<Q8_0, D>(w, row_bytes, x, m, out, ld),
        GgmlType::Q8_1 => tile_t::<Q8_1, D>(w, row_bytes, x, m, out, ld),
        _ => unreachable!("avx2_legacy::tile called with {ty}"),
    }
}

#[inline(always)]
unsafe fn tile_t<B: Block, D: Dot4>(
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ8],
    m: usize,
    out: &mut [f32],
    ld: usize,
) {
    let nb = row_bytes / B::SIZE;
    let nrows = w.len() / row_bytes;
    debug_assert!(x.len() >= m * nb && (m == 0 || out.len() >= (m - 1) * ld + nrows));
    let mut i0 = 0;
    while i0 < m {
        let xs = x.as_ptr().add(i0 * nb);
        let o = out.as_mut_ptr().add(i0 * ld);
        let rc = (m - i0).min(4);
        match rc {
            4 => rows::<B, D, 4>(w.as_ptr(), row_bytes, nrows, nb, xs, o, ld),
            3 => rows::<B, D, 3>(w.as_ptr(), row_bytes, nrows, nb, xs, o, ld),
            2 => rows::<B, D, 2>(w.as_ptr(), row_bytes, nrows, nb, xs, o, ld),
            _ if B::SIGNED => rows::<B, D, 1>(w.as_ptr(), row_bytes, nrows, nb, xs, o, ld),
            _ => {
                // One activation row (decode) with 4/5-bit weights: two weight rows per pass,
                // so the activation blocks are loaded once for both and the two FMA chains
                // overlap (~10% less CPU per block; measured slower for Q8_0, which streams
                // twice the bytes and is bound by memory, so that keeps one row per pass).
                let pairs = nrows / 2;
                row_pairs::<B, D>(w.as_ptr(), row_bytes, pairs, nb, xs, o);
                let wt = w.as_ptr().add(2 * pairs * row_bytes);
                rows::<B, D, 1>(wt, row_bytes, nrows % 2, nb, xs, o.add(2 * pairs), ld);
            }
        }
        i0 += rc;
    }
}

/// One activation row against `2·pairs` weight rows; results go to `out[r]`.
#[inline(always)]
unsafe fn row_pairs<B: Block, D: Dot4>(
    w: *const u8,
    row_bytes: usize,
    pairs: usize,
    nb: usize,
    x: *const BlockQ8,
    out: *mut f32,
) {
    for pr in 0..pairs {
        let w0 = w.add(2 * pr * row_bytes);
        let w1 = w0.add(row_bytes);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut min0, mut min1) = (0.0f32, 0.0f32);
        for b in 0..nb {
            let xb = &*x.add(b);
            let y = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            let (q0, d0, m0) = B::load(w0.add(b * B::SIZE));
            let (q1, d1, m1) = B::load(w1.add(b * B::SIZE));
            let (u0, y0) = if B::SIGNED {
                (_mm256_sign_epi8(q0, q0), _mm256_sign_epi8(y, q0))
            } else {
                (q0, y)
            };
            let (u1, y1) = if B::SIGNED {
                (_mm256_sign_epi8(q1, q1), _mm256_sign_epi8(y, q1))
            } else {
                (q1, y)
            };
            let (p0, p1) = (D::dot(u0, y0), D::dot(u1, y1));
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * xb.d), _mm256_cvtepi32_ps(p0), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1 * xb.d), _mm256_cvtepi32_ps(p1), acc1);
            if !B::SIGNED {
                min0 += m0 * xb.s;
                min1 += m1 * xb.s;
            }
        }
        *out.add(2 * pr) = hsum(acc0) + min0;
        *out.add(2 * pr + 1) = hsum(acc1) + min1;
    }
}

/// `R ≤ 4` activation rows (starting at `x`, `nb` blocks each) against every weight row;
/// results go to `out[j·ld + r]`. The rows' scales and sums are gathered per block first, so
/// that a weight block's `R` scale products are one 4-lane multiply and its minimum terms one
/// multiply and one add, instead of `R` scalar ones each (the same operations on each value as
/// [`row_pairs`], so the same results).
#[inline(always)]
unsafe fn rows<B: Block, D: Dot4, const R: usize>(
    w: *const u8,
    row_bytes: usize,
    nrows: usize,
    nb: usize,
    x: *const BlockQ8,
    out: *mut f32,
    ld: usize,
) {
    // Lanes past R stay 0.
    let gather = |f: fn(&BlockQ8) -> f32| -> Vec<[f32; 4]> {
        (0..nb)
            .map(|b| std::array::from_fn(|j| if j < R { f(&*x.add(j * nb + b)) } else { 0.0 }))
            .collect()
    };
    let (ds, ss) = (gather(|xb| xb.d), gather(|xb| xb.s));
    let lane: [__m256i; 4] = std::array::from_fn(|j| _mm256_set1_epi32(j as i32));
    for r in 0..nrows {
        let wr = w.add(r * row_bytes);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut mins = _mm_setzero_ps();
        for b in 0..nb {
            let (q, d, mn) = B::load(wr.add(b * B::SIZE));
            let uq = if B::SIGNED { _mm256_sign_epi8(q, q) } else { q };
            // d·d_x of the rows, lane j for row j.
            let scale = _mm256_castps128_ps256(_mm_mul_ps(
                _mm_set1_ps(d),
                _mm_loadu_ps(ds.get_unchecked(b).as_ptr()),
            ));
            for (j, a) in acc.iter_mut().enumerate() {
                let xb = &*x.add(j * nb + b);
                let y = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                let y = if B::SIGNED { _mm256_sign_epi8(y, q) } else { y };
                let p = D::dot(uq, y);
                let sj = _mm256_permutevar8x32_ps(scale, lane[j]);
                *a = _mm256_fmadd_ps(sj, _mm256_cvtepi32_ps(p), *a);
            }
            if !B::SIGNED {
                let m = _mm_mul_ps(_mm_set1_ps(mn), _mm_loadu_ps(ss.get_unchecked(b).as_ptr()));
                mins = _mm_add_ps(mins, m);
            }
        }
        let mut m4 = [0.0f32; 4];
        _mm_storeu_ps(m4.as_mut_ptr(), mins);
        for (j, a) in acc.iter().enumerate() {
            *out.add(j * ld + r) = hsum(*a) + m4[j];
        }
    }
}
