//! Sparse page selection (Quest style), per layer, over a [`CascadePlan`].
//!
//! Each page's keys are summarised by their per-channel min and max
//! ([`crate::kv::KeySummaries`]), which bound `q · k` over the page by
//! `Σ_c max(q_c·min_c, q_c·max_c)`. A query row with a budget of `B` pages reads:
//! - its *sink*: the first [`SparseParams::sink_pages`] pages of the sequence;
//! - its *local window*: the last [`SparseParams::local_pages`] pages up to and including the
//!   page of its own position (at least that one page);
//! - the `B` other visible pages with the highest bound, chosen per KV head (the bound of a
//!   KV head is the largest over the query heads that share it).
//!
//! So a row reads at most `B + sink + local` pages per KV head. With the sliding window only
//! pages inside the window are candidates. The first [`SparseParams::dense_layers`] layers
//! read everything.
//!
//! Sharing: selection is per (group, KV head), not per row. Every row chooses its own pages as
//! above, and a group then reads the *union* of its rows' choices among its pages, once, for all
//! of its rows: each row still sees every page it chose itself (so it is never less accurate than
//! per-row Quest with the same budget), a page chosen by several branches is read once, and a row
//! also attends to pages its siblings chose (only more context). A dense row (no budget) in a
//! group makes that group dense for all of its rows. The union was preferred over ranking a
//! group's pages by the max of its rows' bounds under one shared budget: the bounds of
//! different rows are not on a common scale (a row with a large query norm would take the whole
//! budget), while the union keeps each row's own ranking.

use super::plan::{CascadePlan, DENSE};
use super::AttentionParams;
use crate::kv::KvPool;
use crate::ops::softmax::with_wide_vectors;
use rayon::prelude::*;

/// Pages every sparse row reads besides its top-scoring ones, and where sparsity applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseParams {
    /// First pages of the sequence (attention sinks).
    pub sink_pages: usize,
    /// Pages up to and including the query's own (at least 1).
    pub local_pages: usize,
    /// Layers `0..dense_layers` stay dense: early layers attend broadly, and Quest keeps its
    /// first two layers dense for that reason.
    pub dense_layers: usize,
}

impl Default for SparseParams {
    fn default() -> Self {
        SparseParams {
            sink_pages: 1,
            local_pages: 2,
            dense_layers: 2,
        }
    }
}

/// The pages each (group, KV head) of a plan reads in one layer: local indices into the
/// group's pages, ascending, in CSR form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageSelection {
    n_kv_heads: usize,
    /// List `g · n_kv_heads + h` is `pages[indptr[i]..indptr[i + 1]]`.
    pub indptr: Vec<u32>,
    /// Local page indices (into [`CascadePlan::pages`] of the group).
    pub pages: Vec<u32>,
}

impl PageSelection {
    /// Pages group `group` reads for KV head `kv_head`.
    pub fn pages(&self, group: usize, kv_head: usize) -> &[u32] {
        let i = group * self.n_kv_heads + kv_head;
        &self.pages[self.indptr[i] as usize..self.indptr[i + 1] as usize]
    }
    /// Page reads of the layer, summed over KV heads.
    pub fn pages_read(&self) -> usize {
        self.pages.len()
    }
}

/// Where the mark of page `j` of group `g` for KV head `h` sits in a selection's mark array
/// (`plan.pages_read() × n_kv_heads` entries): groups in order, each `n_kv_heads` runs of its
/// pages. [`select_pages`] and the GPU selection (`cuda::ops::sparse`) share this layout.
pub fn mark_index(plan: &CascadePlan, n_kv_heads: usize, g: usize, h: usize, j: usize) -> usize {
    plan.group_page_indptr[g] as usize * n_kv_heads + h * plan.pages(g).len() + j
}

/// A page a sparse row may read: page `j` (local) of group `group`, pool page `page`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub group: usize,
    pub j: usize,
    pub page: u32,
}

/// The pages of one sparse row before ranking: those it always reads (sink and local window,
/// for every KV head) and the candidates, in a fixed order (the row's entries in order, each
/// group's visible pages ascending), of which it reads the `take` with the highest bounds per
/// KV head; ties go to the earlier candidate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowCandidates {
    pub always: Vec<(usize, usize)>,
    pub cands: Vec<Candidate>,
    pub take: usize,
}

/// Row `r`'s [`RowCandidates`]; `None` for a dense row (no budget).
pub fn row_candidates(
    plan: &CascadePlan,
    p: &AttentionParams,
    sp: &SparseParams,
    r: usize,
) -> Option<RowCandidates> {
    let budget = plan.row_budget[r];
    if budget == DENSE {
        return None;
    }
    let ps = plan.page_size;
    let end = plan.row_pos[r] as usize + 1;
    let start = p.sliding_window.map_or(0, |w| end.saturating_sub(w.max(1)));
    let last_page = (end - 1) / ps;
    let local = sp.local_pages.max(1);
    let mut out = RowCandidates::default();
    for &e in plan.row_entries(r) {
        let g = plan
            .group_row_indptr
            .partition_point(|&x| x as usize <= e as usize)
            - 1;
        let first = plan.group_first_page[g] as usize;
        let pages = plan.pages(g);
        let (lo, hi) = (start.max(first * ps), end.min((first + pages.len()) * ps));
        if lo >= hi {
            continue;
        }
        let visible = (lo / ps - first)..(hi.div_ceil(ps) - first);
        for (j, &page) in pages
            .iter()
            .enumerate()
            .take(visible.end)
            .skip(visible.start)
        {
            let abs = first + j;
            if abs < sp.sink_pages || abs + local > last_page {
                out.always.push((g, j));
            } else {
                out.cands.push(Candidate { group: g, j, page });
            }
        }
    }
    out.take = (budget as usize).min(out.cands.len());
    Some(out)
}

/// What a selection decides before any ranking, the same in every sparse layer: the marks
/// (laid out as [`mark_index`]) of dense groups (a group with a dense row reads everything),
/// of every sparse row's sink and local pages, and of all the candidates of rows whose budget
/// covers them; and the rows left to rank, with their candidates. [`select_pages`] ranks them
/// on the CPU; the GPU's host half (`cuda::ops::sparse::SparseHostPlan`) hands them to its
/// kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SelectionStart {
    pub marks: Vec<bool>,
    /// (row, its candidates), for rows that take some but not all of them.
    pub ranked: Vec<(usize, RowCandidates)>,
}

/// The [`SelectionStart`] of `plan`'s rows.
pub fn selection_start(
    plan: &CascadePlan,
    p: &AttentionParams,
    sp: &SparseParams,
) -> SelectionStart {
    let nkv = p.n_kv_heads;
    let mut out = SelectionStart {
        marks: vec![false; plan.pages_read() * nkv],
        ranked: Vec::new(),
    };
    for g in 0..plan.num_groups() {
        let dense = plan.group_rows[plan.entries(g)]
            .iter()
            .any(|&r| plan.row_budget[r as usize] == DENSE);
        if dense {
            let b = mark_index(plan, nkv, g, 0, 0);
            out.marks[b..b + nkv * plan.pages(g).len()].fill(true);
        }
    }
    for r in 0..plan.num_rows() {
        let Some(rc) = row_candidates(plan, p, sp, r) else {
            continue;
        };
        let all = rc.take == rc.cands.len();
        let taken = rc.cands.iter().filter(|_| all).map(|c| (c.group, c.j));
        for (g, j) in rc.always.iter().copied().chain(taken) {
            for h in 0..nkv {
                out.marks[mark_index(plan, nkv, g, h, j)] = true;
            }
        }
        if !all && rc.take > 0 {
            out.ranked.push((r, rc));
        }
    }
    out
}

/// Chooses the pages of `layer` that each group of `plan` reads for the queries `q`
/// (`rows × n_heads × head_dim`, after RoPE). `None` (read everything) when no row has a
/// sparse budget or `layer` is one of the dense layers. A forward pass makes the
/// [`SelectionStart`] once and calls [`select_pages_from`] in each layer.
pub fn select_pages(
    q: &[f32],
    plan: &CascadePlan,
    pool: &KvPool,
    layer: usize,
    p: &AttentionParams,
    sp: &SparseParams,
) -> Option<PageSelection> {
    if !plan.has_sparse() || layer < sp.dense_layers {
        return None;
    }
    select_pages_from(q, plan, &selection_start(plan, p, sp), pool, layer, p, sp)
}

/// [`select_pages`] from the step's `start` (`selection_start` of the same plan and
/// parameters): only the ranking depends on the layer. `None` for the dense layers.
pub fn select_pages_from(
    q: &[f32],
    plan: &CascadePlan,
    start: &SelectionStart,
    pool: &KvPool,
    layer: usize,
    p: &AttentionParams,
    sp: &SparseParams,
) -> Option<PageSelection> {
    if layer < sp.dense_layers {
        return None;
    }
    let nkv = p.n_kv_heads;
    let mut marks = start.marks.clone();
    let picks: Vec<Vec<usize>> = start
        .ranked
        .par_iter()
        .map(|(r, rc)| row_picks(q, plan, pool, layer, p, *r, rc))
        .collect();
    for m in picks.into_iter().flatten() {
        marks[m] = true;
    }
    let mut sel = PageSelection {
        n_kv_heads: nkv,
        indptr: vec![0],
        pages: Vec::new(),
    };
    for g in 0..plan.num_groups() {
        for h in 0..nkv {
            let b = mark_index(plan, nkv, g, h, 0);
            let n = plan.pages(g).len();
            sel.pages
                .extend((0..n as u32).filter(|&j| marks[b + j as usize]));
            sel.indptr.push(sel.pages.len() as u32);
        }
    }
    Some(sel)
}

/// Marks (indices into the selection's mark array, see [`mark_index`]) of the `rc.take`
/// candidates with the highest bounds, per KV head, that row `r` ranks.
fn row_picks(
    q: &[f32],
    plan: &CascadePlan,
    pool: &KvPool,
    layer: usize,
    p: &AttentionParams,
    r: usize,
    rc: &RowCandidates,
) -> Vec<usize> {
    let (hd, nkv) = (p.head_dim, p.n_kv_heads);
    let gh = p.n_heads / nkv;
    let k = rc.take;
    let sums = pool.summaries();
    let mut marks = Vec::with_capacity(k * nkv);
    let mut scored: Vec<(f32, usize)> = Vec::with_capacity(rc.cands.len());
    for h in 0..nkv {
        let q0 = (r * p.n_heads + h * gh) * hd;
        let qh = &q[q0..q0 + gh * hd];
        scored.clear();
        scored.resize(rc.cands.len(), (0.0, 0));
        // A plain loop in the closure: the bounds must be compiled inside the AVX2 function
        // (a call into `Vec::extend` would compile them without it).
        with_wide_vectors(
            #[inline(always)]
            || {
                for (c, (slot, cand)) in scored.iter_mut().zip(&rc.cands).enumerate() {
                    *slot = (sums.max_bound(layer, cand.page, h, qh), c);
                }
            },
        );
        // Highest bounds first, ties to the earlier candidate: a total order, so the choice
        // is unique (NaN included) and the GPU's selection can make the same one.
        scored.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, c) in &scored[..k] {
            let cand = rc.cands[c];
            marks.push(mark_index(plan, nkv, cand.group, h, cand.j));
        }
    }
    marks
}
