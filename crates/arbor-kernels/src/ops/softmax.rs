//! Softmax and log-softmax over one row.

/// In-place softmax; returns the log of the normaliser (log-sum-exp).
pub fn softmax_inplace(x: &mut [f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
    max + sum.ln()
}

/// log-softmax of `x` into `out`.
pub fn log_softmax(x: &[f32], out: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + x.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
    for (o, v) in out.iter_mut().zip(x) {
        *o = v - lse;
    }
}
