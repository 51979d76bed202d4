//! RMSNorm, plain and fused with the residual add.
//!
//! The mean square is accumulated in f64, so rows of huge values (whose squares overflow f32)
//! and long rows normalise correctly.

/// `1 / sqrt(mean(x²) + eps)`, accumulated in f64 with four independent sums.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mut acc = [0.0f64; 4];
    let mut chunks = x.chunks_exact(4);
    for c in &mut chunks {
        for j in 0..4 {
            acc[j] += c[j] as f64 * c[j] as f64;
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| v as f64 * v as f64)
        .sum();
    let mean = (acc.iter().sum::<f64>() + tail) / x.len().max(1) as f64;
    (1.0 / (mean + eps as f64).sqrt()) as f32
}

/// `out = x / rms(x) · weight` for one row, with `rms(x) = sqrt(mean(x²) + eps)`.
/// `x`, `weight` and `out` have the same length.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert!(x.len() == weight.len() && out.len() == x.len());
    let inv = inv_rms(x, eps);
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// RMSNorm applied in place to each `weight.len()`-sized row of `x` (e.g. q/k norm per head).
pub fn rms_norm_rows(x: &mut [f32], weight: &[f32], eps: f32) {
    if weight.is_empty() {
        return;
    }
    for row in x.chunks_mut(weight.len()) {
        let inv = inv_rms(row, eps);
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
}

/// `residual += x; out = rms_norm(residual)`, for one row.
pub fn add_rms_norm(residual: &mut [f32], x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    for (r, v) in residual.iter_mut().zip(x) {
        *r += v;
    }
    rms_norm(residual, weight, eps, out);
}
