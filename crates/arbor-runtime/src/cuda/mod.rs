//! The model on the GPU (feature `cuda`): the same transformer as [`crate::model`], with
//! bf16 weights, f32 activations between ops, GEMMs through cuBLASLt and the KV pages in a
//! bf16 [`GpuKvPool`] driven by the host [`KvCache`]'s bookkeeping.
//!
//! Per step: upload the step's layout ([`meta::StepMeta`]), then per layer
//! rms_norm → QKV GEMM → bias / q-k norm / RoPE / K-V store → paged attention → O GEMM →
//! residual + rms_norm → gate-up GEMM → SwiGLU → down GEMM → residual; then the output head on
//! the rows whose logits are wanted. Results stay on the device until the engine reads them
//! back or samples them there ([`CudaModel::sample`]).

mod attend;
mod ffn;
mod forward;
pub mod meta;
mod upload;

use crate::model::{BatchLayout, Model};
use crate::RuntimeError;
use arbor_kernels::cuda::cudarc::driver::CudaSlice;
use arbor_kernels::cuda::gemm::Gemm;
use arbor_kernels::cuda::ops::sample::{sample, SampleRow};
use arbor_kernels::cuda::{Gpu, GpuError, GpuKvPool};
use arbor_kernels::kv::{KvCache, KvLayout};
use arbor_kernels::ops::SampleOutput;
use std::sync::Arc;
use upload::GpuWeights;

impl From<GpuError> for RuntimeError {
    fn from(e: GpuError) -> Self {
        RuntimeError::Kernel(e.into())
    }
}

/// A model's weights and KV pool on one GPU.
pub struct CudaModel {
    gpu: Arc<Gpu>,
    gemm: Gemm,
    weights: GpuWeights,
    pool: GpuKvPool,
    /// The last step's output rows (`rows × out_dim`), on the device.
    logits: Option<(CudaSlice<f32>, usize)>,
}

impl CudaModel {
    /// Uploads `model` to `gpu` and allocates a KV pool of `num_pages` pages of `layout`.
    pub fn new(
        gpu: Arc<Gpu>,
        model: &Model,
        layout: KvLayout,
        num_pages: usize,
    ) -> Result<Self, RuntimeError> {
        let weights = GpuWeights::upload(&gpu, model)?;
        let pool = GpuKvPool::new(&gpu, layout, num_pages)?;
        let gemm = Gemm::new(&gpu)?;
        Ok(CudaModel {
            gpu,
            gemm,
            weights,
            pool,
            logits: None,
        })
    }

    /// The GPU the model is on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Bytes of device memory the weights take.
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes
    }

    /// Bytes of device memory the KV pool takes.
    pub fn kv_bytes(&self) -> usize {
        self.pool.nbytes()
    }

    /// Runs a step (as [`Model::forward_hidden`]): K/V of every row into the pool, the output
    /// rows of `logit_rows` kept on the device for [`CudaModel::read_logits`] or
    /// [`CudaModel::sample`], and the final-normed hidden states of `hidden_rows` returned.
    pub fn forward(
        &mut self,
        model: &Model,
        cache: &mut KvCache,
        tokens: &[u32],
        batch: &BatchLayout,
        logit_rows: &[usize],
        hidden_rows: &[usize],
    ) -> Result<Vec<f32>, RuntimeError> {
        forward::run(self, model, cache, tokens, batch, logit_rows, hidden_rows)
    }

    /// The last step's output rows, copied back (`rows × out_dim`; a reward head's bias added).
    pub fn read_logits(&self) -> Result<Vec<f32>, RuntimeError> {
        let Some((dev, n)) = &self.logits else {
            return Ok(Vec::new());
        };
        let mut all = self.gpu.download(dev, "the logits")?;
        all.truncate(*n);
        if let Some(b) = &self.weights.head_bias {
            all.chunks_exact_mut(b.len())
                .for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
        }
        Ok(all)
    }

    /// Samples row `i` of the last step's output rows with `rows[i]`, on the GPU.
    pub fn sample(
        &self,
        vocab: usize,
        rows: &[SampleRow],
    ) -> Result<Vec<SampleOutput>, RuntimeError> {
        let Some((dev, _)) = &self.logits else {
            return Err(RuntimeError::Request("no logits to sample from".into()));
        };
        Ok(sample(&self.gpu, dev, vocab, rows)?)
    }
}
