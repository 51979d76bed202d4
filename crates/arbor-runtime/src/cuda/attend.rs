//! The attention half of a layer on the GPU: QKV GEMM → bias / q-k norm / RoPE / K-V store →
//! attention over the paged pool → O GEMM. [`StepAttention`] is prepared once per step (the
//! step's layout in device memory) and run per layer.

use super::meta::StepMeta;
use super::upload::GpuLayer;
use crate::config::ModelConfig;
use crate::RuntimeError;
use arbor_kernels::cuda::cudarc::driver::CudaSlice;
use arbor_kernels::cuda::gemm::Gemm;
use arbor_kernels::cuda::ops::{attention, qkv};
use arbor_kernels::cuda::{Gpu, GpuKvPool};
use arbor_kernels::ops::AttentionParams;
use half::bf16;

/// One step's attention layout on the device, shared by every layer.
pub(super) struct StepAttention {
    positions: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    row_seq: CudaSlice<u32>,
    seq_row_indptr: CudaSlice<u32>,
    page_indptr: CudaSlice<u32>,
    page_indices: CudaSlice<u32>,
    seqs: usize,
    max_rows_per_seq: usize,
    max_context: usize,
    hidden: usize,
    qkv: qkv::QkvParams,
    params: AttentionParams,
}

/// Per-step scratch the attention half writes.
pub(super) struct AttendBuffers<'a> {
    /// The layer's normed input (in) and attention output (out), bf16, `rows × max(h, q_dim)`.
    pub xn: &'a mut CudaSlice<bf16>,
    /// QKV projection scratch, f32, `rows × (q_dim + 2·kv_dim)` at least.
    pub proj: &'a mut CudaSlice<f32>,
    /// Queries after RoPE, f32, `rows × q_dim`.
    pub q: &'a mut CudaSlice<f32>,
    /// The layer's attention output after the O projection, f32, `rows × h`.
    pub o: &'a mut CudaSlice<f32>,
}

impl StepAttention {
    /// Uploads `meta` for a model of `cfg`.
    pub fn prepare(gpu: &Gpu, cfg: &ModelConfig, meta: &StepMeta) -> Result<Self, RuntimeError> {
        let up = |v: &[u32], what: &str| gpu.upload(v, what).map_err(RuntimeError::from);
        let hd = cfg.head_dim;
        Ok(StepAttention {
            positions: up(&meta.positions, "positions")?,
            slots: up(&meta.slot_mapping, "the slot mapping")?,
            row_seq: up(&meta.row_seq, "row sequences")?,
            seq_row_indptr: up(&meta.seq_row_indptr, "sequence rows")?,
            page_indptr: up(&meta.page_indptr, "page pointers")?,
            page_indices: up(&meta.page_indices, "page indices")?,
            seqs: meta.seq_row_indptr.len().saturating_sub(1),
            max_rows_per_seq: meta.max_rows_per_seq,
            max_context: meta.max_context,
            hidden: cfg.hidden_size,
            qkv: qkv::QkvParams {
                n_heads: cfg.num_heads,
                n_kv_heads: cfg.num_kv_heads,
                head_dim: hd,
                rot_dim: cfg.rope_dim,
                layout: cfg.rope_layout,
                eps: cfg.rms_eps,
            },
            params: AttentionParams {
                n_heads: cfg.num_heads,
                n_kv_heads: cfg.num_kv_heads,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                sliding_window: cfg.sliding_window,
            },
        })
    }

    /// Layer `i`'s attention for `rows` rows whose normed input is in `b.xn`; the result
    /// (after the O projection) lands in `b.o`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_layer(
        &self,
        gpu: &Gpu,
        gemm: &mut Gemm,
        pool: &mut GpuKvPool,
        l: &GpuLayer,
        inv_freq: &CudaSlice<f32>,
        i: usize,
        rows: usize,
        b: AttendBuffers,
    ) -> Result<(), RuntimeError> {
        let p = &self.qkv;
        let (h, qd) = (self.hidden, p.n_heads * p.head_dim);
        let qkv_w = qd + 2 * p.n_kv_heads * p.head_dim;
        gemm.matmul_bt(b.xn, rows, &l.qkv, qkv_w, h, b.proj)?;
        let qw = qkv::QkvWeights {
            bias: l.qkv_bias.as_ref(),
            q_norm: l.q_norm.as_ref(),
            k_norm: l.k_norm.as_ref(),
            inv_freq,
        };
        qkv::qkv_rope_store(
            gpu,
            b.proj,
            rows,
            p,
            &qw,
            &self.positions,
            &self.slots,
            pool,
            i,
            b.q,
        )?;
        let batch = attention::AttentionBatch {
            positions: &self.positions,
            row_seq: &self.row_seq,
            seq_row_indptr: &self.seq_row_indptr,
            page_indptr: &self.page_indptr,
            page_indices: &self.page_indices,
            seqs: self.seqs,
            max_rows_per_seq: self.max_rows_per_seq,
            max_context: self.max_context,
        };
        attention::attention(gpu, b.q, rows, &batch, pool, i, &self.params, b.xn)?;
        gemm.matmul_bt(b.xn, rows, &l.wo, h, qd, b.o)?;
        Ok(())
    }
}
