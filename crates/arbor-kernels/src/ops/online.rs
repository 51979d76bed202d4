//! One online-softmax step of a block of query heads over part of a KV page: the inner loop
//! that every CPU attention kernel (paged, cascade, chain) shares, so that their results agree
//! bit for bit.
//!
//! Keys and values come as stored ([`KvRun`]): f32, or f16. On x86-64 with AVX2, FMA and F16C
//! the step is written with explicit vectors: f16 widened in registers as it is loaded (an f16
//! pool moves half the bytes, with no conversion pass), and the work cut into register tiles:
//! q·k for up to three query heads × four keys at once (or one head × eight keys), the value
//! accumulators of up to three heads held in registers across the page's keys. A key or value
//! vector loaded once thus serves every query head of the tile (GQA heads, sibling branches,
//! consecutive prompt rows). Tiles change which loads are shared, never a head's arithmetic:
//! each head's result is the same, bit for bit, whatever block it is stepped in. Other CPUs run
//! a portable f32 step, an f16 page converted into scratch once ([`for_kernels`]).

use super::softmax::{exp_nonpos, lane_max, lane_sum_f32};
use crate::kv::KvRun;
use std::ops::Range;

/// Running softmax states of a block of `n` query heads of `hd` dimensions: max and normaliser
/// per head, unnormalised outputs `n × hd`.
pub(crate) struct States<'a> {
    pub hd: usize,
    pub max: &'a mut [f32],
    pub norm: &'a mut [f32],
    pub acc: &'a mut [f32],
}

/// One query head's running state (max, normaliser and unnormalised output).
struct Running<'a> {
    max: &'a mut f32,
    norm: &'a mut f32,
    acc: &'a mut [f32],
}

impl Running<'_> {
    /// Raises the running max to include `page_max` (the normaliser and accumulator scaled
    /// down to it where it grows); returns the new max.
    #[inline(always)]
    fn raise_max(&mut self, page_max: f32) -> f32 {
        let new_max = self.max.max(page_max);
        if new_max > *self.max {
            // exp(−∞) = 0 on the first page: nothing to rescale yet.
            let c = exp_nonpos(*self.max - new_max);
            *self.norm *= c;
            self.acc.iter_mut().for_each(|a| *a *= c);
            *self.max = new_max;
        }
        new_max
    }
}

impl States<'_> {
    /// Heads `r` of the block, as a block of their own.
    #[inline(always)]
    pub(crate) fn heads(&mut self, r: Range<usize>) -> States<'_> {
        let hd = self.hd;
        States {
            hd,
            max: &mut self.max[r.clone()],
            norm: &mut self.norm[r.clone()],
            acc: &mut self.acc[r.start * hd..r.end * hd],
        }
    }

    /// Head `i`'s state.
    #[inline(always)]
    fn head(&mut self, i: usize) -> Running<'_> {
        let hd = self.hd;
        Running {
            max: &mut self.max[i],
            norm: &mut self.norm[i],
            acc: &mut self.acc[i * hd..(i + 1) * hd],
        }
    }
}

/// Most query heads for which an f16 page is widened in registers as it is read (once per
/// tile of heads); more heads convert it once into scratch. Measured on SmolLM2's shape (a
/// KV head's three query heads in one task): widening in registers beat converting first by
/// 25% at three heads.
const WIDEN_MAX: usize = 3;

/// `run` as the kernels read it when `queries` query heads will step over it: f16 stays f16
/// where [`update`] widens it in registers and at most [`WIDEN_MAX`] heads read it (decode:
/// the step is bound by memory, and widening costs no pass), otherwise it is converted into
/// the front of `scratch` (one page: `page_size × head_dim`) once for all of them. The result
/// is the same either way: widening f16 is exact.
#[inline(always)]
pub(crate) fn for_kernels<'s, 'a: 's>(
    run: KvRun<'a>,
    scratch: &'s mut [f32],
    queries: usize,
) -> KvRun<'s> {
    match run {
        KvRun::F16(h) if queries <= WIDEN_MAX && simd_step() => KvRun::F16(h),
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

/// One online-softmax step of the query heads `q` (`n × head_dim`, `n = st.max.len()`) over
/// the keys `k` and values `v` (the same rows of one page, `rows × head_dim`): for each head,
/// rescales its accumulator when its running max grows, adds the rows' weights to its
/// normaliser and their weighted values to its accumulator. `sc` is scratch of at least
/// `n × rows` scores.
#[inline(always)]
pub(crate) fn update(q: &[f32], k: KvRun, v: KvRun, scale: f32, st: States, sc: &mut [f32]) {
    if st.max.is_empty() {
        return;
    }
    match (k, v) {
        #[cfg(target_arch = "x86_64")]
        (KvRun::F32(k), KvRun::F32(v)) if simd_step() => {
            // SAFETY: AVX2, FMA and F16C were just detected.
            unsafe { simd::update(q, k, v, scale, st, sc) }
        }
        #[cfg(target_arch = "x86_64")]
        (KvRun::F16(k), KvRun::F16(v)) if simd_step() => {
            // SAFETY: as above.
            unsafe { simd::update(q, k, v, scale, st, sc) }
        }
        (KvRun::F32(k), KvRun::F32(v)) => update_portable(q, k, v, scale, st, sc),
        (k, v) => {
            // Not through `for_kernels`: convert here (correct, if slower).
            let (mut kb, mut vb) = (vec![0.0; k.len()], vec![0.0; v.len()]);
            let (k, v) = (k.to_f32(&mut kb), v.to_f32(&mut vb));
            update_portable(q, k, v, scale, st, sc)
        }
    }
}

/// The portable step, head by head.
#[inline(never)]
fn update_portable(q: &[f32], k: &[f32], v: &[f32], scale: f32, mut st: States, sc: &mut [f32]) {
    for (i, qi) in q.chunks_exact(st.hd).enumerate() {
        update_f32(qi, k, v, scale, st.head(i), sc);
    }
}

/// The positions each of a block's rows reads, `[lo, hi)` per row, cut page by page into
/// stretches of rows that one [`update`] call can step together.
pub(crate) struct RowLimits<'a> {
    lim: &'a [(usize, usize)],
    /// The positions every row reads (empty when none are common).
    common: Range<usize>,
}

impl<'a> RowLimits<'a> {
    pub(crate) fn new(lim: &'a [(usize, usize)]) -> Self {
        let lo = lim.iter().map(|l| l.0).max().unwrap_or(0);
        let hi = lim.iter().map(|l| l.1).min().unwrap_or(0);
        RowLimits {
            lim,
            common: lo..hi.max(lo),
        }
    }

    /// Whether every row reads the whole page whose first position is `base`.
    #[inline(always)]
    fn whole(&self, base: usize, ps: usize) -> bool {
        self.common.start <= base && base + ps <= self.common.end
    }

    /// For the page whose first position is `base` (`ps` positions): each maximal stretch of
    /// consecutive rows that read the same positions of it, as (rows, positions within the
    /// page). Rows that read nothing of it are skipped; a page every row reads whole is one
    /// stretch, found without looking at the rows (most pages of a long context).
    pub(crate) fn on_page(
        &self,
        base: usize,
        ps: usize,
    ) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + 'a {
        let lim = self.lim;
        let whole = self.whole(base, ps);
        let run = move |i: usize| {
            let (lo, hi) = lim[i];
            let (a, b) = (lo.max(base), hi.min(base + ps));
            (a < b).then(|| a - base..b - base)
        };
        let mut i = 0;
        std::iter::from_fn(move || {
            if whole {
                let all = (i == 0).then_some((0..lim.len(), 0..ps));
                i = lim.len();
                return all;
            }
            while i < lim.len() {
                let start = i;
                i += 1;
                if let Some(r) = run(start) {
                    while i < lim.len() && run(i).as_ref() == Some(&r) {
                        i += 1;
                    }
                    return Some((start..i, r));
                }
            }
            None
        })
    }
}

/// The portable step of one query head, over f32 runs.
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
    let new_max = st.raise_max(lane_max(sc));
    // Weights in their own loop, which vectorises.
    sc.iter_mut().for_each(|s| *s = exp_nonpos(*s - new_max));
    *st.norm += lane_sum_f32(sc);
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

/// The step with explicit AVX2/FMA/F16C vectors and register tiles, for f32 and f16 runs
/// alike: keys and values are widened eight at a time as they are loaded (f16), products fused
/// (both).
#[cfg(target_arch = "x86_64")]
mod simd;

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

    /// The pages through `path` for the query heads `q` (`n × hd`) stepped as one block,
    /// unnormalised: (max, norm, acc) of every head.
    fn run_block(
        q: &[f32],
        n: usize,
        pages: &[(Vec<f32>, Vec<f32>)],
        path: Path,
        scale: f32,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (mut max, mut norm, mut acc) =
            (vec![f32::NEG_INFINITY; n], vec![0.0; n], vec![0.0; q.len()]);
        let hd = q.len() / n;
        let mut sc = vec![0.0; 32 * n];
        let h = |x: &[f32]| x.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
        for (k, v) in pages {
            let (kh, vh) = (h(k), h(v));
            let st = States {
                hd,
                max: &mut max,
                norm: &mut norm,
                acc: &mut acc,
            };
            match path {
                Path::F32 => update(q, KvRun::F32(k), KvRun::F32(v), scale, st, &mut sc),
                Path::F16 => update(q, KvRun::F16(&kh), KvRun::F16(&vh), scale, st, &mut sc),
                Path::Portable => {
                    let mut st = st;
                    for (i, qi) in q.chunks_exact(hd).enumerate() {
                        update_f32(qi, k, v, scale, st.head(i), &mut sc);
                    }
                }
            }
        }
        (max, norm, acc)
    }

    /// The pages through `path` for one query head, normalised.
    fn run(q: &[f32], pages: &[(Vec<f32>, Vec<f32>)], path: Path, scale: f32) -> Vec<f32> {
        let (_, norm, acc) = run_block(q, 1, pages, path, scale);
        acc.iter().map(|a| a / norm[0]).collect()
    }

    /// Pages of the given lengths (`hd` wide) with a spread of values.
    fn pages_of(lens: &[usize], hd: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| (values(n, hd, 2 * i as u32), values(n, hd, 2 * i as u32 + 1)))
            .collect()
    }

    #[test]
    fn a_block_steps_each_head_as_it_would_alone() {
        // 1-7 heads cover every tile shape (3, then 2 or 1 left) and their mixes; the runs
        // cover whole key tiles, a tail that repeats the last key, and single keys.
        for hd in [4, 8, 24, 64, 72] {
            let pages = pages_of(&[16, 13, 5, 1, 3], hd);
            let scale = 1.0 / (hd as f32).sqrt();
            for n in 1..=7 {
                let q = values(n, hd, 40 + n as u32);
                for path in [Path::F32, Path::F16, Path::Portable] {
                    let (max, norm, acc) = run_block(&q, n, &pages, path, scale);
                    for i in 0..n {
                        let one = run_block(&q[i * hd..(i + 1) * hd], 1, &pages, path, scale);
                        let what = format!("hd {hd}, {n} heads, head {i}, {path:?}");
                        assert_eq!(max[i].to_bits(), one.0[0].to_bits(), "{what}: max");
                        assert_eq!(norm[i].to_bits(), one.1[0].to_bits(), "{what}: norm");
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&acc[i * hd..(i + 1) * hd]),
                            bits(&one.2),
                            "{what}: acc"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn stretches_group_rows_that_read_the_same_positions() {
        // Page 16..32; rows: two whole, one ending inside, one not reaching it, two whole again
        // (not merged across the gap), two windows starting inside.
        let lim = [
            (0, 40),
            (0, 40),
            (0, 20),
            (0, 10),
            (0, 33),
            (5, 32),
            (18, 50),
            (18, 50),
        ];
        let rl = RowLimits::new(&lim);
        let got: Vec<_> = rl.on_page(16, 16).collect();
        assert_eq!(
            got,
            vec![(0..2, 0..16), (2..3, 0..4), (4..6, 0..16), (6..8, 2..16)]
        );
        assert_eq!(rl.on_page(64, 16).count(), 0);
        // Pages every row reads whole: one stretch, the same as found row by row.
        let lim = [(0, 40), (3, 40), (0, 64)];
        let rl = RowLimits::new(&lim);
        assert_eq!(rl.on_page(16, 16).collect::<Vec<_>>(), vec![(0..3, 0..16)]);
        let got: Vec<_> = rl.on_page(0, 16).collect();
        assert_eq!(got, vec![(0..1, 0..16), (1..2, 3..16), (2..3, 0..16)]);
        assert_eq!(RowLimits::new(&[]).on_page(0, 16).count(), 0);
    }

    #[test]
    fn update_matches_softmax_attention_in_f64() {
        // Head sizes with and without 8- and 64-wide tails; runs of 16 (two blocks of eight
        // keys), 13 and 5 (a block and a tail), 1; every path (f16 against the f16 values).
        for hd in [4, 8, 24, 64, 72, 128, 192] {
            let q = values(1, hd, 9);
            let scale = 1.0 / (hd as f32).sqrt();
            let pages = pages_of(&[16, 13, 5, 1, 16], hd);
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
