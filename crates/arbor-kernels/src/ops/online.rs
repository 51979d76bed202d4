//! One online-softmax step of one query head over part of a KV page: the inner loop that every
//! CPU attention kernel (paged, cascade, chain) shares, so that their results agree bit for bit.
//!
//! Keys and values come as stored ([`KvRun`]): f32, or f16. On x86-64 with AVX2, FMA and F16C
//! the step is written with explicit vectors: f16 widened in registers as it is loaded (an f16
//! pool moves half the bytes, with no conversion pass), q·k for eight keys at a time, and the
//! value accumulator kept in registers across a page's keys. Other CPUs run a portable f32
//! step, an f16 page converted into scratch once ([`for_kernels`]).

use super::softmax::{exp_nonpos, lane_max};
use crate::kv::KvRun;

/// A query head's running softmax state: max, normaliser and unnormalised output.
pub(crate) struct Running<'a> {
    pub max: &'a mut f32,
    pub norm: &'a mut f32,
    pub acc: &'a mut [f32],
}

/// `run` as the kernels read it: f16 stays f16 where [`update`] widens it in registers,
/// otherwise it is converted into the front of `scratch` (one page: `page_size × head_dim`).
#[inline(always)]
pub(crate) fn for_kernels<'s, 'a: 's>(run: KvRun<'a>, scratch: &'s mut [f32]) -> KvRun<'s> {
    match run {
        KvRun::F16(h) if simd_step() => KvRun::F16(h),
        other => KvRun::F32(other.to_f32(scratch)),
    }
}

/// Whether this CPU runs the SIMD step (x86-64 with AVX2, FMA and F16C), which also widens f16
/// in registers.
#[inline(always)]
pub(crate) fn simd_step() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One online-softmax step of query `qg` over the keys `k` and values `v` (the same rows of one
/// page, `rows × head_dim`): rescales the accumulator when the running max grows, adds the
/// rows' weights to the normaliser and their weighted values to the accumulator. `sc` is
/// scratch of at least `rows` scores.
#[inline(always)]
pub(crate) fn update(qg: &[f32], k: KvRun, v: KvRun, scale: f32, st: Running, sc: &mut [f32]) {
    match (k, v) {
        #[cfg(target_arch = "x86_64")]
        (KvRun::F32(k), KvRun::F32(v)) if simd_step() => {
            // SAFETY: AVX2, FMA and F16C were just detected.
            unsafe { simd::update(qg, k, v, scale, st, sc) }
        }
        #[cfg(target_arch = "x86_64")]
        (KvRun::F16(k), KvRun::F16(v)) if simd_step() => {
            // SAFETY: as above.
            unsafe { simd::update(qg, k, v, scale, st, sc) }
        }
        (KvRun::F32(k), KvRun::F32(v)) => update_f32(qg, k, v, scale, st, sc),
        (k, v) => {
            // Not through `for_kernels`: convert here (correct, if slower).
            let (mut kb, mut vb) = (vec![0.0; k.len()], vec![0.0; v.len()]);
            update_f32(qg, k.to_f32(&mut kb), v.to_f32(&mut vb), scale, st, sc)
        }
    }
}

/// The portable step, over f32 runs.
#[inline(always)]
fn update_f32(qg: &[f32], k: &[f32], v: &[f32], scale: f32, mut st: Running, sc: &mut [f32]) {
    let hd = qg.len();
    let sc = &mut sc[..k.len() / hd];
    for (s, kk) in sc.iter_mut().zip(k.chunks_exact(hd)) {
        *s = dot(qg, kk) * scale;
    }
    weights(sc, &mut st);
    for (&w, vv) in sc.iter().zip(v.chunks_exact(hd)) {
        axpy(w, vv, st.acc);
    }
}

/// Turns the page's scores `sc` into softmax weights against the running state: raises the
/// running max to include them (scaling the normaliser and accumulator down to it), replaces
/// each score by its weight and adds the weights to the normaliser. The caller then adds the
/// weighted values to the accumulator.
#[inline(always)]
fn weights(sc: &mut [f32], st: &mut Running) {
    let new_max = st.max.max(lane_max(sc));
    if new_max > *st.max {
        // exp(−∞) = 0 on the first page: nothing to rescale yet.
        let c = exp_nonpos(*st.max - new_max);
        *st.norm *= c;
        st.acc.iter_mut().for_each(|a| *a *= c);
        *st.max = new_max;
    }
    // Weights in their own loop, which vectorises.
    sc.iter_mut().for_each(|s| *s = exp_nonpos(*s - new_max));
    *st.norm += sc.iter().sum::<f32>();
}

/// a · b with sixteen independent accumulators (two AVX vectors), summed in order at the end.
///
/// Written so that LLVM vectorises it: with eight accumulators and the same final sum its SLP
/// pass built two-float (`xmm`) products and the q·k loop ran at a quarter of the width.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    const W: usize = 16;
    let n = a.len().min(b.len()) / W * W;
    let mut acc = [0.0f32; W];
    for (x, y) in a[..n].chunks_exact(W).zip(b[..n].chunks_exact(W)) {
        for j in 0..W {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s = 0.0f32;
    for v in acc {
        s += v;
    }
    a[n..].iter().zip(&b[n..]).fold(s, |s, (x, y)| s + x * y)
}

/// y += a · x.
#[inline(always)]
pub(crate) fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// The step with explicit AVX2/FMA/F16C vectors, for f32 and f16 runs alike: keys and values
/// are widened eight at a time as they are loaded (f16), products fused (both).
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{weights, Running};
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
    }

    impl Elem for f32 {
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
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        }
        #[inline(always)]
        fn to_f32(self) -> f32 {
            f16::to_f32(self)
        }
    }

    /// Sum of the eight lanes.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// q · k.
    #[inline(always)]
    unsafe fn dot<T: Elem>(q: &[f32], k: &[T]) -> f32 {
        let n8 = q.len() / 8 * 8;
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n8 {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), T::load8(kp.add(i)), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i + 8)), T::load8(kp.add(i + 8)), a1);
            i += 16;
        }
        if i < n8 {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), T::load8(kp.add(i)), a0);
        }
        let mut s = hsum(_mm256_add_ps(a0, a1));
        for j in n8..q.len() {
            s += q[j] * k[j].to_f32();
        }
        s
    }

    /// Scores of the eight keys `k[0..8 × hd]` (`hd` a multiple of 8) against `q`, lane j
    /// for key j: each of `q`'s vectors is loaded once for all eight, and the eight sums are
    /// reduced together (two rounds of pairwise adds) instead of one horizontal sum per key.
    #[inline(always)]
    unsafe fn dot8<T: Elem>(q: &[f32], k: &[T], hd: usize) -> __m256 {
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 8];
        for d in (0..hd).step_by(8) {
            let qv = _mm256_loadu_ps(qp.add(d));
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qv, T::load8(kp.add(j * hd + d)), *a);
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

    /// Dimensions of the value accumulator held in registers at once (eight vectors).
    const BLOCK: usize = 64;

    /// acc += Σ_j w[j] · v[j] over the rows of `v` (`w.len() × acc.len()`), the accumulator
    /// held in registers for all rows, 64 dimensions at a time.
    #[inline(always)]
    unsafe fn weighted_sum<T: Elem>(w: &[f32], v: &[T], acc: &mut [f32]) {
        let (hd, vp) = (acc.len(), v.as_ptr());
        let mut d = 0;
        while d + BLOCK <= hd {
            let ap = acc.as_mut_ptr().add(d);
            let mut a: [__m256; BLOCK / 8] =
                std::array::from_fn(|c| _mm256_loadu_ps(ap.add(c * 8)));
            for (j, &wj) in w.iter().enumerate() {
                let wv = _mm256_set1_ps(wj);
                for (c, ac) in a.iter_mut().enumerate() {
                    *ac = _mm256_fmadd_ps(wv, T::load8(vp.add(j * hd + d + c * 8)), *ac);
                }
            }
            for (c, ac) in a.iter().enumerate() {
                _mm256_storeu_ps(ap.add(c * 8), *ac);
            }
            d += BLOCK;
        }
        while d + 8 <= hd {
            let ap = acc.as_mut_ptr().add(d);
            let mut a = _mm256_loadu_ps(ap);
            for (j, &wj) in w.iter().enumerate() {
                a = _mm256_fmadd_ps(_mm256_set1_ps(wj), T::load8(vp.add(j * hd + d)), a);
            }
            _mm256_storeu_ps(ap, a);
            d += 8;
        }
        for (i, a) in acc.iter_mut().enumerate().skip(d) {
            for (j, &wj) in w.iter().enumerate() {
                *a += wj * v[j * hd + i].to_f32();
            }
        }
    }

    /// [`super::update`] over runs of `T`.
    ///
    /// # Safety
    /// The CPU supports AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn update<T: Elem>(
        qg: &[f32],
        k: &[T],
        v: &[T],
        scale: f32,
        mut st: Running,
        sc: &mut [f32],
    ) {
        let hd = qg.len();
        let n = k.len() / hd;
        let sc = &mut sc[..n];
        // Keys eight at a time where the head size allows, the rest one by one.
        let mut j = 0;
        if hd.is_multiple_of(8) {
            while j + 8 <= n {
                let s = _mm256_mul_ps(dot8(qg, &k[j * hd..], hd), _mm256_set1_ps(scale));
                _mm256_storeu_ps(sc.as_mut_ptr().add(j), s);
                j += 8;
            }
        }
        for (s, kk) in sc[j..].iter_mut().zip(k[j * hd..].chunks_exact(hd)) {
            *s = dot(qg, kk) * scale;
        }
        weights(sc, &mut st);
        weighted_sum(sc, v, st.acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// `rows × hd` values with a spread of magnitudes.
    fn values(rows: usize, hd: usize, seed: u32) -> Vec<f32> {
        (0..rows * hd)
            .map(|i| (i as f32 * 0.37 + seed as f32).sin() * 2.0)
            .collect()
    }

    /// Softmax attention of `q` over all rows of `pages` in f64: the normalised output.
    fn reference(q: &[f32], pages: &[(Vec<f32>, Vec<f32>)], scale: f64) -> Vec<f64> {
        let hd = q.len();
        let rows = || {
            pages
                .iter()
                .flat_map(|(k, v)| k.chunks(hd).zip(v.chunks(hd)))
        };
        let s: Vec<f64> = rows()
            .map(|(k, _)| {
                scale
                    * q.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = w.iter().sum();
        let mut o = vec![0.0; hd];
        for (wi, (_, v)) in w.iter().zip(rows()) {
            o.iter_mut()
                .zip(v)
                .for_each(|(a, b)| *a += wi / z * *b as f64);
        }
        o
    }

    /// How `run` feeds the pages.
    #[derive(Clone, Copy, Debug)]
    enum Path {
        /// `update` on f32 runs (the SIMD step where the CPU has it).
        F32,
        /// `update` on f16 runs.
        F16,
        /// The portable f32 step every other CPU runs.
        Portable,
    }

    /// The pages through `path`, normalised.
    fn run(q: &[f32], pages: &[(Vec<f32>, Vec<f32>)], path: Path, scale: f32) -> Vec<f32> {
        let (mut max, mut norm, mut acc) = (f32::NEG_INFINITY, 0.0, vec![0.0; q.len()]);
        let mut sc = vec![0.0; 32];
        for (k, v) in pages {
            let h = |x: &[f32]| x.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
            let (kh, vh) = (h(k), h(v));
            let st = Running {
                max: &mut max,
                norm: &mut norm,
                acc: &mut acc,
            };
            match path {
                Path::F32 => update(q, KvRun::F32(k), KvRun::F32(v), scale, st, &mut sc),
                Path::F16 => update(q, KvRun::F16(&kh), KvRun::F16(&vh), scale, st, &mut sc),
                Path::Portable => update_f32(q, k, v, scale, st, &mut sc),
            }
        }
        acc.iter().map(|a| a / norm).collect()
    }

    #[test]
    fn update_matches_softmax_attention_in_f64() {
        // Head sizes with and without 8- and 64-wide tails; runs of 16 (two blocks of eight
        // keys), 13 and 5 (a block and a tail), 1; every path (f16 against the f16 values).
        for hd in [4, 8, 24, 64, 72, 128, 192] {
            let q = values(1, hd, 9);
            let scale = 1.0 / (hd as f32).sqrt();
            let lens = [16, 13, 5, 1, 16];
            let pages: Vec<_> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| (values(n, hd, 2 * i as u32), values(n, hd, 2 * i as u32 + 1)))
                .collect();
            let rounded: Vec<_> = pages
                .iter()
                .map(|(k, v)| {
                    let r = |x: &[f32]| x.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
                    (r(k), r(v))
                })
                .collect();
            let exact = reference(&q, &pages, scale as f64);
            for (path, want) in [
                (Path::F32, &exact),
                (Path::Portable, &exact),
                (Path::F16, &reference(&q, &rounded, scale as f64)),
            ] {
                let got = run(&q, &pages, path, scale);
                for (g, w) in got.iter().zip(want) {
                    assert!(
                        (*g as f64 - w).abs() <= 2e-5 * (1.0 + w.abs()),
                        "hd {hd}, {path:?}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn dot_equals_the_plain_sum_for_every_length() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| (i % 5) as f32 - 2.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert_eq!(dot(&a, &b), want, "length {n}");
        }
    }
}
