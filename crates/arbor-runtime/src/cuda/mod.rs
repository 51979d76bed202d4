//! The model on the GPU (feature `cuda`): the same transformer as [`crate::model`], with
//! bf16 weights, f32 activations between ops, GEMMs through cuBLASLt and the KV pages in a
//! bf16 [`GpuKvPool`] driven by the host [`KvCache`]'s bookkeeping.
//!
//! Per step: upload the step's layout ([`meta::StepMeta`], packed into one buffer), then per
//! layer rms_norm → QKV GEMM → bias / q-k norm / RoPE / K-V store → paged attention → O GEMM →
//! residual + rms_norm → gate-up GEMM → SwiGLU → down GEMM → residual; then the output head on
//! the rows whose logits are wanted. Activations live in a persistent workspace
//! (`workspace.rs`); decode steps replay CUDA graphs ([`graph`]). Results stay on the device
//! until the engine reads them back or samples them there ([`CudaModel::sample`]).

mod attend;
mod ffn;
mod forward;
pub mod graph;
pub mod meta;
mod moe;
mod upload;
mod workspace;

use crate::model::{BatchLayout, Model};
use crate::RuntimeError;
use arbor_kernels::cuda::gemm::Gemm;
use arbor_kernels::cuda::ops::kv;
use arbor_kernels::cuda::ops::sample::{sample, SampleRow};
use arbor_kernels::cuda::{Gpu, GpuError, GpuKvPool};
use arbor_kernels::kv::{KvCache, KvLayout};
use arbor_kernels::ops::SampleOutput;
use graph::{GraphCache, GraphMode, GraphStats};
use std::sync::Arc;
use upload::GpuWeights;
use workspace::Workspace;

impl From<GpuError> for RuntimeError {
    fn from(e: GpuError) -> Self {
        RuntimeError::Kernel(e.into())
    }
}

/// A model's weights and KV pool on one GPU, the buffers its steps work in, and the CUDA
/// graphs of its decode steps.
pub struct CudaModel {
    gpu: Arc<Gpu>,
    gemm: Gemm,
    weights: GpuWeights,
    pool: GpuKvPool,
    ws: Workspace,
    graphs: GraphCache,
    /// Mixture-of-experts scratch and expert statistics (`moe.rs`).
    moe: moe::MoeState,
    /// Rows of the last step's output in `ws.logits` (`rows × out_dim`), if any.
    logits: Option<usize>,
    /// The last plans of a graph step, and of an eager step, whose buffers the next such step
    /// reuses: kept apart, so that a prompt's large plan does not widen the layout (and the
    /// launches) of the decode steps' graphs.
    last_plan: [attend::PlanBuffers; 2],
    out_dim: usize,
}

impl Drop for CudaModel {
    fn drop(&mut self) {
        // Graphs are destroyed and buffers freed only after the work that uses them ended;
        // an error here leaves nothing to do.
        let _ = self.gpu.synchronize();
    }
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
        let ws = Workspace::new(&gpu, &model.cfg)?;
        let moe = moe::MoeState::new(&gpu, model)?;
        Ok(CudaModel {
            gpu,
            gemm,
            weights,
            pool,
            ws,
            graphs: GraphCache::new(GraphMode::from_env()),
            moe,
            logits: None,
            last_plan: Default::default(),
            out_dim: model.cfg.out_dim(),
        })
    }

    /// How decode steps run: [`GraphMode::Replay`] unless `ARBOR_CUDA_GRAPHS=0` said
    /// otherwise when the model was made.
    pub fn graph_mode(&self) -> GraphMode {
        self.graphs.mode()
    }

    /// Sets how the next decode steps run (graphs captured so far are kept).
    pub fn set_graph_mode(&mut self, mode: GraphMode) {
        self.graphs.set_mode(mode);
    }

    /// Graph captures and replays so far.
    pub fn graph_stats(&self) -> &GraphStats {
        self.graphs.stats()
    }

    /// Bytes of device memory the step workspace holds (activations, logits, metadata).
    pub fn workspace_bytes(&self) -> usize {
        self.ws.bytes()
    }

    /// The GPU the model is on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Bytes of device memory the weights take.
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes
    }

    /// Makes the page copies `(src, dst, slots)` the host bookkeeping recorded (copy-on-write,
    /// compaction) in the device pool, in order.
    pub fn copy_pages(&mut self, copies: &[(u32, u32, usize)]) -> Result<(), RuntimeError> {
        if copies.is_empty() {
            return Ok(());
        }
        let copies: Vec<(u32, u32, u32)> =
            copies.iter().map(|&(s, d, n)| (s, d, n as u32)).collect();
        kv::copy_pages(&self.gpu, &mut self.pool, &copies)?;
        Ok(())
    }

    /// Resizes the KV pool to `num_pages` pages (see [`GpuKvPool::resize`]); graphs captured
    /// against the old pool are dropped.
    pub fn resize_pool(&mut self, num_pages: usize) -> Result<(), RuntimeError> {
        if num_pages != self.pool.num_pages {
            self.pool.resize(&self.gpu, num_pages)?;
            self.ws.invalidate();
        }
        Ok(())
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
        let Some(rows) = self.logits else {
            return Ok(Vec::new());
        };
        let view = self.ws.logits.slice(..rows * self.out_dim);
        let mut all = self.gpu.download(&view, "the logits")?;
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
        let Some(n) = self.logits else {
            return Err(RuntimeError::Request("no logits to sample from".into()));
        };
        if rows.len() > n {
            return Err(RuntimeError::Request(format!(
                "{} rows to sample, but the last step kept {n} rows of logits",
                rows.len()
            )));
        }
        Ok(sample(&self.gpu, &self.ws.logits, vocab, rows)?)
    }
}
