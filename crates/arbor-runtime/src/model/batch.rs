//! How a step's rows are laid out: each sequence's new tokens are a contiguous run of rows.

use crate::RuntimeError;
use arbor_kernels::kv::{KvCache, KvDtype, SeqId};
use arbor_kernels::ops::cascade::{CascadeMode, CascadePlan, PlanOptions, PlanSeq, SparseParams};
use std::ops::Range;

/// How a model's attention runs over the paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionOptions {
    /// Cascade attention for steps whose sequences share KV pages (each shared page read once
    /// for all of them), in this mode; `None`: each sequence attends alone. Default
    /// `Some(Chain)`, bitwise equal to per-sequence attention.
    pub tree: Option<CascadeMode>,
    /// Sink and local pages, and dense layers, of sequences with a sparse budget (they go
    /// through cascade attention even when `tree` is `None`).
    pub sparse: SparseParams,
    /// How the CPU's KV pages store K and V (read when an engine allocates its cache): f32,
    /// the reference, or f16 (half the bytes). A GPU stores bf16 either way.
    pub kv_dtype: KvDtype,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        AttentionOptions {
            tree: Some(CascadeMode::Chain),
            sparse: SparseParams::default(),
            kv_dtype: KvDtype::F32,
        }
    }
}

impl AttentionOptions {
    /// The cascade mode a plan runs in (the default one when `tree` is off and rows are
    /// sparse).
    pub fn mode(&self) -> CascadeMode {
        self.tree.unwrap_or_default()
    }
}

/// One sequence's rows in the batch.
#[derive(Clone, Debug)]
pub struct SeqRows {
    pub seq: SeqId,
    /// First row of this sequence in the batch.
    pub start: usize,
    /// Number of new tokens (rows).
    pub len: usize,
    /// Sparse attention budget in pages per row (see [`arbor_kernels::ops::cascade`]).
    pub sparse_budget: Option<usize>,
}

impl SeqRows {
    pub fn rows(&self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

/// Row layout of a step: sequences and the absolute position of every row.
#[derive(Clone, Debug, Default)]
pub struct BatchLayout {
    pub seqs: Vec<SeqRows>,
    pub positions: Vec<usize>,
}

impl BatchLayout {
    /// Adds a sequence whose `len` new tokens start at position `pos0`.
    pub fn push(&mut self, seq: SeqId, pos0: usize, len: usize) {
        self.push_sparse(seq, pos0, len, None);
    }

    /// [`BatchLayout::push`] with a sparse attention budget (`None`: dense).
    pub fn push_sparse(&mut self, seq: SeqId, pos0: usize, len: usize, budget: Option<usize>) {
        let start = self.positions.len();
        self.positions.extend(pos0..pos0 + len);
        self.seqs.push(SeqRows {
            seq,
            start,
            len,
            sparse_budget: budget,
        });
    }

    /// The cascade attention plan of this batch over the block tables of `cache` (after
    /// `reserve`), when its sequences share pages and `tree` is on, or when some sequence asked
    /// for sparse attention; `None` means plain per-sequence attention.
    pub fn cascade_plan(
        &self,
        cache: &KvCache,
        tree: bool,
        opts: &PlanOptions,
    ) -> Result<Option<CascadePlan>, RuntimeError> {
        let sparse = self.seqs.iter().any(|s| s.sparse_budget.is_some());
        if !sparse && (!tree || self.seqs.len() < 2) {
            return Ok(None);
        }
        let mut seqs = Vec::with_capacity(self.seqs.len());
        for s in &self.seqs {
            let table = cache.table(s.seq).ok_or_else(|| {
                RuntimeError::Request(format!("sequence {} has no KV cache", s.seq))
            })?;
            seqs.push(PlanSeq {
                pages: &table.pages,
                rows: s.rows(),
                sparse_budget: s.sparse_budget,
            });
        }
        let ps = cache.layout().page_size;
        let plan = CascadePlan::build(&seqs, &self.positions, ps, opts)?;
        Ok((sparse || plan.has_sharing()).then_some(plan))
    }
    pub fn rows(&self) -> usize {
        self.positions.len()
    }
}
