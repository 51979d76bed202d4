//! Per-page key summaries for sparse attention (Quest style): for every (layer, page, KV head),
//! the per-channel minimum and maximum of the keys held in the page's first `filled` slots.
//!
//! For a query `q` the score of any key `k` in the page is at most
//! `Σ_c max(q_c·min_c, q_c·max_c)` ([`KeySummaries::bound`]), which is what sparse page
//! selection ranks pages by. The summaries are kept up to date by [`super::KvPool::write`] and
//! [`super::KvPool::copy_page`]; they cost `2 × head_dim` floats per (layer, page, KV head),
//! i.e. `1 / page_size` of the pool.
//!
//! A page's slots are written in order (a sequence appends), so a write at slot `s` means that
//! slots past `s` no longer hold anything valid: a write at `s == filled` extends the summary in
//! O(head_dim), any other write (a page reused after a free, a sequence rewriting positions
//! after a truncation) recomputes it from slots `0..=s` of the pool. Between a truncation and
//! the next write the summary still covers the dropped slots: it stays an upper bound, only a
//! looser one.

use super::{KvLayout, PageId};

/// `Σ_c max(q_c·min_c, q_c·max_c)` in eight lane sums added in order (sparse.cu's
/// `page_bound` does the same operations, so both backends rank pages alike).
#[inline(always)]
fn lane_bound(q: &[f32], mn: &[f32], mx: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n = q.len().min(mn.len()).min(mx.len());
    let mut c = 0;
    while c + 8 <= n {
        for j in 0..8 {
            acc[j] += (q[c + j] * mn[c + j]).max(q[c + j] * mx[c + j]);
        }
        c += 8;
    }
    for j in 0..n - c {
        acc[j] += (q[c + j] * mn[c + j]).max(q[c + j] * mx[c + j]);
    }
    // In lane order, as `Iterator::sum` adds them.
    let mut s = -0.0f32;
    for a in acc {
        s += a;
    }
    s
}

/// Min/max of the keys of every (layer, page, KV head), laid out
/// `[layer][page][kv_head][min | max][head_dim]`, plus the slots each (layer, page) covers.
#[derive(Clone, Debug)]
pub struct KeySummaries {
    num_layers: usize,
    num_pages: usize,
    num_kv_heads: usize,
    head_dim: usize,
    data: Vec<f32>,
    /// Slots summarised, per `[layer][page]` (at most the page size, ≤ 32).
    filled: Vec<u16>,
}

impl KeySummaries {
    /// Empty summaries for `num_pages` pages of `layout`.
    pub fn new(layout: &KvLayout, num_pages: usize) -> Self {
        let n = layout.num_layers * num_pages * layout.num_kv_heads * 2 * layout.head_dim;
        KeySummaries {
            num_layers: layout.num_layers,
            num_pages,
            num_kv_heads: layout.num_kv_heads,
            head_dim: layout.head_dim,
            data: vec![0.0; n],
            filled: vec![0; layout.num_layers * num_pages],
        }
    }

    /// Follows the pool to `num_pages` pages (kept pages keep their summaries).
    pub(crate) fn resize(&mut self, num_pages: usize) {
        let per_page = self.num_kv_heads * 2 * self.head_dim;
        let layers = self.num_layers;
        self.data = super::pool::relayout(&self.data, layers, self.num_pages, num_pages, per_page);
        self.filled = super::pool::relayout(&self.filled, layers, self.num_pages, num_pages, 1);
        self.num_pages = num_pages;
    }

    fn index(&self, layer: usize, page: PageId, head: usize) -> usize {
        ((layer * self.num_pages + page as usize) * self.num_kv_heads + head) * 2 * self.head_dim
    }

    /// Per-channel (min, max) of the keys of `head` in the summarised slots of `page`
    /// (meaningless when [`KeySummaries::filled`] is 0).
    pub fn min_max(&self, layer: usize, page: PageId, head: usize) -> (&[f32], &[f32]) {
        let i = self.index(layer, page, head);
        self.data[i..i + 2 * self.head_dim].split_at(self.head_dim)
    }

    /// Slots of `page` in `layer` that the summary covers.
    pub fn filled(&self, layer: usize, page: PageId) -> usize {
        self.filled[layer * self.num_pages + page as usize] as usize
    }

    /// Upper bound of `q · k` over the summarised keys of `head` in `page`:
    /// `Σ_c max(q_c·min_c, q_c·max_c)`; −∞ for a page with nothing summarised.
    pub fn bound(&self, layer: usize, page: PageId, head: usize, q: &[f32]) -> f32 {
        self.max_bound(layer, page, head, q)
    }

    /// The largest [`KeySummaries::bound`] over the query vectors `qs` (`n × head_dim`, e.g.
    /// the query heads that share KV head `head`), each computed exactly as `bound` does; the
    /// page's min and max are read once for all of them. Inlined, so that a caller compiled
    /// for wider vectors (`with_wide_vectors`) vectorises it.
    #[inline(always)]
    pub fn max_bound(&self, layer: usize, page: PageId, head: usize, qs: &[f32]) -> f32 {
        if self.filled(layer, page) == 0 {
            return f32::NEG_INFINITY;
        }
        let (mn, mx) = self.min_max(layer, page, head);
        // Plain loops (no iterator adaptor calls), so that all of it inlines into the caller.
        let mut best = f32::NEG_INFINITY;
        let mut rest = qs;
        while rest.len() >= self.head_dim && self.head_dim > 0 {
            let (q, r) = rest.split_at(self.head_dim);
            best = best.max(lane_bound(q, mn, mx));
            rest = r;
        }
        best
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.data.len() * 4 + self.filled.len() * 2
    }

    /// Records that slot `slot` of `page` in `layer` now holds the keys `k`
    /// (`num_kv_heads × head_dim`). `page_keys(h)` gives the pool's keys of head `h` in the page
    /// (`page_size × head_dim`, already holding `k` at `slot`), read only when the summary must
    /// be recomputed.
    pub(crate) fn record<'a>(
        &mut self,
        layer: usize,
        page: PageId,
        slot: usize,
        k: &[f32],
        page_keys: impl Fn(usize) -> std::borrow::Cow<'a, [f32]>,
    ) {
        let f = layer * self.num_pages + page as usize;
        if slot != self.filled[f] as usize {
            self.recompute(layer, page, slot + 1, page_keys);
            return;
        }
        let hd = self.head_dim;
        for h in 0..self.num_kv_heads {
            let i = self.index(layer, page, h);
            let (mn, mx) = self.data[i..i + 2 * hd].split_at_mut(hd);
            let kh = &k[h * hd..(h + 1) * hd];
            if slot == 0 {
                mn.copy_from_slice(kh);
                mx.copy_from_slice(kh);
            } else {
                for ((a, b), &x) in mn.iter_mut().zip(mx.iter_mut()).zip(kh) {
                    *a = a.min(x);
                    *b = b.max(x);
                }
            }
        }
        self.filled[f] = (slot + 1) as u16;
    }

    /// Recomputes the summary of `page` in `layer` from its first `slots` slots, whose keys of
    /// head `h` are `page_keys(h)`.
    pub(crate) fn recompute<'a>(
        &mut self,
        layer: usize,
        page: PageId,
        slots: usize,
        page_keys: impl Fn(usize) -> std::borrow::Cow<'a, [f32]>,
    ) {
        let hd = self.head_dim;
        for h in 0..self.num_kv_heads {
            let i = self.index(layer, page, h);
            let (mn, mx) = self.data[i..i + 2 * hd].split_at_mut(hd);
            mn.fill(f32::INFINITY);
            mx.fill(f32::NEG_INFINITY);
            for key in page_keys(h)[..slots * hd].chunks_exact(hd) {
                for ((a, b), &x) in mn.iter_mut().zip(mx.iter_mut()).zip(key) {
                    *a = a.min(x);
                    *b = b.max(x);
                }
            }
            if slots == 0 {
                mn.fill(0.0);
                mx.fill(0.0);
            }
        }
        self.filled[layer * self.num_pages + page as usize] = slots as u16;
    }
}
