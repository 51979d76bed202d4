//! Causal GQA attention of a sequence's query rows over its paged KV cache.
//!
//! A task is a block of query rows × query heads; for each KV head it covers, it walks the
//! sequence's pages in position order and steps all of its query heads of that KV head over
//! each page together (rows that read the same positions of the page in one register-tiled
//! [`update`]), so a page's K and V are read once per task while they sit in L1 and each loaded
//! key or value vector serves several query heads. Blocks: several rows × all heads for a long
//! prompt, one row × one KV head's query heads for a few rows, one row × one query head when
//! even that leaves too few tasks for the threads (decoding one sequence). The softmax is
//! online (running max and normaliser, accumulator rescaled when the max grows), so nothing
//! grows with the context length. A head's result does not depend on the block it is in.

use super::online::{for_kernels, update, RowLimits, States};
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
    let rows = positions.len();
    let threads = rayon::current_num_threads();
    // Rows × heads per task: many rows together where there are rows enough to keep every
    // thread busy, else one row and the query heads of a KV head (which share each page read;
    // measured faster even at 3 such tasks on 2 threads), else (decode of one sequence with
    // fewer KV heads than threads) one row and one head.
    let (rows_per_task, heads_per_task) = if rows >= 2 * ROW_BLOCK * threads {
        (ROW_BLOCK, p.n_heads)
    } else if rows * p.n_kv_heads >= threads {
        (1, group)
    } else {
        (1, 1)
    };
    let limits: Vec<(usize, usize)> = positions
        .iter()
        .map(|&pos| (window.map_or(0, |w| (pos + 1).saturating_sub(w)), pos + 1))
        .collect();
    out.par_chunks_mut(rows_per_task * heads_per_task * hd)
        .enumerate()
        .for_each(|(task, o)| {
            let (r0, h0) = if rows_per_task > 1 {
                (task * rows_per_task, 0)
            } else {
                let first = task * heads_per_task;
                (first / p.n_heads, first % p.n_heads)
            };
            let r1 = (r0 + rows_per_task).min(rows);
            let block = Block {
                q,
                row_len,
                rows: r0..r1,
                heads: h0..h0 + heads_per_task,
                group,
                hd,
            };
            with_wide_vectors(
                #[inline(always)]
                || {
                    for kv_head in h0 / group..(h0 + heads_per_task).div_ceil(group) {
                        let kv = PagedHead {
                            pool,
                            layer,
                            table,
                            kv_head,
                        };
                        attend(&block, &limits[r0..r1], &kv, p.scale, o);
                    }
                },
            );
        });
}

/// Prompt rows per task when there are enough of them: a page read (and its f16 conversion)
/// serves this many rows × all of a KV head's query heads. 16 rather than 8: a 3.3K-token
/// SmolLM2 prompt ran 4% faster (six alternating runs each), 32 no faster than 16.
const ROW_BLOCK: usize = 16;

/// One task's query rows × query heads (its output is `rows × heads × head_dim`, contiguous in
/// `out`: either one row, or all heads).
struct Block<'a> {
    q: &'a [f32],
    row_len: usize,
    rows: std::ops::Range<usize>,
    heads: std::ops::Range<usize>,
    group: usize,
    hd: usize,
}

/// One KV head of one sequence in one layer.
struct PagedHead<'a> {
    pool: &'a KvPool,
    layer: usize,
    table: &'a BlockTable,
    kv_head: usize,
}

/// Online-softmax attention of the block's query heads of `kv.kv_head` (row `i` reading
/// positions `lim[i]`) over `kv`, normalised into their places in `o` (the block's output).
#[inline(always)]
fn attend(b: &Block, lim: &[(usize, usize)], kv: &PagedHead, scale: f32, o: &mut [f32]) {
    let hd = b.hd;
    let ps = kv.pool.layout.page_size;
    // This KV head's query heads within the block, and their states (`[row][head]`).
    let lo = b.heads.start.max(kv.kv_head * b.group);
    let hi = b.heads.end.min((kv.kv_head + 1) * b.group);
    let (nr, nh) = (b.rows.len(), hi - lo);
    let n = nr * nh;
    let mut qs = Vec::with_capacity(n * hd);
    for r in b.rows.clone() {
        qs.extend_from_slice(&b.q[r * b.row_len + lo * hd..r * b.row_len + hi * hd]);
    }
    let (mut max, mut norm, mut acc) =
        (vec![f32::NEG_INFINITY; n], vec![0.0; n], vec![0.0; n * hd]);
    let mut st = States {
        hd,
        max: &mut max,
        norm: &mut norm,
        acc: &mut acc,
    };
    let mut scores = vec![0.0f32; n * ps];
    // Scratch for an f16 page converted once for many heads (see `for_kernels`).
    let (mut kbuf, mut vbuf) = (kv.pool.page_scratch(), kv.pool.page_scratch());

    let start = lim.iter().map(|l| l.0).min().unwrap_or(0);
    let end = lim.iter().map(|l| l.1).max().unwrap_or(0);
    let limits = RowLimits::new(lim);
    for page_idx in start / ps..end.div_ceil(ps) {
        let page = kv.table.pages[page_idx];
        let base = page_idx * ps;
        let keys = for_kernels(kv.pool.key_run(kv.layer, page, kv.kv_head), &mut kbuf, n);
        let values = for_kernels(kv.pool.value_run(kv.layer, page, kv.kv_head), &mut vbuf, n);
        for (rows, run) in limits.on_page(base, ps) {
            let heads = rows.start * nh..rows.end * nh;
            let (k, v) = (keys.rows(run.clone(), hd), values.rows(run, hd));
            let q = &qs[heads.start * hd..heads.end * hd];
            update(q, k, v, scale, st.heads(heads), &mut scores);
        }
    }
    let width = b.heads.len();
    for (s, (a, &z)) in acc.chunks_exact(hd).zip(&norm).enumerate() {
        let (i, h) = (s / nh, lo + s % nh);
        let at = (i * width + h - b.heads.start) * hd;
        let inv = if z > 0.0 { 1.0 / z } else { 0.0 };
        for (dst, &x) in o[at..at + hd].iter_mut().zip(a) {
            *dst = x * inv;
        }
    }
}
