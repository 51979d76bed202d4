//! The attention half of a layer on the GPU: QKV GEMM → bias / q-k norm / RoPE / K-V store →
//! attention over the paged pool → O GEMM. [`StepAttention`] is prepared once per step and run
//! per layer; the rows' positions, slots and pages are views of the step's packed metadata in
//! the workspace ([`MetaViews`]), for eager steps and graph replays alike.
//!
//! Tree attention: when the model's `attention.tree` is on and the step's sequences share KV
//! pages, the step's [`CascadePlan`] — the one [`BatchLayout::cascade_plan`] gives the CPU path,
//! so both backends decide alike — is uploaded once and every layer runs cascade attention
//! (each shared page read once for all the rows below it) instead of the paged kernel. The GPU
//! kernel always merges partials by LSE, so its groups are cut as [`CascadeMode::Merge`] cuts
//! them (long shared runs split across blocks); whether a plan exists does not depend on that.
//! Sparse budgets: the plan's sparse rows get a [`GpuSparsePlan`]; every layer past the dense
//! ones selects its pages on the device and cascade reads only those. Every layer also keeps
//! the pool's key summaries up to date for the pages its K/V store wrote (whether or not this
//! step is sparse: a later sparse request ranks the pages written now).

use super::meta::{PackedLayout, StepMeta};
use super::upload::GpuLayer;
use crate::config::ModelConfig;
use crate::model::{AttentionOptions, BatchLayout};
use crate::RuntimeError;
use arbor_kernels::cuda::cudarc::driver::{CudaSlice, CudaView};
use arbor_kernels::cuda::gemm::Gemm;
use arbor_kernels::cuda::ops::cascade::{self, GpuCascadePlan};
use arbor_kernels::cuda::ops::sparse::{self, GpuSparsePlan};
use arbor_kernels::cuda::ops::{attention, qkv};
use arbor_kernels::cuda::{Gpu, GpuKvPool};
use arbor_kernels::kv::KvCache;
use arbor_kernels::ops::cascade::{CascadeMode, CascadePlan};
use arbor_kernels::ops::AttentionParams;
use half::bf16;
use std::sync::Mutex;

/// How a step's rows attend.
enum Kernel {
    /// The paged kernel over each sequence's pages (the packed metadata).
    Paged {
        seqs: usize,
        max_rows_per_seq: usize,
        /// An upper bound on any row's context (`usize::MAX`: the most warps).
        max_context: usize,
    },
    /// Cascade attention over the step's plan (rows in the step's order), with the page
    /// selection of its sparse rows if it has any (locked per layer: each layer refills its
    /// marks).
    Cascade(Box<GpuCascadePlan>, Option<Box<Mutex<GpuSparsePlan>>>),
}

/// A step's device plans, kept for the next step of the same kind to upload its own into
/// (see [`GpuCascadePlan::upload_reusing`]): buffers that stay put keep CUDA graphs valid.
#[derive(Default)]
pub(super) struct PlanBuffers {
    pub cascade: Option<GpuCascadePlan>,
    pub sparse: Option<GpuSparsePlan>,
}

/// One step's attention, shared by every layer.
pub(super) struct StepAttention {
    hidden: usize,
    qkv: qkv::QkvParams,
    params: AttentionParams,
    kernel: Kernel,
}

/// The packed step metadata in the workspace, as the attention kernels read it.
pub(super) struct MetaViews<'a> {
    pub positions: CudaView<'a, u32>,
    pub slots: CudaView<'a, u32>,
    pub row_seq: CudaView<'a, u32>,
    pub seq_row_indptr: CudaView<'a, u32>,
    pub page_indptr: CudaView<'a, u32>,
    /// From the page indices to the end of the buffer: a length fixed by the bucket and the
    /// buffer, not by the step (the kernel reads only what `page_indptr` points at).
    pub page_indices: CudaView<'a, u32>,
    /// The step's real row count (the last row offset): rows from it on are padding.
    pub real_rows: CudaView<'a, u32>,
}

impl<'a> MetaViews<'a> {
    /// Views of `meta` laid out as `lay`.
    pub fn new(meta: &'a CudaSlice<u32>, lay: &PackedLayout) -> Self {
        MetaViews {
            positions: meta.slice(lay.positions.range()),
            slots: meta.slice(lay.slots.range()),
            row_seq: meta.slice(lay.row_seq.range()),
            seq_row_indptr: meta.slice(lay.seq_row_indptr.range()),
            page_indptr: meta.slice(lay.page_indptr.range()),
            page_indices: meta.slice(lay.page_indices.start..),
            real_rows: meta
                .slice(lay.seq_row_indptr.range().end - 1..lay.seq_row_indptr.range().end),
        }
    }
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
    fn new(cfg: &ModelConfig, kernel: Kernel) -> Self {
        let hd = cfg.head_dim;
        StepAttention {
            hidden: cfg.hidden_size,
            qkv: qkv::QkvParams {
                n_heads: cfg.num_heads,
                n_kv_heads: cfg.num_kv_heads,
                head_dim: hd,
                rot_dim: cfg.rope_dim,
                layout: cfg.rope_layout,
                eps: cfg.rms_eps,
            },
            params: cfg.attention_params(),
            kernel,
        }
    }

    /// The attention of a step laid out as `meta` (`pad_rows` rows once padded for a graph):
    /// cascade over the plan of `batch` on `cache`'s block tables (reserved for the step),
    /// uploaded here into the buffers of the plans in `reuse` (an earlier step's, each taken
    /// only when this step has such a plan) where they fit, when `opts` turn tree attention on
    /// and the step's sequences share pages, or rows are sparse; else the paged kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        gpu: &Gpu,
        cfg: &ModelConfig,
        meta: &StepMeta,
        batch: &BatchLayout,
        cache: &KvCache,
        opts: &AttentionOptions,
        pad_rows: usize,
        reuse: &mut PlanBuffers,
    ) -> Result<Self, RuntimeError> {
        let plan_opts = CascadeMode::Merge.plan_options();
        let plan = match Self::paged_only(meta, batch, opts) {
            true => None,
            false => batch.cascade_plan(cache, opts.tree.is_some(), &plan_opts)?,
        };
        let kernel = match plan {
            Some(plan) => {
                let plan = in_step_order(plan, batch)?;
                let sparse = match plan.has_sparse() {
                    true => {
                        let (p, old) = (cfg.attention_params(), reuse.sparse.take());
                        GpuSparsePlan::upload_reusing(gpu, &plan, &p, &opts.sparse, old)?
                    }
                    false => None,
                };
                let old = reuse.cascade.take();
                let plan = GpuCascadePlan::upload_reusing(gpu, &plan, pad_rows, old)?;
                Kernel::Cascade(Box::new(plan), sparse.map(|s| Box::new(Mutex::new(s))))
            }
            None => Kernel::Paged {
                seqs: meta.seq_row_indptr.len().saturating_sub(1),
                max_rows_per_seq: meta.max_rows_per_seq,
                max_context: meta.max_context,
            },
        };
        Ok(Self::new(cfg, kernel))
    }

    /// Gives the step's plans back into `reuse` (for the next step to reuse their buffers).
    pub fn return_plans(self, reuse: &mut PlanBuffers) {
        if let Kernel::Cascade(plan, sparse) = self.kernel {
            reuse.cascade = Some(*plan);
            if let Some(sp) = sparse.and_then(|s| s.into_inner().ok()) {
                reuse.sparse = Some(sp);
            }
        }
    }

    /// This attention for a decode step padded to `seqs` sequences for a CUDA graph: launches
    /// that do not depend on the step. The paged kernel gets the most warps (its result does
    /// not depend on them); a cascade plan's launches depend only on its epoch.
    pub fn for_graph(self, seqs: usize) -> Self {
        match self.kernel {
            Kernel::Paged { .. } => StepAttention {
                kernel: Kernel::Paged {
                    seqs,
                    max_rows_per_seq: 1,
                    max_context: usize::MAX,
                },
                ..self
            },
            Kernel::Cascade(..) => self,
        }
    }

    /// What a CUDA graph of this attention is valid for: `None` for the paged kernel (any step
    /// of a bucket); for cascade, the plan's epoch and its sparse selection's (0 without).
    pub fn graph_epoch(&self) -> Option<(u64, u64)> {
        match &self.kernel {
            Kernel::Paged { .. } => None,
            Kernel::Cascade(plan, sparse) => {
                let sp = sparse
                    .as_ref()
                    .and_then(|s| s.lock().ok().map(|s| s.epoch()));
                Some((plan.epoch(), sp.unwrap_or(0)))
            }
        }
    }

    /// A cheap first test: true when no cascade plan is needed, so none is built. Sharing
    /// shows in the first pages (forks and prefix reuse share from page 0); a miss would only
    /// skip cascade's speed-up, not change what is attended.
    fn paged_only(meta: &StepMeta, batch: &BatchLayout, opts: &AttentionOptions) -> bool {
        if batch.seqs.iter().any(|s| s.sparse_budget.is_some()) {
            return false;
        }
        if opts.tree.is_none() || batch.seqs.len() < 2 {
            return true;
        }
        let mut seen = std::collections::HashSet::new();
        let first = |w: &[u32]| meta.page_indices.get(w[0] as usize).copied();
        (meta.page_indptr.windows(2))
            .filter(|w| w[0] < w[1])
            .all(|w| first(w).is_some_and(|p| seen.insert(p)))
    }

    /// Layer `i`'s attention for `rows` rows whose normed input is in `b.xn` and whose layout
    /// is `v`; the result (after the O projection) lands in `b.o`.
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
        v: &MetaViews,
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
            &v.positions,
            &v.slots,
            pool,
            i,
            b.q,
        )?;
        sparse::summarise_rows(gpu, pool, &v.slots, rows, i)?;
        match &self.kernel {
            Kernel::Cascade(plan, sparse) => {
                let lock = sparse.as_ref().map(|sp| sp.lock());
                let mut guard = lock.transpose().map_err(|_| {
                    RuntimeError::Request("the step's sparse selection lock is poisoned".into())
                })?;
                let marks = match guard.as_mut() {
                    Some(sp) => sp.select(gpu, b.q, pool, i, &self.params)?,
                    None => None,
                };
                cascade::cascade_attention(
                    gpu,
                    b.q,
                    rows,
                    plan,
                    pool,
                    i,
                    &self.params,
                    marks,
                    b.xn,
                )?
            }
            &Kernel::Paged {
                seqs,
                max_rows_per_seq,
                max_context,
            } => {
                let batch = attention::AttentionBatch {
                    positions: &v.positions,
                    row_seq: &v.row_seq,
                    seq_row_indptr: &v.seq_row_indptr,
                    page_indptr: &v.page_indptr,
                    page_indices: &v.page_indices,
                    seqs,
                    max_rows_per_seq,
                    max_context,
                };
                attention::attention(gpu, b.q, rows, &batch, pool, i, &self.params, b.xn)?
            }
        }
        gemm.matmul_bt(b.xn, rows, &l.wo, h, qd, b.o)?;
        Ok(())
    }
}

/// `plan` with its rows renumbered into the step's row order: [`StepMeta`] (and so the q
/// buffer) lays rows out sequence after sequence in `batch.seqs` order, while the plan numbers
/// them as `batch.positions` does. The two agree for every layout the engine builds; a layout
/// whose sequences are listed out of row order is renumbered here rather than misread.
fn in_step_order(mut plan: CascadePlan, batch: &BatchLayout) -> Result<CascadePlan, RuntimeError> {
    let rows = batch.rows();
    // step_rows[k]: the batch row that is row k of the step.
    let step_rows: Vec<usize> = batch.seqs.iter().flat_map(|s| s.rows()).collect();
    if step_rows.iter().enumerate().all(|(k, &r)| k == r) && step_rows.len() == rows {
        return Ok(plan);
    }
    let mut step_of = vec![u32::MAX; rows];
    for (k, &r) in step_rows.iter().enumerate() {
        match step_of.get_mut(r) {
            Some(slot) if *slot == u32::MAX => *slot = k as u32,
            _ => {
                return Err(RuntimeError::Request(format!(
                    "the step's sequences do not cover its {rows} rows once each (row {r})"
                )))
            }
        }
    }
    if step_rows.len() != rows || plan.num_rows() != rows {
        return Err(RuntimeError::Request(format!(
            "the step's sequences cover {} of its {rows} rows",
            step_rows.len()
        )));
    }
    for r in &mut plan.group_rows {
        *r = step_of[*r as usize];
    }
    let mut indptr = vec![0u32];
    let mut entries = Vec::with_capacity(plan.row_entries.len());
    for &r in &step_rows {
        entries.extend_from_slice(plan.row_entries(r));
        indptr.push(entries.len() as u32);
    }
    plan.row_pos = step_rows.iter().map(|&r| plan.row_pos[r]).collect();
    plan.row_budget = step_rows.iter().map(|&r| plan.row_budget[r]).collect();
    plan.row_entry_indptr = indptr;
    plan.row_entries = entries;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbor_kernels::kv::KvLayout;
    use arbor_kernels::ops::cascade::PlanOptions;

    /// A cache with a 20-token root (page size 4) forked twice, each fork 2 tokens further.
    fn forked() -> (KvCache, [u64; 2]) {
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 4,
            page_size: 4,
        };
        let mut c = KvCache::for_model(layout, 32, 0);
        c.add_seq(0);
        c.reserve(0, 20).expect("reserve");
        c.commit(0, &[7; 20]);
        for s in [1, 2] {
            c.fork(0, s).expect("fork");
            c.reserve(s, 2).expect("reserve");
        }
        (c, [1, 2])
    }

    #[test]
    fn a_layout_in_row_order_keeps_its_plan() {
        let (c, [a, b]) = forked();
        let mut batch = BatchLayout::default();
        batch.push(a, 20, 2);
        batch.push(b, 20, 1);
        let opts = PlanOptions::default();
        let plan = batch.cascade_plan(&c, true, &opts).expect("plan");
        let plan = plan.expect("the forks share pages");
        assert_eq!(in_step_order(plan.clone(), &batch).expect("order"), plan);
    }

    #[test]
    fn a_layout_out_of_row_order_is_renumbered() {
        let (c, [a, b]) = forked();
        // Sequence a owns rows 1..3, b row 0, but a is listed first: the step's rows are
        // (a 20, a 21, b 20), the plan's (b 20, a 20, a 21).
        let mut batch = BatchLayout::default();
        batch.push(b, 20, 1);
        batch.push(a, 20, 2);
        batch.seqs.swap(0, 1);
        let opts = PlanOptions::default();
        let plan = batch
            .cascade_plan(&c, true, &opts)
            .expect("plan")
            .expect("the forks share pages");
        let step = in_step_order(plan.clone(), &batch).expect("order");
        let moved = [1usize, 2, 0]; // step row k is plan row moved[k]
        for (k, &r) in moved.iter().enumerate() {
            assert_eq!(step.row_pos[k], plan.row_pos[r]);
            let groups = |p: &CascadePlan, row: usize| -> Vec<usize> {
                p.row_entries(row)
                    .iter()
                    .map(|&e| p.group_row_indptr.partition_point(|&x| x <= e) - 1)
                    .collect()
            };
            assert_eq!(groups(&step, k), groups(&plan, r), "row {k}");
            for &e in step.row_entries(k) {
                assert_eq!(step.group_rows[e as usize] as usize, k);
            }
        }
        // Rows that no sequence or two sequences claim are an error, not a misread.
        let mut bad = batch.clone();
        bad.seqs[1].start = 1;
        assert!(in_step_order(plan, &bad).is_err());
    }
}
