//! AVX2 kernels for the K-quant super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) against
//! [`BlockQ8K`] activations.
//!
//! Every type is unpacked, once per super-block, into eight registers of 32 unsigned quants in
//! element order plus one i16 scale vector per 32 elements (the low half scaling the first 16,
//! the high half the next 16), exactly the shape `kquants::DecodedK` describes. The dot with an
//! activation row is then type-independent: `vpmaddubsw` (quant × activation) and `vpmaddwd`
//! (× scale) per 32 elements, and the minimum/offset correction as one `vpmaddwd` of a
//! per-16 vector with the activation's 16 block sums. Q8_K weights take the portable path.
//!
//! Where the CPU also has AVX-512 VNNI (with VL), [`tile_vnni`] fuses each scale `vpmaddwd`
//! with its accumulation into one `vpdpwssd`: the same integers, so bitwise the same results.
//!
//! Only reached through [`super::tile::dot_tile`], which checks every length first and calls
//! these only when the CPU has AVX2, FMA and F16C (and VNNI for [`tile_vnni`]).

use std::arch::x86_64::*;

use super::activation::BlockQ8K;
use super::avx2_legacy::hsum;
use super::kquants::{k3_scales, k4_scales_mins};
use super::tile::TileArgs;
use super::GgmlType;

/// A super-block unpacked for the dot product: element value = `d·sc·q`, plus the correction
/// `cd · Σ_k cm[k]·bsum[k]` over the 16 groups of 16.
struct Unpacked {
    q: [__m256i; 8],
    sc: [__m256i; 8],
    cm: __m256i,
    d: f32,
    cd: f32,
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    let h = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

#[inline(always)]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// Scale vectors from 16 per-16 scales: vector `g` holds `s[2g]` in its low half and
/// `s[2g + 1]` in its high half.
#[inline(always)]
unsafe fn per16_scales(s: &[i16; 16]) -> [__m256i; 8] {
    let mut out = [_mm256_setzero_si256(); 8];
    for (g, o) in out.iter_mut().enumerate() {
        *o = _mm256_set_m128i(_mm_set1_epi16(s[2 * g + 1]), _mm_set1_epi16(s[2 * g]));
    }
    out
}

/// The unsigned quants of the two 4-bit halves of 32 bytes.
#[inline(always)]
unsafe fn split_nibbles(v: __m256i) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0x0F);
    (
        _mm256_and_si256(v, m4),
        _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
    )
}

trait SuperBlock {
    const SIZE: usize;
    unsafe fn unpack(p: *const u8) -> Unpacked;
}

struct Q2K;
struct Q3K;
struct Q4K;
struct Q5K;
struct Q6K;

impl SuperBlock for Q2K {
    const SIZE: usize = 84;
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> Unpacked {
        let scales = std::slice::from_raw_parts(p, 16);
        let mut sc = [0i16; 16];
        for (s, &b) in sc.iter_mut().zip(scales) {
            *s = (b & 0x0F) as i16;
        }
        let raw = _mm_loadu_si128(p as *const __m128i);
        let cm = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F)));
        let mut q = [_mm256_setzero_si256(); 8];
        let m2 = _mm256_set1_epi8(3);
        for h in 0..2 {
            let mut bits = load(p.add(16 + 32 * h));
            for j in 0..4 {
                q[4 * h + j] = _mm256_and_si256(bits, m2);
                bits = _mm256_srli_epi16(bits, 2);
            }
        }
        Unpacked {
            q,
            sc: per16_scales(&sc),
            cm,
            d: f16_at(p.add(80)),
            cd: -f16_at(p.add(82)),
        }
    }
}

impl SuperBlock for Q3K {
    const SIZE: usize = 110;
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> Unpacked {
        let s8 = k3_scales(std::slice::from_raw_parts(p.add(96), 12));
        let mut sc = [0i16; 16];
        for (s, &v) in sc.iter_mut().zip(&s8) {
            *s = v as i16;
        }
        let cm = _mm256_cvtepi8_epi16(_mm_loadu_si128(s8.as_ptr() as *const __m128i));
        let (m2, one) = (_mm256_set1_epi8(3), _mm256_set1_epi8(1));
        let mut hbits = load(p);
        let mut q = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            let mut bits = load(p.add(32 + 32 * h));
            for j in 0..4 {
                let high = _mm256_slli_epi16(_mm256_and_si256(hbits, one), 2);
                q[4 * h + j] = _mm256_or_si256(_mm256_and_si256(bits, m2), high);
                bits = _mm256_srli_epi16(bits, 2);
                hbits = _mm256_srli_epi16(hbits, 1);
            }
        }
        let d = f16_at(p.add(108));
        Unpacked {
            q,
            sc: per16_scales(&sc),
            cm,
            d,
            cd: -4.0 * d,
        }
    }
}

/// Q4_K and Q5_K share scales, mins and the nibble layout.
#[inline(always)]
unsafe fn unpack_q45k(p: *const u8, five: bool) -> Unpacked {
    let (sc, mn) = k4_scales_mins(std::slice::from_raw_parts(p.add(4), 12));
    let mut scv = [_mm256_setzero_si256(); 8];
    for (v, &s) in scv.iter_mut().zip(&sc) {
        *v = _mm256_set1_epi16(s as i16);
    }
    // Each min covers two groups of 16: duplicate it before widening.
    let mn8 = _mm_loadl_epi64(mn.as_ptr() as *const __m128i);
    let cm = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn8, mn8));
    let qs = if five { p.add(48) } else { p.add(16) };
    let mut q = [_mm256_setzero_si256(); 8];
    for c in 0..4 {
        let (lo, hi) = split_nibbles(load(qs.add(32 * c)));
        q[2 * c] = lo;
        q[2 * c + 1] = hi;
    }
    if five {
        let one = _mm256_set1_epi8(1);
        let mut hbits = load(p.add(16));
        for v in q.iter_mut() {
            *v = _mm256_or_si256(*v, _mm256_slli_epi16(_mm256_and_si256(hbits, one), 4));
            hbits = _mm256_srli_epi16(hbits, 1);
        }
    }
    Unpacked {
        q,
        sc: scv,
        cm,
        d: f16_at(p),
        cd: -f16_at(p.add(2)),
    }
}

impl SuperBlock for Q4K {
    const SIZE: usize = 144;
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> Unpacked {
        unpack_q45k(p, false)
    }
}

impl SuperBlock for Q5K {
    const SIZE: usize = 176;
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> Unpacked {
        unpack_q45k(p, true)
    }
}

impl SuperBlock for Q6K {
    const SIZE: usize = 210;
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> Unpacked {
        let raw_sc = _mm_loadu_si128(p.add(192) as *const __m128i);
        let cm = _mm256_cvtepi8_epi16(raw_sc);
        let mut sc = [0i16; 16];
        _mm256_storeu_si256(sc.as_mut_ptr() as *mut __m256i, cm);
        let m30 = _mm256_set1_epi8(0x30);
        let mut q = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            let (l0, l2) = split_nibbles(load(p.add(64 * h)));
            let (l1, l3) = split_nibbles(load(p.add(64 * h + 32)));
            let hb = load(p.add(128 + 32 * h));
            // Top two bits of element group k are bits 2k..2k+2 of qh, moved to bits 4..6.
            q[4 * h] = _mm256_or_si256(l0, _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30));
            q[4 * h + 1] = _mm256_or_si256(l1, _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30));
            q[4 * h + 2] = _mm256_or_si256(l2, _mm256_and_si256(hb, m30));
            q[4 * h + 3] = _mm256_or_si256(l3, _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30));
        }
        let d = f16_at(p.add(208));
        Unpacked {
            q,
            sc: per16_scales(&sc),
            cm,
            d,
            cd: -32.0 * d,
        }
    }
}

/// `acc + Σ pairs of p·sc` per i32 lane (16-bit products of the quant sums with their scales).
trait ScaleAcc {
    unsafe fn acc(acc: __m256i, p: __m256i, sc: __m256i) -> __m256i;
}

/// `vpmaddwd` then `vpaddd` (AVX2).
struct MaddAdd;

/// `vpdpwssd` (AVX-512 VNNI on 256-bit registers).
struct Dpwssd;

impl ScaleAcc for MaddAdd {
    #[inline(always)]
    unsafe fn acc(acc: __m256i, p: __m256i, sc: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, sc))
    }
}

impl ScaleAcc for Dpwssd {
    #[inline(always)]
    unsafe fn acc(acc: __m256i, p: __m256i, sc: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(acc, p, sc)
    }
}

/// `out[i·ld + r] = dot(weight row r, activation row i)`; see `tile::dot_tile`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `ty` must be Q2_K..Q6_K; `a.w` must hold whole
/// rows of `a.row_bytes` (a multiple of the block size), `a.x` at least `m · row_bytes / SIZE`
/// blocks and `a.out` at least `(m − 1)·ld + rows` values, `ld ≥ rows`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile(ty: GgmlType, a: TileArgs<BlockQ8K>) {
    tile_for::<MaddAdd>(ty, a)
}

/// [`tile`] with `vpdpwssd`: the same results.
///
/// # Safety
/// As [`tile`], and the CPU must support AVX-512 VNNI and VL.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(crate) unsafe fn tile_vnni(ty: GgmlType, a: TileArgs<BlockQ8K>) {
    tile_for::<Dpwssd>(ty, a)
}

/// The kernels, inlined into the entry point whose target features they compile for.
#[inline(always)]
unsafe fn tile_for<S: ScaleAcc>(ty: GgmlType, a: TileArgs<BlockQ8K>) {
    let TileArgs {
        w,
        row_bytes,
        x,
        m,
        out,
        ld,
    } = a;
    match ty {
        GgmlType::Q2K => tile_t::<Q2K, S>(w, row_bytes, x, m, out, ld),
        GgmlType::Q3K => tile_t::<Q3K, S>(w, row_bytes, x, m, out, ld),
        GgmlType::Q4K => tile_t::<Q4K, S>(w, row_bytes, x, m, out, ld),
        GgmlType::Q5K => tile_t::<Q5K, S>(w, row_bytes, x, m, out, ld),
        GgmlType::Q6K => tile_t::<Q6K, S>(w, row_bytes, x, m, out, ld),
        _ => unreachable!("avx2_kquants::tile called with {ty}"),
    }
}

#[inline(always)]
unsafe fn tile_t<K: SuperBlock, S: ScaleAcc>(
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ8K],
    m: usize,
    out: &mut [f32],
    ld: usize,
) {
    let nb = row_bytes / K::SIZE;
    let nrows = w.len() / row_bytes;
    debug_assert!(x.len() >= m * nb && (m == 0 || out.len() >= (m - 1) * ld + nrows));
    let mut i0 = 0;
    while i0 < m {
        let xs = x.as_ptr().add(i0 * nb);
        let o = out.as_mut_ptr().add(i0 * ld);
        let rc = (m - i0).min(4);
        match rc {
            4 => rows::<K, S, 4>(w.as_ptr(), row_bytes, nrows, nb, xs, o, ld),
            3 => rows::<K, S, 3>(w.as_ptr(), row_bytes, nrows, nb, xs, o, ld),
            2 => rows::<K, S, 2>(w.as_ptr(), row_bytes, nrows, nb, xs, o, ld),
            _ => rows::<K, S, 1>(w.as_ptr(), row_bytes, nrows, nb, xs, o, ld),
        }
        i0 += rc;
    }
}

#[inline(always)]
unsafe fn rows<K: SuperBlock, S: ScaleAcc, const R: usize>(
    w: *const u8,
    row_bytes: usize,
    nrows: usize,
    nb: usize,
    x: *const BlockQ8K,
    out: *mut f32,
    ld: usize,
) {
    for r in 0..nrows {
        let wr = w.add(r * row_bytes);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let u = K::unpack(wr.add(b * K::SIZE));
            for (j, a) in acc.iter_mut().enumerate() {
                let xb = &*x.add(j * nb + b);
                let ys = xb.qs.as_ptr();
                let mut isum = _mm256_setzero_si256();
                for g in 0..8 {
                    let p = _mm256_maddubs_epi16(u.q[g], load(ys.add(32 * g) as *const u8));
                    isum = S::acc(isum, p, u.sc[g]);
                }
                let bsums = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
                let corr = _mm256_madd_epi16(u.cm, bsums);
                *a = _mm256_fmadd_ps(_mm256_set1_ps(u.d * xb.d), _mm256_cvtepi32_ps(isum), *a);
                *a = _mm256_fmadd_ps(_mm256_set1_ps(u.cd * xb.d), _mm256_cvtepi32_ps(corr), *a);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            *out.add(j * ld + r) = hsum(*a);
        }
    }
}
