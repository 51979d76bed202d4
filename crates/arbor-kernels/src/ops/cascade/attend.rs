//! Cascade attention on the CPU: each group's pages are read once for all of its query rows and
//! all query heads of a KV head, giving per (entry, head) a partial (output, LSE); a second pass
//! merges each row's partials exactly (see [`super::merge`]).
//!
//! Tasks are (KV head, group, chunk of at most [`ROWS_PER_TASK`] of the group's rows): a task
//! walks the group's pages (or the pages a [`PageSelection`] picked) in position order and, per
//! page, scores every row × query head of the chunk against the page's contiguous keys while
//! they sit in L1, with the same online softmax as [`crate::ops::paged_attention`]. Partials
//! live in `[kv_head][entry][head in group][head_dim]`, so every task owns one contiguous
//! slice and no two tasks write the same memory.

use super::plan::CascadePlan;
use super::sparse::PageSelection;
use super::{merge::merge_states, AttentionParams};
use crate::kv::KvPool;
use crate::ops::online::{for_kernels, update, RowLimits, States};
use crate::ops::softmax::with_wide_vectors;
use rayon::prelude::*;
use std::ops::Range;

/// Query rows of one group per task: enough that a page read serves many rows, few enough that
/// a wide shared group still splits across threads and its running state stays in L2.
pub const ROWS_PER_TASK: usize = 32;

/// One unit of parallel work.
struct Task {
    kv_head: usize,
    group: usize,
    entries: Range<usize>,
}

/// Attention of every query row of `plan` over its sequence's pages in `layer` of `pool`,
/// reading each group's pages once (or only the pages `selection` picked, for sparse rows).
/// `q` and `out` are `rows × n_heads × head_dim`. Equals [`crate::ops::paged_attention`] of
/// each row over its own block table up to float rounding (the softmax is split by group and
/// merged by LSE).
///
/// # Panics
/// When shapes disagree (`q`, `out`, the plan's rows, the pool's layout) or `n_kv_heads` does
/// not divide `n_heads`: bugs of the caller.
pub fn cascade_attention(
    q: &[f32],
    plan: &CascadePlan,
    pool: &KvPool,
    layer: usize,
    p: &AttentionParams,
    selection: Option<&PageSelection>,
    out: &mut [f32],
) {
    check_shapes(q, plan, pool, p, out);
    let hd = p.head_dim;
    let row_len = p.n_heads * hd;
    if hd == 0 || plan.num_rows() == 0 {
        return;
    }
    let gh = p.n_heads / p.n_kv_heads;
    let n_entries = plan.num_entries();

    let mut tasks = Vec::new();
    for kv_head in 0..p.n_kv_heads {
        for group in 0..plan.num_groups() {
            let e = plan.entries(group);
            for lo in e.clone().step_by(ROWS_PER_TASK) {
                let entries = lo..(lo + ROWS_PER_TASK).min(e.end);
                tasks.push(Task {
                    kv_head,
                    group,
                    entries,
                });
            }
        }
    }
    let mut part_o = vec![0.0f32; p.n_kv_heads * n_entries * gh * hd];
    let mut part_lse = vec![f32::NEG_INFINITY; p.n_kv_heads * n_entries * gh];
    // Tasks run through the entries of KV head 0, then 1, …: consecutive slices.
    let mut work = Vec::with_capacity(tasks.len());
    let (mut o_rest, mut l_rest) = (part_o.as_mut_slice(), part_lse.as_mut_slice());
    for t in &tasks {
        let n = t.entries.len() * gh;
        let (o, ot) = std::mem::take(&mut o_rest).split_at_mut(n * hd);
        let (l, lt) = std::mem::take(&mut l_rest).split_at_mut(n);
        (o_rest, l_rest) = (ot, lt);
        work.push((t, o, l));
    }
    work.into_par_iter().for_each(|(t, o, l)| {
        let pages = selection.map(|s| s.pages(t.group, t.kv_head));
        with_wide_vectors(
            #[inline(always)]
            || run_task(q, plan, pool, layer, p, t, pages, o, l),
        );
    });

    // Merge each row's partials, root to leaf.
    let (part_o, part_lse) = (&part_o, &part_lse);
    out.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(r, o_row)| {
            let entries = plan.row_entries(r);
            for (h, o) in o_row.chunks_exact_mut(hd).enumerate() {
                let (kvh, gi) = (h / gh, h % gh);
                let at = move |e: &u32| (kvh * n_entries + *e as usize) * gh + gi;
                let parts = entries
                    .iter()
                    .map(move |e| (&part_o[at(e) * hd..(at(e) + 1) * hd], part_lse[at(e)]));
                merge_states(parts, o);
            }
        });
}

/// Panics unless `q`, `out`, the plan, the pool and the params agree.
pub(super) fn check_shapes(
    q: &[f32],
    plan: &CascadePlan,
    pool: &KvPool,
    p: &AttentionParams,
    out: &[f32],
) {
    assert!(
        p.n_kv_heads > 0 && p.n_heads.is_multiple_of(p.n_kv_heads),
        "cascade attention: {} query heads cannot share {} KV heads",
        p.n_heads,
        p.n_kv_heads
    );
    assert!(
        p.head_dim == pool.layout.head_dim
            && p.n_kv_heads == pool.layout.num_kv_heads
            && plan.page_size == pool.layout.page_size,
        "cascade attention: params, plan and pool disagree on the KV layout"
    );
    let row_len = p.n_heads * p.head_dim;
    assert!(
        q.len() == plan.num_rows() * row_len && out.len() == q.len(),
        "cascade attention: {} rows need q and out of {} values, got {} and {}",
        plan.num_rows(),
        plan.num_rows() * row_len,
        q.len(),
        out.len()
    );
}

/// Attention of one task's rows × query heads over its group's pages: normalised outputs into
/// `o` (`entries × gh × hd`) and their LSEs into `lse` (`entries × gh`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn run_task(
    q: &[f32],
    plan: &CascadePlan,
    pool: &KvPool,
    layer: usize,
    p: &AttentionParams,
    t: &Task,
    selected: Option<&[u32]>,
    o: &mut [f32],
    lse: &mut [f32],
) {
    let (hd, ps) = (p.head_dim, plan.page_size);
    let gh = p.n_heads / p.n_kv_heads;
    let pages = plan.pages(t.group);
    let rows = &plan.group_rows[t.entries.clone()];
    let (lim, span) = row_limits(plan, t.group, rows, p.sliding_window);
    let limits = RowLimits::new(&lim);
    let mut max = vec![f32::NEG_INFINITY; rows.len() * gh];
    let mut norm = vec![0.0f32; rows.len() * gh];
    let mut scores = vec![0.0f32; rows.len() * gh * ps];
    // The rows' query heads of this KV head, in the order of their states (`[row][head]`).
    let mut qs = Vec::with_capacity(rows.len() * gh * hd);
    for &r in rows {
        let q0 = (r as usize * p.n_heads + t.kv_head * gh) * hd;
        qs.extend_from_slice(&q[q0..q0 + gh * hd]);
    }
    // Scratch for an f16 page converted once for many heads (see `for_kernels`).
    let (mut kbuf, mut vbuf) = (pool.page_scratch(), pool.page_scratch());
    o.fill(0.0);
    let mut st = States {
        hd,
        max: &mut max,
        norm: &mut norm,
        acc: &mut *o,
    };
    if !span.is_empty() {
        let g_lo = plan.group_first_page[t.group] as usize * ps;
        for j in page_list(selected, &span) {
            let base = g_lo + j * ps;
            let keys = for_kernels(
                pool.key_run(layer, pages[j], t.kv_head),
                &mut kbuf,
                rows.len() * gh,
            );
            let values = for_kernels(
                pool.value_run(layer, pages[j], t.kv_head),
                &mut vbuf,
                rows.len() * gh,
            );
            for (rs, run) in limits.on_page(base, ps) {
                let s = rs.start * gh..rs.end * gh;
                let (k, v) = (keys.rows(run.clone(), hd), values.rows(run, hd));
                let q = &qs[s.start * hd..s.end * hd];
                update(q, k, v, p.scale, st.heads(s), &mut scores);
            }
        }
    }
    for ((acc, &n), (l, &m)) in o
        .chunks_exact_mut(hd)
        .zip(&norm)
        .zip(lse.iter_mut().zip(&max))
    {
        if n > 0.0 {
            let inv = 1.0 / n;
            acc.iter_mut().for_each(|a| *a *= inv);
            *l = m + n.ln();
        } else {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Positions `[lo, hi)` that each of `rows` reads in group `g` (its window clipped to the
/// group), and the span of the group's local page indices that any of them reads.
pub(super) fn row_limits(
    plan: &CascadePlan,
    g: usize,
    rows: &[u32],
    window: Option<usize>,
) -> (Vec<(usize, usize)>, Range<usize>) {
    let ps = plan.page_size;
    let g_lo = plan.group_first_page[g] as usize * ps;
    let g_hi = g_lo + plan.pages(g).len() * ps;
    let window = window.map(|w| w.max(1));
    let lim: Vec<(usize, usize)> = rows
        .iter()
        .map(|&r| {
            let end = plan.row_pos[r as usize] as usize + 1;
            let start = window.map_or(0, |w| end.saturating_sub(w));
            (start.max(g_lo), end.min(g_hi))
        })
        .collect();
    let lo = lim.iter().filter(|l| l.0 < l.1).map(|l| l.0).min();
    let hi = lim.iter().filter(|l| l.0 < l.1).map(|l| l.1).max();
    let span = match (lo, hi) {
        (Some(lo), Some(hi)) => (lo - g_lo) / ps..(hi - g_lo).div_ceil(ps),
        _ => 0..0,
    };
    (lim, span)
}

/// Local page indices to walk, ascending: the selection's (if any) within `span`, else all of
/// `span`.
pub(super) fn page_list<'a>(
    selected: Option<&'a [u32]>,
    span: &'a Range<usize>,
) -> impl Iterator<Item = usize> + 'a {
    let (sel, all) = match selected {
        Some(s) => (Some(s.iter().map(|&j| j as usize)), None),
        None => (None, Some(span.clone())),
    };
    sel.into_iter()
        .flatten()
        .filter(move |j| span.contains(j))
        .chain(all.into_iter().flatten())
}
