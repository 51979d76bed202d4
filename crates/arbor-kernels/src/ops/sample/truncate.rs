//! Top-k, top-p and min-p, each as a cut on the logit: a filter keeps the tokens whose logit
//! is at least its cut, so the three together keep those at or above the largest cut.

use super::SamplingParams;
use crate::ops::softmax::{lane_max, with_wide_vectors};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// Buffers of the truncation search, reused across calls.
#[derive(Default)]
pub(super) struct TruncateScratch {
    /// Weight per bucket of the top-p histogram.
    hist: Vec<f64>,
    /// Each token's top-p bucket.
    buckets: Vec<u16>,
    /// (logit, weight) of the tokens whose order top-p has to resolve.
    pool: Vec<(f32, f32)>,
}

/// The logit cut that top-k, then top-p, then min-p leave. `logits` are the penalised logits
/// with maximum `zmax > −∞`, `weights[i] = exp((logits[i] − zmax) / temperature)` and the
/// temperature is positive and finite.
pub(super) fn keep_cut(
    logits: &[f32],
    weights: &[f32],
    s: &mut TruncateScratch,
    p: &SamplingParams,
    zmax: f32,
) -> f32 {
    let mut cut = f32::NEG_INFINITY;
    if p.top_k > 0 && p.top_k < logits.len() {
        if let Some(kth) = kth_largest(logits, p.top_k) {
            cut = kth;
        }
    }
    if p.top_p < 1.0 {
        let top_p = p.top_p.max(0.0) as f64;
        let nucleus = if cut > f32::NEG_INFINITY {
            sorted_nucleus_cut(logits, weights, s, cut, top_p)
        } else {
            histogram_nucleus_cut(logits, weights, s, top_p, zmax, 1.0 / p.temperature)
        };
        cut = cut.max(nucleus);
    }
    if p.min_p > 0.0 {
        // p ≥ min_p · p_max ⇔ (logit − zmax) / T ≥ ln min_p.
        let ln_min_p = (p.min_p.min(1.0) as f64).ln();
        cut = cut.max((zmax as f64 + p.temperature as f64 * ln_min_p) as f32);
    }
    cut
}

/// Top-p after top-k: the kept set (logits ≥ `lo_cut`) is small, so sort it.
fn sorted_nucleus_cut(
    logits: &[f32],
    weights: &[f32],
    s: &mut TruncateScratch,
    lo_cut: f32,
    top_p: f64,
) -> f32 {
    s.pool.clear();
    s.pool.extend(
        logits
            .iter()
            .zip(weights)
            .filter(|(&v, _)| v >= lo_cut)
            .map(|(&v, &w)| (v, w)),
    );
    let target = top_p * s.pool.iter().map(|&(_, w)| w as f64).sum::<f64>();
    walk_to_target(&mut s.pool, 0.0, target).unwrap_or(lo_cut)
}

/// Buckets of the top-p histogram.
const BUCKETS: usize = 4096;
/// Tokens more than this many nats below the maximum (after temperature) share the last
/// bucket; together they weigh at most `vocab · e^−32` of the mass.
const RANGE: f32 = 32.0;

/// Top-p over the whole vocabulary, without sorting it: each token's weight goes into a
/// histogram bucket by its (tempered) distance below the maximum, which is monotone in the
/// logit, so buckets are runs of the descending order. The cumulative histogram finds the
/// bucket where the mass crosses `top_p`, and only that bucket's tokens are sorted.
fn histogram_nucleus_cut(
    logits: &[f32],
    weights: &[f32],
    s: &mut TruncateScratch,
    top_p: f64,
    zmax: f32,
    inv_t: f32,
) -> f32 {
    let last = (BUCKETS - 1) as f32;
    let scale = last / RANGE;
    s.buckets.resize(logits.len(), 0);
    with_wide_vectors(
        #[inline(always)]
        || {
            for (b, &v) in s.buckets.iter_mut().zip(logits) {
                *b = ((zmax - v) * inv_t * scale).min(last) as u16;
            }
        },
    );
    s.hist.clear();
    s.hist.resize(BUCKETS, 0.0);
    for (&b, &w) in s.buckets.iter().zip(weights) {
        s.hist[b as usize] += w as f64;
    }

    let target = top_p * s.hist.iter().sum::<f64>();
    let mut before = 0.0;
    let mut crossing = BUCKETS - 1;
    for (b, &m) in s.hist.iter().enumerate() {
        if m > 0.0 && before + m >= target {
            crossing = b;
            break;
        }
        before += m;
    }
    s.pool.clear();
    for ((&b, &v), &w) in s.buckets.iter().zip(logits).zip(weights) {
        if b as usize == crossing && w > 0.0 {
            s.pool.push((v, w));
        }
    }
    walk_to_target(&mut s.pool, before, target).unwrap_or(zmax)
}

/// Sorts `pool` by descending logit and returns the logit at which `before` plus the running
/// weight reaches `target` (the last one when rounding keeps it short; `None` when empty).
fn walk_to_target(pool: &mut [(f32, f32)], before: f64, target: f64) -> Option<f32> {
    pool.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let mut acc = before;
    for &(v, w) in pool.iter() {
        acc += w as f64;
        if acc >= target {
            return Some(v);
        }
    }
    pool.last().map(|&(v, _)| v)
}

/// A value and its index, ordered by value, then lower index first ("greater").
#[derive(Clone, Copy)]
struct Ranked(f32, u32);

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

/// Tokens whose maximum is checked against the heap's worst before looking at any of them.
const SKIP: usize = 64;

/// The `n` largest values of `x` (no NaN) with their indices, largest first, lower index first
/// among equals. One pass with a bounded min-heap; a run of `SKIP` values is passed over
/// after one vectorised max when none of them beats the heap's worst.
pub(super) fn top_n(x: &[f32], n: usize) -> Vec<(f32, u32)> {
    let n = n.min(x.len());
    if n == 0 {
        return vec![];
    }
    let mut heap: BinaryHeap<Reverse<Ranked>> = x[..n]
        .iter()
        .enumerate()
        .map(|(i, &v)| Reverse(Ranked(v, i as u32)))
        .collect();
    let worst_of = |h: &BinaryHeap<Reverse<Ranked>>| h.peek().map_or(f32::INFINITY, |r| r.0 .0);
    let mut worst = worst_of(&heap);
    for (c, chunk) in x[n..].chunks(SKIP).enumerate() {
        if lane_max(chunk) <= worst {
            continue;
        }
        for (j, &v) in chunk.iter().enumerate() {
            // Equal to the worst loses: everything in the heap has a lower index.
            if v > worst {
                if let Some(mut top) = heap.peek_mut() {
                    *top = Reverse(Ranked(v, (n + c * SKIP + j) as u32));
                }
                worst = worst_of(&heap);
            }
        }
    }
    let mut out: Vec<Ranked> = heap.into_iter().map(|r| r.0).collect();
    out.sort_unstable_by(|a, b| b.cmp(a));
    out.into_iter().map(|r| (r.0, r.1)).collect()
}

/// The k-th largest value of `x` when at least `k` values are above −∞.
fn kth_largest(x: &[f32], k: usize) -> Option<f32> {
    let top = top_n(x, k);
    top.last()
        .map(|r| r.0)
        .filter(|&v| top.len() == k && v > f32::NEG_INFINITY)
}
