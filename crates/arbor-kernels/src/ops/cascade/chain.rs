//! Cascade attention that hands each row's online-softmax state from a group to its child
//! group instead of merging partials: level by level, a task reads its group's pages once for
//! all of its rows, starting every row from the (max, normaliser, unnormalised output) its
//! parent group left. Each (row, head) then goes through exactly the operations of
//! [`crate::ops::paged_attention`] in the same order, so the result is bitwise equal to it: a
//! branch's output does not depend on which other branches share its batch (what the engine
//! wants: reproducible runs whatever the packing).
//!
//! The price against [`super::cascade_attention`]: levels run one after the other, and a long
//! group cannot be split across threads by pages (split-K); only by KV head, query head and
//! chunks of rows. State lives in `[query head][entry][…]`, so every task owns contiguous
//! slices of it.

use super::attend::{page_list, row_limits, ROWS_PER_TASK};
use super::plan::CascadePlan;
use super::sparse::PageSelection;
use super::AttentionParams;
use crate::kv::KvPool;
use crate::ops::online::{for_kernels, update, RowLimits, States};
use crate::ops::softmax::with_wide_vectors;
use rayon::prelude::*;
use std::ops::Range;

/// One query head's finished states of earlier levels.
#[derive(Clone, Copy)]
struct Prev<'a> {
    acc: &'a [f32],
    max: &'a [f32],
    norm: &'a [f32],
}

/// [`super::cascade_attention`] with state passing instead of merging: same arguments, same
/// results up to rounding, and bitwise equal to per-sequence [`crate::ops::paged_attention`].
///
/// # Panics
/// As [`super::cascade_attention`].
pub fn chain_attention(
    q: &[f32],
    plan: &CascadePlan,
    pool: &KvPool,
    layer: usize,
    p: &AttentionParams,
    selection: Option<&PageSelection>,
    out: &mut [f32],
) {
    super::attend::check_shapes(q, plan, pool, p, out);
    let hd = p.head_dim;
    if hd == 0 || plan.num_rows() == 0 {
        return;
    }
    let (nh, gh) = (p.n_heads, p.n_heads / p.n_kv_heads);
    let ne = plan.num_entries();
    let mut acc = vec![0.0f32; nh * ne * hd];
    let mut max = vec![f32::NEG_INFINITY; nh * ne];
    let mut norm = vec![0.0f32; nh * ne];
    let threads = rayon::current_num_threads();
    for k in 0..plan.level_indptr.len().saturating_sub(1) {
        let groups = plan.level_indptr[k] as usize..plan.level_indptr[k + 1] as usize;
        let e0 = plan.group_row_indptr[groups.start] as usize;
        let e1 = plan.group_row_indptr[groups.end] as usize;
        // Entry chunks of this level, in entry order.
        let mut chunks: Vec<(usize, Range<usize>)> = Vec::new();
        for g in groups {
            let e = plan.entries(g);
            for lo in e.clone().step_by(ROWS_PER_TASK) {
                chunks.push((g, lo..(lo + ROWS_PER_TASK).min(e.end)));
            }
        }
        // Whole GQA groups per task share each page read; one head per task when that
        // leaves too few tasks for the threads (as paged_attention does).
        let hpt = if chunks.len() * p.n_kv_heads >= 2 * threads {
            gh
        } else {
            1
        };
        // Per query head: earlier levels read-only, this level cut into the chunks.
        let mut prev = Vec::with_capacity(nh);
        let mut cur: Vec<Vec<Option<States>>> = Vec::with_capacity(nh);
        let iter = acc
            .chunks_exact_mut(ne * hd)
            .zip(max.chunks_exact_mut(ne))
            .zip(norm.chunks_exact_mut(ne));
        for ((a, m), n) in iter {
            let (pa, a) = a.split_at_mut(e0 * hd);
            let (pm, m) = m.split_at_mut(e0);
            let (pn, n) = n.split_at_mut(e0);
            prev.push(Prev {
                acc: pa,
                max: pm,
                norm: pn,
            });
            let (mut a, mut m, mut n) = (
                &mut a[..(e1 - e0) * hd],
                &mut m[..e1 - e0],
                &mut n[..e1 - e0],
            );
            let mut pieces = Vec::with_capacity(chunks.len());
            for (_, c) in &chunks {
                let (ah, at) = std::mem::take(&mut a).split_at_mut(c.len() * hd);
                let (mh, mt) = std::mem::take(&mut m).split_at_mut(c.len());
                let (nh_, nt) = std::mem::take(&mut n).split_at_mut(c.len());
                (a, m, n) = (at, mt, nt);
                pieces.push(Some(States {
                    hd,
                    acc: ah,
                    max: mh,
                    norm: nh_,
                }));
            }
            cur.push(pieces);
        }
        let mut tasks = Vec::with_capacity(chunks.len() * nh / hpt);
        for (i, (g, c)) in chunks.iter().enumerate() {
            for h0 in (0..nh).step_by(hpt) {
                let states: Vec<States> = (h0..h0 + hpt)
                    .map(|h| cur[h][i].take().expect("each piece taken once"))
                    .collect();
                tasks.push((*g, c.clone(), h0, states));
            }
        }
        let prev = &prev;
        tasks
            .into_par_iter()
            .for_each(|(g, entries, h0, mut states)| {
                let kv_head = h0 / gh;
                let sel = selection.map(|s| s.pages(g, kv_head));
                with_wide_vectors(
                    #[inline(always)]
                    || {
                        let task = Task {
                            level: k,
                            group: g,
                            entries,
                            h0,
                            kv_head,
                        };
                        run(q, plan, pool, layer, p, &task, sel, prev, &mut states)
                    },
                );
            });
    }
    // Each row's state after its last group, normalised as paged_attention does.
    out.par_chunks_mut(nh * hd)
        .enumerate()
        .for_each(|(r, o_row)| {
            let Some(&e) = plan.row_entries(r).last() else {
                return o_row.fill(0.0);
            };
            for (h, o) in o_row.chunks_exact_mut(hd).enumerate() {
                let at = h * ne + e as usize;
                let n = norm[at];
                let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
                o.copy_from_slice(&acc[at * hd..(at + 1) * hd]);
                o.iter_mut().for_each(|a| *a *= inv);
            }
        });
}

/// What one task computes: query heads `h0..h0 + states.len()` (all of KV head `kv_head`) of
/// the rows of `entries` in group `group` at level `level`.
struct Task {
    level: usize,
    group: usize,
    entries: Range<usize>,
    h0: usize,
    kv_head: usize,
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn run(
    q: &[f32],
    plan: &CascadePlan,
    pool: &KvPool,
    layer: usize,
    p: &AttentionParams,
    t: &Task,
    selected: Option<&[u32]>,
    prev: &[Prev],
    states: &mut [States],
) {
    let (hd, ps) = (p.head_dim, plan.page_size);
    let rows = &plan.group_rows[t.entries.clone()];
    // Start from the parent group's state (a root group starts empty).
    for (i, &r) in rows.iter().enumerate() {
        for (h, st) in states.iter_mut().enumerate() {
            let acc = &mut st.acc[i * hd..(i + 1) * hd];
            if t.level == 0 {
                (st.max[i], st.norm[i]) = (f32::NEG_INFINITY, 0.0);
                acc.fill(0.0);
            } else {
                let pe = plan.row_entries(r as usize)[t.level - 1] as usize;
                let pv = &prev[t.h0 + h];
                (st.max[i], st.norm[i]) = (pv.max[pe], pv.norm[pe]);
                acc.copy_from_slice(&pv.acc[pe * hd..(pe + 1) * hd]);
            }
        }
    }
    let (lim, span) = row_limits(plan, t.group, rows, p.sliding_window);
    let limits = RowLimits::new(&lim);
    let pages = plan.pages(t.group);
    let g_lo = plan.group_first_page[t.group] as usize * ps;
    let mut scores = vec![0.0f32; rows.len() * ps];
    // Each query head's rows, in the order of its states.
    let qs: Vec<Vec<f32>> = (0..states.len())
        .map(|h| {
            rows.iter()
                .flat_map(|&r| {
                    let q0 = (r as usize * p.n_heads + t.h0 + h) * hd;
                    &q[q0..q0 + hd]
                })
                .copied()
                .collect()
        })
        .collect();
    // Scratch for an f16 page converted once for many heads (see `for_kernels`).
    let (mut kbuf, mut vbuf) = (pool.page_scratch(), pool.page_scratch());
    for j in page_list(selected, &span) {
        let base = g_lo + j * ps;
        let keys = for_kernels(
            pool.key_run(layer, pages[j], t.kv_head),
            &mut kbuf,
            rows.len() * qs.len(),
        );
        let values = for_kernels(
            pool.value_run(layer, pages[j], t.kv_head),
            &mut vbuf,
            rows.len() * qs.len(),
        );
        for (rs, run) in limits.on_page(base, ps) {
            let (k, v) = (keys.rows(run.clone(), hd), values.rows(run, hd));
            for (st, qh) in states.iter_mut().zip(&qs) {
                let q = &qh[rs.start * hd..rs.end * hd];
                update(q, k, v, p.scale, st.heads(rs.clone()), &mut scores);
            }
        }
    }
}
