//! Softmax and log-softmax over one row, and the vectorisable `exp` and reductions that the
//! sampler and attention share.
//!
//! Conventions for non-finite inputs: NaN counts as −∞ (probability 0); a row whose entries
//! are all −∞ (or empty) has no distribution, so softmax gives zeros and log-softmax −∞;
//! `+∞` entries share all the probability equally.

/// Elements summed in f32 lanes before the partial sum is added to an f64 total: small enough
/// that f32 rounding stays near one ulp, large enough to amortise the f64 add.
const BLOCK: usize = 1024;
/// Independent accumulators, so that the compiler can keep them in vector registers.
const LANES: usize = 8;

/// Runs `f` compiled for AVX2 when the CPU has it, otherwise as is. The helpers here are
/// `#[inline(always)]`, so the loops of `f` then use 8-wide vectors; the arithmetic and its
/// order are the same either way (reductions go through explicit lanes), so results are
/// bit-identical on every CPU.
#[inline(always)]
pub(crate) fn with_wide_vectors<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        /// # Safety
        /// Only called after the CPU was found to support AVX2.
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available on this CPU (checked just above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// 1.5·2^23: adding it rounds to an integer that then sits in the low mantissa bits.
pub(crate) const ROUND: f32 = 12_582_912.0;
/// ln 2 in two parts: `n · LN2_HI` is exact for the `n` of [`exp_nonpos`].
pub(crate) const LN2_HI: f32 = 0.693_359_4; // 0.693359375, exact in 10 bits
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
/// The Taylor coefficients of `e^r` from degree 7 down to 0 (Horner order).
pub(crate) const EXP_TAYLOR: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    1.0 / 2.0,
    1.0,
    1.0,
];

/// `e^x` for `x ≤ 0`, within a few ulp of the exact value, written with selects and integer
/// bit operations only so that loops over it vectorise (libm's `expf` is a scalar call).
/// Inputs below −87 (where `e^x` leaves the normal f32 range) and NaN give 0; positive inputs
/// are treated as 0.
///
/// Method: `x = n·ln2 + r` with `n` the nearest integer to `x/ln2` (so `|r| ≤ ln2/2`, and `ln2`
/// split in two for an exact product), `e^r` by its Taylor series to degree 7 (remainder below
/// 1e-8 relative), and `2^n` built in the exponent bits.
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
    let xc = x.clamp(-87.0, 0.0);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = EXP_TAYLOR[1..]
        .iter()
        .fold(EXP_TAYLOR[0], |p, &c| c + r * p);
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    if x >= -87.0 {
        p * scale
    } else {
        0.0
    }
}

/// Σ of the f32 lanes of `x` (whose length is at most `BLOCK`), in f64.
#[inline(always)]
fn block_sum(x: &[f32]) -> f64 {
    let (acc, rest) = lanes(x, 0.0, |a, v| a + v);
    let tail: f32 = rest.iter().sum();
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail as f64
}

/// `x` folded into [`LANES`] independent lanes (element `i` into lane `i mod LANES`, each lane
/// from `init` by `f`), which the compiler keeps in a vector register; and the last
/// `len mod LANES` elements, left to the caller.
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> ([f32; LANES], &[f32]) {
    let mut acc = [init; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] = f(acc[j], c[j]);
        }
    }
    (acc, chunks.remainder())
}

/// Σ f(x_i) in f64. Per block, f is mapped into a stack buffer (a plain loop that vectorises,
/// unlike a reduction with a large body) whose f32 lanes are then summed.
#[inline(always)]
pub(crate) fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut tmp = [0.0f32; BLOCK];
    let mut total = 0.0f64;
    for block in x.chunks(BLOCK) {
        let t = &mut tmp[..block.len()];
        for (o, &v) in t.iter_mut().zip(block) {
            *o = f(v);
        }
        total += block_sum(t);
    }
    total
}

/// (Σ f(a_i, b_i).0, Σ f(a_i, b_i).1) over two slices of equal length, in f64, computed like
/// [`lane_sum`]: two reductions in one pass.
#[inline(always)]
pub(crate) fn lane_sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> (f32, f32)) -> (f64, f64) {
    let mut tmp_a = [0.0f32; BLOCK];
    let mut tmp_b = [0.0f32; BLOCK];
    let (mut total_a, mut total_b) = (0.0f64, 0.0f64);
    for (ab, bb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let ta = &mut tmp_a[..ab.len()];
        let tb = &mut tmp_b[..ab.len()];
        for (((oa, ob), &x), &y) in ta.iter_mut().zip(tb.iter_mut()).zip(ab).zip(bb) {
            (*oa, *ob) = f(x, y);
        }
        total_a += block_sum(ta);
        total_b += block_sum(tb);
    }
    (total_a, total_b)
}

/// Largest element, ignoring NaN; −∞ for an empty slice.
#[inline(always)]
pub(crate) fn lane_max(x: &[f32]) -> f32 {
    let (acc, rest) = lanes(x, f32::NEG_INFINITY, f32::max);
    // Max is exact in any order: a tree, not a chain of dependent maxes.
    rest.iter().copied().fold(pairwise(acc, f32::max), f32::max)
}

/// Σ x in f32: eight lane sums (element i into lane i mod 8), reduced by the fixed tree
/// ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)), then the last `len mod 8` elements in order. The same
/// rounding wherever it runs; short dependency chains (a sequential sum of a 16-score page
/// was a fifth of decode attention's time).
#[inline(always)]
pub(crate) fn lane_sum_f32(x: &[f32]) -> f32 {
    let (acc, rest) = lanes(x, 0.0, |a, v| a + v);
    rest.iter().fold(pairwise(acc, |a, b| a + b), |s, v| s + v)
}

/// The eight lanes combined by the tree ((l0∘l1)∘(l2∘l3))∘((l4∘l5)∘(l6∘l7)).
#[inline(always)]
fn pairwise(a: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    f(
        f(f(a[0], a[1]), f(a[2], a[3])),
        f(f(a[4], a[5]), f(a[6], a[7])),
    )
}

/// In-place softmax; returns the log of the normaliser (log-sum-exp, −∞ for a row with no
/// distribution). See the module documentation for non-finite entries.
pub fn softmax_inplace(x: &mut [f32]) -> f32 {
    with_wide_vectors(
        #[inline(always)]
        || softmax_row(x),
    )
}

#[inline(always)]
fn softmax_row(x: &mut [f32]) -> f32 {
    let max = lane_max(x);
    if max == f32::NEG_INFINITY {
        x.fill(0.0);
        return f32::NEG_INFINITY;
    }
    if max == f32::INFINITY {
        let n = x.iter().filter(|&&v| v == f32::INFINITY).count();
        for v in x.iter_mut() {
            *v = if *v == f32::INFINITY {
                1.0 / n as f32
            } else {
                0.0
            };
        }
        return f32::INFINITY;
    }
    for v in x.iter_mut() {
        *v = exp_nonpos(*v - max);
    }
    let sum = lane_sum(x, |v| v);
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
    (max as f64 + sum.ln()) as f32
}

/// log-softmax of `x` into `out` (same length). See the module documentation for non-finite
/// entries.
pub fn log_softmax(x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(x.len(), out.len());
    with_wide_vectors(
        #[inline(always)]
        || log_softmax_row(x, out),
    );
}

#[inline(always)]
fn log_softmax_row(x: &[f32], out: &mut [f32]) {
    let max = lane_max(x);
    if max == f32::NEG_INFINITY {
        out.fill(f32::NEG_INFINITY);
        return;
    }
    if max == f32::INFINITY {
        let ln_n = (x.iter().filter(|&&v| v == f32::INFINITY).count() as f32).ln();
        for (o, &v) in out.iter_mut().zip(x) {
            *o = if v == f32::INFINITY {
                -ln_n
            } else {
                f32::NEG_INFINITY
            };
        }
        return;
    }
    let ln_sum = lane_sum(x, |v| exp_nonpos(v - max)).ln() as f32;
    for (o, &v) in out.iter_mut().zip(x) {
        // (v − max) first: exact for nearby values, and keeps huge logits from cancelling.
        *o = if v.is_nan() {
            f32::NEG_INFINITY
        } else {
            (v - max) - ln_sum
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_nonpos_is_within_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x > -87.0 {
            let want = (x as f64).exp();
            let rel = ((exp_nonpos(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x -= 0.000_37;
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "worst relative error {worst}"
        );
    }

    #[test]
    fn exp_nonpos_edges() {
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-0.0), 1.0);
        assert_eq!(exp_nonpos(5.0), 1.0);
        assert_eq!(exp_nonpos(-88.0), 0.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(f32::NAN), 0.0);
        assert!(exp_nonpos(-86.9) > 0.0);
    }

    #[test]
    fn lane_reductions_match_serial_ones() {
        let x: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01 - 3.0)
            .collect();
        for len in [0, 1, 7, 8, 9, 1023, 1024, 1025, 5000] {
            let s = &x[..len];
            let want: f64 = s.iter().map(|&v| v as f64).sum();
            assert!((lane_sum(s, |v| v) - want).abs() < 1e-3, "len {len}");
            assert_eq!(
                lane_max(s),
                s.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                "len {len}"
            );
        }
    }
}
