//! One online-softmax step of one query head over part of a KV page: the inner loop that every
//! CPU attention kernel (paged, cascade, chain) shares, so that their results agree bit for bit.
//!
//! Keys and values come as stored ([`KvRun`]): f32, or f16 read and widened in registers
//! (x86 F16C) so that an f16 pool moves half the bytes through memory with no conversion pass.
//! Where the CPU cannot widen f16 in registers, [`for_kernels`] converts a page into scratch
//! once and the f32 loop runs.

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
        KvRun::F16(h) if f16_in_registers() => KvRun::F16(h),
        other => KvRun::F32(other.to_f32(scratch)),
    }
}

/// Whether this CPU widens f16 in registers (x86-64 with AVX2, FMA and F16C).
#[inline(always)]
pub(crate) fn f16_in_registers() -> bool {
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
        (KvRun::F32(k), KvRun::F32(v)) => update_f32(qg, k, v, scale, st, sc),
        #[cfg(target_arch = "x86_64")]
        (KvRun::F16(k), KvRun::F16(v)) if f16_in_registers() => {
            // SAFETY: AVX2, FMA and F16C were just detected.
            unsafe { f16c::update(qg, k, v, scale, st, sc) }
        }
        (k, v) => {
            // Not through `for_kernels`: convert here (correct, if slower).
            let (mut kb, mut vb) = (vec![0.0; k.len()], vec![0.0; v.len()]);
            update_f32(qg, k.to_f32(&mut kb), v.to_f32(&mut vb), scale, st, sc)
        }
    }
}

#[inline(always)]
fn update_f32(qg: &[f32], k: &[f32], v: &[f32], scale: f32, st: Running, sc: &mut [f32]) {
    let hd = qg.len();
    let sc = &mut sc[..k.len() / hd];
    for (s, kk) in sc.iter_mut().zip(k.chunks_exact(hd)) {
        *s = dot(qg, kk) * scale;
    }
    let new_max = rescale(st.max, st.norm, st.acc, lane_max(sc));
    // Weights in their own loop, which vectorises; then the weighted sum of values.
    sc.iter_mut().for_each(|s| *s = exp_nonpos(*s - new_max));
    *st.norm += sc.iter().sum::<f32>();
    for (&w, vv) in sc.iter().zip(v.chunks_exact(hd)) {
        axpy(w, vv, st.acc);
    }
}

/// Raises the running `max` to include `page_max`, scaling `norm` and `acc` down to it;
/// returns the new max.
#[inline(always)]
fn rescale(max: &mut f32, norm: &mut f32, acc: &mut [f32], page_max: f32) -> f32 {
    let new_max = max.max(page_max);
    if new_max > *max {
        // exp(−∞) = 0 on the first page: nothing to rescale yet.
        let c = exp_nonpos(*max - new_max);
        *norm *= c;
        acc.iter_mut().for_each(|a| *a *= c);
        *max = new_max;
    }
    new_max
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

/// The f16 step with F16C: keys and values widened eight at a time as they are loaded.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use super::{rescale, Running};
    use crate::ops::softmax::{exp_nonpos, lane_max};
    use half::f16;
    use std::arch::x86_64::*;

    /// Eight f16 at `p` as f32.
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    /// Sum of the eight lanes.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// q · k for an f16 key.
    #[inline(always)]
    unsafe fn dot(q: &[f32], k: &[f16]) -> f32 {
        let n8 = q.len() / 8 * 8;
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n8 {
            a0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(q.as_ptr().add(i)),
                load8(k.as_ptr().add(i)),
                a0,
            );
            let (qp, kp) = (q.as_ptr().add(i + 8), k.as_ptr().add(i + 8));
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qp), load8(kp), a1);
            i += 16;
        }
        if i < n8 {
            a0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(q.as_ptr().add(i)),
                load8(k.as_ptr().add(i)),
                a0,
            );
        }
        let mut s = hsum(_mm256_add_ps(a0, a1));
        for j in n8..q.len() {
            s += q[j] * k[j].to_f32();
        }
        s
    }

    /// acc += w · v for an f16 value row.
    #[inline(always)]
    unsafe fn axpy(w: f32, v: &[f16], acc: &mut [f32]) {
        let n8 = acc.len() / 8 * 8;
        let wv = _mm256_set1_ps(w);
        for i in (0..n8).step_by(8) {
            let a = acc.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                a,
                _mm256_fmadd_ps(wv, load8(v.as_ptr().add(i)), _mm256_loadu_ps(a)),
            );
        }
        for j in n8..acc.len() {
            acc[j] += w * v[j].to_f32();
        }
    }

    /// [`super::update`] over f16 keys and values.
    ///
    /// # Safety
    /// The CPU supports AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn update(
        qg: &[f32],
        k: &[f16],
        v: &[f16],
        scale: f32,
        st: Running,
        sc: &mut [f32],
    ) {
        let hd = qg.len();
        let sc = &mut sc[..k.len() / hd];
        for (s, kk) in sc.iter_mut().zip(k.chunks_exact(hd)) {
            *s = dot(qg, kk) * scale;
        }
        let new_max = rescale(st.max, st.norm, st.acc, lane_max(sc));
        sc.iter_mut().for_each(|s| *s = exp_nonpos(*s - new_max));
        *st.norm += sc.iter().sum::<f32>();
        for (&w, vv) in sc.iter().zip(v.chunks_exact(hd)) {
            axpy(w, vv, st.acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// A page of `rows` keys and values with a spread of magnitudes.
    fn page(rows: usize, hd: usize, seed: u32) -> (Vec<f32>, Vec<f32>) {
        let f = |i: usize, s: u32| (i as f32 * 0.37 + s as f32).sin() * 2.0;
        let k = (0..rows * hd).map(|i| f(i, seed)).collect();
        let v = (0..rows * hd).map(|i| f(i, seed + 7) * 0.5).collect();
        (k, v)
    }

    /// Runs `update` over `pages` pages of (k, v) as `dtype` and returns (max, norm, acc).
    fn run(q: &[f32], pages: &[(Vec<f32>, Vec<f32>)], f16: bool) -> (f32, f32, Vec<f32>) {
        let hd = q.len();
        let (mut max, mut norm, mut acc) = (f32::NEG_INFINITY, 0.0, vec![0.0; hd]);
        let mut sc = vec![0.0; 32];
        for (k, v) in pages {
            let (kh, vh): (Vec<f16>, Vec<f16>) = (
                k.iter().map(|&x| f16::from_f32(x)).collect(),
                v.iter().map(|&x| f16::from_f32(x)).collect(),
            );
            let st = Running {
                max: &mut max,
                norm: &mut norm,
                acc: &mut acc,
            };
            if f16 {
                update(q, KvRun::F16(&kh), KvRun::F16(&vh), 0.125, st, &mut sc);
            } else {
                // The same rounded values as f32: only the arithmetic path differs.
                let kr: Vec<f32> = kh.iter().map(|x| x.to_f32()).collect();
                let vr: Vec<f32> = vh.iter().map(|x| x.to_f32()).collect();
                update(q, KvRun::F32(&kr), KvRun::F32(&vr), 0.125, st, &mut sc);
            }
        }
        (max, norm, acc)
    }

    #[test]
    fn f16_runs_match_their_f32_widening() {
        // Head dims with and without an 8- or 16-wide tail, pages of 16 and a partial page.
        for hd in [8, 24, 64, 72, 128] {
            let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.11).cos()).collect();
            let pages = [page(16, hd, 1), page(16, hd, 2), page(5, hd, 3)];
            let (m32, n32, a32) = run(&q, &pages, false);
            let (m16, n16, a16) = run(&q, &pages, true);
            assert!(
                (m32 - m16).abs() <= 1e-5 * m32.abs().max(1.0),
                "hd {hd}: max {m32} vs {m16}"
            );
            assert!(
                (n32 - n16).abs() <= 1e-5 * n32,
                "hd {hd}: norm {n32} vs {n16}"
            );
            for (x, y) in a32.iter().zip(&a16) {
                assert!(
                    (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
                    "hd {hd}: acc {x} vs {y}"
                );
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
