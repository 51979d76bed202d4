//! RMSNorm, plain and fused with the residual add.

/// out = x / rms(x) · weight, for one row.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), weight.len());
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// RMSNorm applied to each `weight.len()`-sized row of `x` in place (q/k norm per head).
pub fn rms_norm_rows(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    let mut tmp = vec![0.0; d];
    for row in x.chunks_mut(d) {
        rms_norm(row, weight, eps, &mut tmp);
        row.copy_from_slice(&tmp);
    }
}

/// residual += x; out = rms_norm(residual). One row.
pub fn add_rms_norm(residual: &mut [f32], x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    for (r, v) in residual.iter_mut().zip(x) {
        *r += v;
    }
    rms_norm(residual, weight, eps, out);
}
