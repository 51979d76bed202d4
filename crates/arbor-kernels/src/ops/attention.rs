//! Causal GQA attention of a sequence's query rows over its paged KV cache.

use crate::kv::{BlockTable, KvPool};
use rayon::prelude::*;

/// Shape and options of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplier of q·k (usually 1/√head_dim).
    pub scale: f32,
    /// Attend only to the last `w` positions (Mistral-style sliding window).
    pub sliding_window: Option<usize>,
}

/// For each query row `i` (at absolute position `positions[i]`), attends over positions
/// `0..=positions[i]` of the sequence whose pages are `table`, in `layer` of `pool`.
/// `q` and `out` are `rows × n_heads × head_dim`. The K/V of the query rows themselves must
/// already be in the cache.
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
    let group = p.n_heads / p.n_kv_heads;
    let ps = pool.layout.page_size;
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (row, head) = (idx / p.n_heads, idx % p.n_heads);
        let kvh = head / group;
        let pos = positions[row];
        let qv = &q[idx * hd..(idx + 1) * hd];
        let start = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let mut scores = Vec::with_capacity(pos + 1 - start);
        for t in start..=pos {
            let (page, slot) = table.locate(t, ps);
            let k = &pool.keys(layer, page, kvh)[slot * hd..(slot + 1) * hd];
            scores.push(qv.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * p.scale);
        }
        super::softmax_inplace(&mut scores);
        o.fill(0.0);
        for (t, w) in (start..=pos).zip(&scores) {
            let (page, slot) = table.locate(t, ps);
            let v = &pool.values(layer, page, kvh)[slot * hd..(slot + 1) * hd];
            for (oi, vi) in o.iter_mut().zip(v) {
                *oi += w * vi;
            }
        }
    });
}
