//! Causal GQA attention of a sequence's query rows over its paged KV cache.
//!
//! One task per (query row, KV head): the task holds the query vectors of every query head
//! that shares the KV head, walks the sequence's pages in position order, and for each page
//! scores all of its contiguous keys (`[slot][head_dim]` in the host pool layout
//! `[layer][kv_head][page][k|v][slot][head_dim]`) against each query head before moving on, so
//! a page's K and V are read once per task while they sit in L1. When there are too few such
//! tasks for the threads (decoding one sequence), a task is one (row, query head) instead. The softmax is online
//! (running max and normaliser, accumulator rescaled when the max grows), so nothing grows
//! with the context length; the accumulator is the output slice itself.

use super::online::{for_kernels, update, Running};
use super::softmax::with_wide_vectors;
use crate::kv::{BlockTable, KvPool};
use rayon::prelude::*;

/// Shape and options of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; divides `n_heads` (query head `h` reads KV head `h / (n_heads / n_kv_heads)`).
    pub n_kv_heads: usize,
    /// Dimensions per head (queries, keys and values alike).
    pub head_dim: usize,
    /// Multiplier of q·k (usually 1/√head_dim).
    pub scale: f32,
    /// Attend only to the last `w` positions, the query's own included (Mistral-style
    /// sliding window); `Some(0)` acts as `Some(1)`.
    pub sliding_window: Option<usize>,
}

/// For each query row `i` (at absolute position `positions[i]`), attends over positions
/// `0..=positions[i]` (or the sliding window ending there) of the sequence whose pages are
/// `table`, in `layer` of `pool`. `q` and `out` are `rows × n_heads × head_dim`. The K/V of
/// the query rows themselves must already be in the cache.
///
/// # Panics
/// When the shapes disagree (`q`, `out`, `positions` and the pool's layout), when `n_kv_heads`
/// does not divide `n_heads`, or when a position lies beyond the pages of `table`: these are
/// bugs of the caller, not conditions of the input data.
pub fn paged_attention(
    q: &[f32],
    positions: &[usize],
    pool: &KvPool,
    layer: usize,
    table: &BlockTable,
    p: &AttentionParams,
    out: &mut [f32],
) {
    let hd = p.head_dim;
    let ps = pool.layout.page_size;
    assert!(
        p.n_kv_heads > 0 && p.n_heads / p.n_kv_heads * p.n_kv_heads == p.n_heads,
        "paged_attention: {} query heads cannot share {} KV heads",
        p.n_heads,
        p.n_kv_heads
    );
    assert!(
        hd == pool.layout.head_dim && p.n_kv_heads == pool.layout.num_kv_heads,
        "paged_attention: params ({} KV heads × {hd}) disagree with the pool ({} × {})",
        p.n_kv_heads,
        pool.layout.num_kv_heads,
        pool.layout.head_dim
    );
    let row_len = p.n_heads * hd;
    assert!(
        q.len() == positions.len() * row_len && out.len() == q.len(),
        "paged_attention: {} rows need q and out of {} values, got {} and {}",
        positions.len(),
        positions.len() * row_len,
        q.len(),
        out.len()
    );
    let capacity = table.pages.len() * ps;
    if let Some(&bad) = positions.iter().find(|&&pos| pos >= capacity) {
        panic!("paged_attention: position {bad} is beyond the {capacity} positions of the sequence's pages");
    }
    if hd == 0 {
        return;
    }

    let group = p.n_heads / p.n_kv_heads;
    let window = p.sliding_window.map(|w| w.max(1));
    // Query heads per task: the whole group shares each page read, but when that leaves too
    // few tasks to keep the threads busy (decode of one sequence), one head per task.
    let heads_per_task = if positions.len() * p.n_kv_heads >= 2 * rayon::current_num_threads() {
        group
    } else {
        1
    };
    out.par_chunks_mut(heads_per_task * hd)
        .enumerate()
        .for_each(|(task, o)| {
            let first_head = task * heads_per_task;
            let (row, head) = (first_head / p.n_heads, first_head % p.n_heads);
            let pos = positions[row];
            let start = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let qs = &q[first_head * hd..(first_head + heads_per_task) * hd];
            let kv = PagedHead {
                pool,
                layer,
                table,
                kv_head: head / group,
            };
            with_wide_vectors(
                #[inline(always)]
                || attend(qs, &kv, start, pos + 1, p.scale, hd, o),
            );
        });
}

/// One KV head of one sequence in one layer.
struct PagedHead<'a> {
    pool: &'a KvPool,
    layer: usize,
    table: &'a BlockTable,
    kv_head: usize,
}

/// Online-softmax attention of the query heads in `qs` (`group × hd`) over positions
/// `start..end` of `kv`, written to `o` (`group × hd`).
#[inline(always)]
fn attend(
    qs: &[f32],
    kv: &PagedHead,
    start: usize,
    end: usize,
    scale: f32,
    hd: usize,
    o: &mut [f32],
) {
    let group = qs.len() / hd;
    let ps = kv.pool.layout.page_size;
    // Running max and normaliser per query head; `o` accumulates the unnormalised output.
    let mut max = vec![f32::NEG_INFINITY; group];
    let mut norm = vec![0.0f32; group];
    let mut scores = vec![0.0f32; ps];
    // Scratch for an f16 page where the CPU cannot widen f16 in registers.
    let (mut kbuf, mut vbuf) = (kv.pool.page_scratch(), kv.pool.page_scratch());
    o.fill(0.0);

    for page_idx in start / ps..end.div_ceil(ps) {
        let page = kv.table.pages[page_idx];
        let base = page_idx * ps;
        let (lo, hi) = (start.max(base) - base, end.min(base + ps) - base);
        let run = lo * hd..hi * hd;
        let keys = kv
            .pool
            .key_run(kv.layer, page, kv.kv_head)
            .range(run.clone());
        let values = kv.pool.value_run(kv.layer, page, kv.kv_head).range(run);
        let (keys, values) = (for_kernels(keys, &mut kbuf), for_kernels(values, &mut vbuf));
        for (g, (qg, acc)) in qs.chunks_exact(hd).zip(o.chunks_exact_mut(hd)).enumerate() {
            let st = Running {
                max: &mut max[g],
                norm: &mut norm[g],
                acc,
            };
            update(qg, keys, values, scale, st, &mut scores);
        }
    }
    for (acc, &n) in o.chunks_exact_mut(hd).zip(&norm) {
        let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
        acc.iter_mut().for_each(|a| *a *= inv);
    }
}
