//! y = x · Wᵀ for a weight in any stored format.

use crate::{KernelError, Weight};

/// `x` is `m × w.cols` (row-major), `out` is `m × w.rows`.
pub fn matmul(x: &[f32], m: usize, w: &Weight, out: &mut [f32]) -> Result<(), KernelError> {
    if x.len() != m * w.cols || out.len() != m * w.rows {
        return Err(KernelError::Shape {
            op: "matmul",
            detail: format!("x {} (m={m}), W {}x{}, out {}", x.len(), w.rows, w.cols, out.len()),
        });
    }
    let mut row = vec![0.0f32; w.cols];
    for r in 0..w.rows {
        w.row_to_f32(r, &mut row)?;
        for i in 0..m {
            let xi = &x[i * w.cols..(i + 1) * w.cols];
            out[i * w.rows + r] = xi.iter().zip(&row).map(|(a, b)| a * b).sum();
        }
    }
    Ok(())
}
