//! The step with explicit AVX2/FMA/F16C vectors and register tiles, for f32 and f16 runs
//! alike: keys and values are widened eight at a time as they are loaded (f16), products fused
//! (both), and each head's softmax over the page (max, exponentials, sum) done in registers
//! ([`weights`]).

// Register tiles are indexed by their constant loop counters, which LLVM unrolls into named
// registers; iterator chains over two tiles at once read worse and were not always unrolled.
#![allow(clippy::needless_range_loop)]

use super::{Running, States};
use crate::ops::softmax::{EXP_TAYLOR, LN2_HI, LN2_LO, ROUND};
use half::f16;
use std::arch::x86_64::*;

/// An element type of K/V pages, loaded eight at a time as f32.
pub(super) trait Elem: Copy {
    /// Eight elements at `p` as f32.
    ///
    /// # Safety
    /// AVX2 and F16C are available and `p..p + 8` is readable.
    unsafe fn load8(p: *const Self) -> __m256;
    fn to_f32(self) -> f32;
    /// Most query heads per register tile: three for f32, whose loads fold into the
    /// FMAs; two for f16, whose widened vectors need registers of their own (a tile of
    /// three then spills).
    const TILE_HEADS: usize;
}

impl Elem for f32 {
    const TILE_HEADS: usize = 3;
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for f16 {
    const TILE_HEADS: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// `e^x` of eight lanes for `x ≤ 0`: `softmax::exp_nonpos`'s method (`x = n·ln2 + r`, Taylor series
/// of `e^r` to degree 7, `2^n` built in the exponent bits) with fused multiply-adds. Below −87
/// and NaN give 0.
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    let round = _mm256_set1_ps(ROUND);
    let lo = _mm256_set1_ps(-87.0);
    let xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_setzero_ps());
    let t = _mm256_fmadd_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E), round);
    let n = _mm256_sub_ps(t, round);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_TAYLOR[0]);
    for &c in &EXP_TAYLOR[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let n_int = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(round));
    let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(n_int, _mm256_set1_epi32(127)));
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, lo);
    _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(two_n)), keep)
}

/// Lanes `0..n` set (`n ≤ 8`), as a mask for `maskload` / `maskstore`.
#[inline(always)]
unsafe fn first_lanes(n: usize) -> __m256i {
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
}

/// The eight lanes of `a` combined by the tree ((l0∘l1)∘(l2∘l3))∘((l4∘l5)∘(l6∘l7)), `f` being
/// `hadd` or its max equivalent applied to (low half, high half).
#[inline(always)]
unsafe fn tree(a: __m256, f: impl Fn(__m128, __m128) -> __m128) -> f32 {
    let pairs = f(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    // pairs = [l0∘l1, l2∘l3, l4∘l5, l6∘l7]
    let quads = f(pairs, pairs);
    // quads = [(l0∘l1)∘(l2∘l3), (l4∘l5)∘(l6∘l7), …]
    _mm_cvtss_f32(f(quads, quads))
}

/// Pairwise max of adjacent lanes of `a` then `b` (the max analogue of `hadd`).
#[inline(always)]
unsafe fn hmax_pairs(a: __m128, b: __m128) -> __m128 {
    let even = _mm_shuffle_ps::<0b10_00_10_00>(a, b);
    let odd = _mm_shuffle_ps::<0b11_01_11_01>(a, b);
    _mm_max_ps(odd, even)
}

/// [`super::weights`] in vectors: a head's scores (at most a page) go from their max through
/// the exponentials to their sum in registers, each reduction a short tree. (The loops of the
/// portable version passed each head's scores through memory three times, a chain of
/// dependent loads long enough that decode's softmax cost as much as its q·k.) The
/// exponentials are written back for the weights × values step. Same contract as `weights`:
/// NaN scores are ignored by the max.
#[inline(always)]
pub(super) unsafe fn weights(sc: &mut [f32], st: &mut Running) {
    let n = sc.len();
    let (full, tail) = (n / 8, n % 8);
    let p = sc.as_mut_ptr();
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    let mask = first_lanes(tail);
    // The running max second: `max_ps` returns it where the score is NaN.
    let mut m = ninf;
    for c in 0..full {
        m = _mm256_max_ps(_mm256_loadu_ps(p.add(8 * c)), m);
    }
    if tail > 0 {
        let x = _mm256_maskload_ps(p.add(8 * full), mask);
        m = _mm256_max_ps(_mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(mask)), m);
    }
    let new_max = st.raise_max(tree(m, |a, b| hmax_pairs(a, b)));
    let nm = _mm256_set1_ps(new_max);
    let mut sum = _mm256_setzero_ps();
    for c in 0..full {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(8 * c)), nm));
        _mm256_storeu_ps(p.add(8 * c), e);
        sum = _mm256_add_ps(sum, e);
    }
    if tail > 0 {
        let x = _mm256_maskload_ps(p.add(8 * full), mask);
        let e = _mm256_and_ps(exp8(_mm256_sub_ps(x, nm)), _mm256_castsi256_ps(mask));
        _mm256_maskstore_ps(p.add(8 * full), mask, e);
        sum = _mm256_add_ps(sum, e);
    }
    *st.norm += tree(sum, |a, b| _mm_hadd_ps(a, b));
}

/// The four dot products whose eight-lane partial sums are `a` (key order): every key's
/// lanes reduced by the same tree, ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)).
#[inline(always)]
unsafe fn reduce4(a: &[__m256]) -> __m128 {
    let u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps::<1>(u))
}

/// Scores of `Q` query heads (`q`, rows `hd` apart) against `4·G` keys at `k`, `stride`
/// apart, unscaled, four keys to a vector: each query vector and each key vector loaded
/// once for the whole tile.
#[inline(always)]
unsafe fn qk_tile<T: Elem, const Q: usize, const G: usize>(
    q: *const f32,
    hd: usize,
    k: *const T,
    stride: usize,
) -> [[__m128; G]; Q] {
    let n8 = hd / 8 * 8;
    let mut acc = [[[_mm256_setzero_ps(); 4]; G]; Q];
    let mut d = 0;
    while d < n8 {
        let mut qv = [_mm256_setzero_ps(); Q];
        for (i, v) in qv.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(q.add(i * hd + d));
        }
        for g in 0..G {
            for t in 0..4 {
                let kv = T::load8(k.add((4 * g + t) * stride + d));
                for i in 0..Q {
                    acc[i][g][t] = _mm256_fmadd_ps(qv[i], kv, acc[i][g][t]);
                }
            }
        }
        d += 8;
    }
    let mut out = [[_mm_setzero_ps(); G]; Q];
    for (i, (o, a)) in out.iter_mut().zip(&acc).enumerate() {
        for (g, (o4, a4)) in o.iter_mut().zip(a).enumerate() {
            *o4 = reduce4(a4);
            if n8 < hd {
                // Head sizes that are not a multiple of eight: the last dimensions one by
                // one, summed apart and added to the vector sums.
                let tail: [f32; 4] = std::array::from_fn(|t| {
                    let kp = k.add((4 * g + t) * stride);
                    (n8..hd).fold(0.0, |s, e| s + *q.add(i * hd + e) * (*kp.add(e)).to_f32())
                });
                *o4 = _mm_add_ps(*o4, _mm_loadu_ps(tail.as_ptr()));
            }
        }
    }
    out
}

/// Scaled scores of `Q` query heads against all keys of `k` into `sc` (`Q × rows`, row `i`
/// for head `i`): `4·G` keys per tile, then four, then each last key alone (as a tile of
/// four copies of it), so that every score goes through the same operations.
#[inline(always)]
unsafe fn score_rows<T: Elem, const Q: usize, const G: usize>(
    q: *const f32,
    k: &[T],
    hd: usize,
    scale: f32,
    sc: &mut [f32],
) {
    let rows = sc.len() / Q;
    let (kp, sp, sv) = (k.as_ptr(), sc.as_mut_ptr(), _mm_set1_ps(scale));
    let mut j = 0;
    while j + 4 * G <= rows {
        let s = qk_tile::<T, Q, G>(q, hd, kp.add(j * hd), hd);
        for (i, si) in s.iter().enumerate() {
            for (g, x) in si.iter().enumerate() {
                _mm_storeu_ps(sp.add(i * rows + j + 4 * g), _mm_mul_ps(*x, sv));
            }
        }
        j += 4 * G;
    }
    while j + 4 <= rows {
        let s = qk_tile::<T, Q, 1>(q, hd, kp.add(j * hd), hd);
        for (i, si) in s.iter().enumerate() {
            _mm_storeu_ps(sp.add(i * rows + j), _mm_mul_ps(si[0], sv));
        }
        j += 4;
    }
    while j < rows {
        let s = qk_tile::<T, Q, 1>(q, hd, kp.add(j * hd), 0);
        for (i, si) in s.iter().enumerate() {
            *sp.add(i * rows + j) = _mm_cvtss_f32(si[0]) * scale;
        }
        j += 1;
    }
}

/// acc_i += Σ_j w_i[j] · v[j] for `Q` query heads (weights `rows` apart in `w`,
/// accumulators `hd` apart in `acc`) over dimensions `d0..d0 + 8·D`: the `Q × D`
/// accumulator vectors stay in registers for all rows, each value vector is loaded once
/// for all `Q` heads.
#[inline(always)]
unsafe fn pv_tile<T: Elem, const Q: usize, const D: usize>(
    w: &[f32],
    v: &[T],
    hd: usize,
    acc: *mut f32,
    d0: usize,
) {
    let rows = w.len() / Q;
    let mut a = [[_mm256_setzero_ps(); D]; Q];
    for (i, ai) in a.iter_mut().enumerate() {
        for (c, x) in ai.iter_mut().enumerate() {
            *x = _mm256_loadu_ps(acc.add(i * hd + d0 + c * 8));
        }
    }
    let vp = v.as_ptr();
    for j in 0..rows {
        let mut wv = [_mm256_setzero_ps(); Q];
        for (i, x) in wv.iter_mut().enumerate() {
            *x = _mm256_set1_ps(*w.get_unchecked(i * rows + j));
        }
        for c in 0..D {
            let vv = T::load8(vp.add(j * hd + d0 + c * 8));
            for i in 0..Q {
                a[i][c] = _mm256_fmadd_ps(wv[i], vv, a[i][c]);
            }
        }
    }
    for (i, ai) in a.iter().enumerate() {
        for (c, x) in ai.iter().enumerate() {
            _mm256_storeu_ps(acc.add(i * hd + d0 + c * 8), *x);
        }
    }
}

/// [`pv_tile`] over all of the head's dimensions: `D` vectors at a time, then one, then
/// the last dimensions one by one.
#[inline(always)]
unsafe fn pv_rows<T: Elem, const Q: usize, const D: usize>(
    w: &[f32],
    v: &[T],
    hd: usize,
    acc: &mut [f32],
) {
    let rows = w.len() / Q;
    let mut d = 0;
    while d + 8 * D <= hd {
        pv_tile::<T, Q, D>(w, v, hd, acc.as_mut_ptr(), d);
        d += 8 * D;
    }
    while d + 8 <= hd {
        pv_tile::<T, Q, 1>(w, v, hd, acc.as_mut_ptr(), d);
        d += 8;
    }
    for (i, a) in acc.chunks_exact_mut(hd).enumerate() {
        for (e, a) in a.iter_mut().enumerate().skip(d) {
            for j in 0..rows {
                *a += w[i * rows + j] * v[j * hd + e].to_f32();
            }
        }
    }
}

/// Scores of the eight keys at `k` (`hd` apart, `hd` a multiple of 8) against `q`, lane j
/// for key j: each of `q`'s vectors is loaded once for all eight, and the eight sums are
/// reduced together, each by [`reduce4`]'s tree.
#[inline(always)]
unsafe fn dot8<T: Elem>(q: &[f32], k: *const T, hd: usize) -> __m256 {
    let qp = q.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 8];
    for d in (0..hd).step_by(8) {
        let qv = _mm256_loadu_ps(qp.add(d));
        for (j, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(qv, T::load8(k.add(j * hd + d)), *a);
        }
    }
    // Lanes 0-3 of each 128-bit half: keys 0-3 (u0) and 4-7 (u1), low and high halves
    // of their sums; adding the halves gives the eight dot products in key order.
    let u0 = _mm256_hadd_ps(
        _mm256_hadd_ps(acc[0], acc[1]),
        _mm256_hadd_ps(acc[2], acc[3]),
    );
    let u1 = _mm256_hadd_ps(
        _mm256_hadd_ps(acc[4], acc[5]),
        _mm256_hadd_ps(acc[6], acc[7]),
    );
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(u0, u1),
        _mm256_permute2f128_ps::<0x31>(u0, u1),
    )
}

/// [`update`] of a single head (decode), apart so that it stays small.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn update_one<T: Elem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    scale: f32,
    mut st: States,
    sc: &mut [f32],
) {
    let hd = st.hd;
    let rows = k.len() / hd;
    let sc = &mut sc[..rows];
    // Eight keys at a time, reduced together in 256-bit registers (each key's lanes by
    // the same tree as in `reduce4`); the rest as `score_rows` does them.
    let mut j = 0;
    if hd.is_multiple_of(8) {
        let sv = _mm256_set1_ps(scale);
        while j + 8 <= rows {
            let s = _mm256_mul_ps(dot8(q, k.as_ptr().add(j * hd), hd), sv);
            _mm256_storeu_ps(sc.as_mut_ptr().add(j), s);
            j += 8;
        }
    }
    score_rows::<T, 1, 2>(q.as_ptr(), &k[j * hd..], hd, scale, &mut sc[j..]);
    weights(sc, &mut st.head(0));
    pv_rows::<T, 1, 8>(sc, v, hd, st.acc);
}

/// [`super::update`] over runs of `T`: query heads [`Elem::TILE_HEADS`] at a time (then
/// fewer), each tile through q·k, the softmax weights of each head, and weights × values.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn update<T: Elem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    scale: f32,
    mut st: States,
    sc: &mut [f32],
) {
    let (n, hd) = (st.max.len(), st.hd);
    let rows = k.len() / hd;
    let sc = &mut sc[..n * rows];
    if n == 1 {
        return update_one(q, k, v, scale, st, sc);
    }
    let mut i = 0;
    while i < n {
        let (qp, s) = (q.as_ptr().add(i * hd), &mut sc[i * rows..]);
        i += match (n - i).min(T::TILE_HEADS) {
            1 => {
                score_rows::<T, 1, 2>(qp, k, hd, scale, &mut s[..rows]);
                1
            }
            2 => {
                score_rows::<T, 2, 1>(qp, k, hd, scale, &mut s[..2 * rows]);
                2
            }
            _ => {
                score_rows::<T, 3, 1>(qp, k, hd, scale, &mut s[..3 * rows]);
                3
            }
        };
    }
    for (h, w) in sc.chunks_exact_mut(rows.max(1)).enumerate().take(n) {
        weights(&mut w[..rows], &mut st.head(h));
    }
    let mut i = 0;
    while i < n {
        let (w, acc) = (&sc[i * rows..], &mut st.acc[i * hd..]);
        i += match (n - i).min(T::TILE_HEADS) {
            1 => {
                pv_rows::<T, 1, 8>(&w[..rows], v, hd, &mut acc[..hd]);
                1
            }
            2 => {
                pv_rows::<T, 2, 4>(&w[..2 * rows], v, hd, &mut acc[..2 * hd]);
                2
            }
            _ => {
                pv_rows::<T, 3, 4>(&w[..3 * rows], v, hd, &mut acc[..3 * hd]);
                3
            }
        };
    }
}
