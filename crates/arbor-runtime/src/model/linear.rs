//! Linear layers at the engine's chosen precision.

use crate::RuntimeError;
use arbor_kernels::{ops, Weight};
use rayon::prelude::*;

/// How matmuls over quantised weights are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Activations quantised to 8 bits per block and integer block dot products (as llama.cpp
    /// does): fastest; logits differ from f32 math by NMSE ~1e-4..1e-3.
    #[default]
    Fast,
    /// Weights dequantised row by row and multiplied with f32 activations: what transformers
    /// computes on a dequantised GGUF. Several times slower; for validation.
    Exact,
}

/// `out (m × w.rows) = x (m × w.cols) · Wᵀ`.
pub fn linear(
    p: Precision,
    x: &[f32],
    m: usize,
    w: &Weight,
    out: &mut [f32],
) -> Result<(), RuntimeError> {
    match p {
        Precision::Fast => ops::matmul(x, m, w, out)?,
        Precision::Exact => exact(x, m, w, out)?,
    }
    Ok(())
}

fn exact(x: &[f32], m: usize, w: &Weight, out: &mut [f32]) -> Result<(), RuntimeError> {
    let (rows, cols) = (w.rows, w.cols);
    if x.len() != m * cols || out.len() != m * rows {
        return Err(RuntimeError::Request(format!(
            "linear: x {} (m={m}) with W {rows}x{cols}",
            x.len()
        )));
    }
    // Column-major blocks of the output: task t computes rows t*CH..(t+1)*CH of W for all m.
    const CH: usize = 16;
    let blocks: Vec<Result<Vec<f32>, arbor_kernels::KernelError>> = (0..rows.div_ceil(CH))
        .into_par_iter()
        .map(|t| {
            let (r0, r1) = (t * CH, ((t + 1) * CH).min(rows));
            let mut row = vec![0.0f32; cols];
            let mut blk = vec![0.0f32; (r1 - r0) * m];
            for r in r0..r1 {
                w.row_to_f32(r, &mut row)?;
                for i in 0..m {
                    blk[(r - r0) * m + i] = dot(&x[i * cols..(i + 1) * cols], &row);
                }
            }
            Ok(blk)
        })
        .collect();
    for (t, blk) in blocks.into_iter().enumerate() {
        let blk = blk?;
        for (k, v) in blk.iter().enumerate() {
            let (r, i) = (t * CH + k / m, k % m);
            out[i * rows + r] = *v;
        }
    }
    Ok(())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}
