//! The feed-forward half of a layer on the GPU: gate-up GEMM → SwiGLU → down GEMM for a dense
//! layer; the mixture-of-experts pipeline of [`super::moe`] for a MoE layer.

use super::moe::MoeState;
use super::upload::{GpuFfn, GpuLayer};
use crate::RuntimeError;
use arbor_kernels::cuda::cudarc::driver::{CudaSlice, CudaView};
use arbor_kernels::cuda::gemm::Gemm;
use arbor_kernels::cuda::ops::activation;
use arbor_kernels::cuda::Gpu;
use half::bf16;

/// Per-step scratch the FFN half writes.
pub(super) struct FfnBuffers<'a> {
    /// The layer's normed FFN input (in); then, for a dense layer, the activation, bf16,
    /// `rows × max(h, inter)`.
    pub xn: &'a mut CudaSlice<bf16>,
    /// Gate-up projection scratch of a dense layer, f32, `rows × 2·inter` at least.
    pub proj: &'a mut CudaSlice<f32>,
    /// The FFN output, f32, `rows × h`.
    pub o: &'a mut CudaSlice<f32>,
    /// The step's real row count on the device: rows from it on are a graph's padding, which
    /// a MoE layer routes to no expert.
    pub valid_rows: &'a CudaView<'a, u32>,
}

/// Layer `l`'s FFN for `rows` rows of width `h` whose normed input is in `b.xn`; the result
/// lands in `b.o`. A MoE layer's intermediates live in `moe`'s scratch, not in `b`.
pub(super) fn run_layer(
    gpu: &Gpu,
    gemm: &mut Gemm,
    moe: &mut MoeState,
    l: &GpuLayer,
    rows: usize,
    h: usize,
    b: FfnBuffers,
) -> Result<(), RuntimeError> {
    match &l.ffn {
        GpuFfn::Dense {
            gate_up,
            down,
            inter,
        } => {
            let inter = *inter;
            gemm.matmul_bt(b.xn, rows, gate_up, 2 * inter, h, b.proj)?;
            activation::swiglu(gpu, b.proj, rows, inter, b.xn)?;
            gemm.matmul_bt(b.xn, rows, down, h, inter, b.o)?;
        }
        GpuFfn::Moe(m) => moe.run(gpu, gemm, m, rows, h, b.valid_rows, b.xn, b.o)?,
    }
    Ok(())
}
