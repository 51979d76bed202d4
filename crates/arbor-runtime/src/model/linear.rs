//! Linear layers at the engine's chosen precision.

use crate::RuntimeError;
use arbor_kernels::{ops, Weight};

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
        Precision::Exact => ops::matmul::matmul_dequantized(x, m, w, out)?,
    }
    Ok(())
}
