//! Cascade (tree) attention: the batch's sequences form a prefix tree over KV pages, and every
//! run of pages shared by a set of sequences is read once for all of their query rows
//! (cascade / Hydragen / DeFT style); per-group partial results are merged exactly by their
//! log-sum-exp. Optionally sparse: each group reads only the pages its rows pick by their key
//! summaries (Quest style).
//!
//! Use: build a [`CascadePlan`] once per forward pass from the block tables (after `reserve`),
//! then per layer optionally [`select_pages`] and call [`cascade_attention`] (partials merged
//! by LSE, the GPU-style kernel) or [`chain_attention`] (state handed from parent to child
//! group: bitwise equal to per-sequence attention, what the CPU engine runs). The plan and the
//! selection are flat CSR arrays, meant to be uploaded as they are for a GPU kernel.

mod attend;
mod chain;
pub mod merge;
mod plan;
mod sparse;

pub use super::AttentionParams;
pub use attend::{cascade_attention, ROWS_PER_TASK};
pub use chain::chain_attention;
pub use merge::{merge_state, merge_states};
pub use plan::{CascadePlan, PlanOptions, PlanSeq, DENSE, NO_PARENT};

/// How cascade attention combines a row's groups.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CascadeMode {
    /// [`chain_attention`]: online-softmax state handed from group to child group; bitwise
    /// equal to per-sequence attention, so results do not depend on the batch.
    #[default]
    Chain,
    /// [`cascade_attention`]: one (output, LSE) partial per group, merged; long groups can be
    /// split across threads. Equal to per-sequence attention up to rounding.
    Merge,
}

impl CascadeMode {
    /// How to cut groups for this mode: state passing gains nothing from splitting a long run
    /// (it only adds levels), merging splits runs so that they spread over threads.
    pub fn plan_options(self) -> PlanOptions {
        match self {
            CascadeMode::Chain => PlanOptions {
                max_group_pages: usize::MAX,
            },
            CascadeMode::Merge => PlanOptions::default(),
        }
    }

    /// Runs this mode's kernel (see [`cascade_attention`] for the arguments).
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        self,
        q: &[f32],
        plan: &CascadePlan,
        pool: &crate::kv::KvPool,
        layer: usize,
        p: &AttentionParams,
        selection: Option<&PageSelection>,
        out: &mut [f32],
    ) {
        match self {
            CascadeMode::Chain => chain_attention(q, plan, pool, layer, p, selection, out),
            CascadeMode::Merge => cascade_attention(q, plan, pool, layer, p, selection, out),
        }
    }
}
pub use sparse::{
    mark_index, row_candidates, select_pages, select_pages_from, selection_start, Candidate,
    PageSelection, RowCandidates, SelectionStart, SparseParams,
};
