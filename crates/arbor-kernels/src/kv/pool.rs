//! Storage of the KV pages.

use super::{KeySummaries, PageId};

/// Shape of a model's KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Token positions per page (8, 16 or 32).
    pub page_size: usize,
}

impl KvLayout {
    /// f32 elements of one page in one layer (K and V).
    pub fn page_elems_per_layer(&self) -> usize {
        2 * self.num_kv_heads * self.page_size * self.head_dim
    }
    /// Bytes of K and V for one token across all layers, at `elem_bytes` per element.
    pub fn bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_bytes
    }
    /// Bytes of one page across all layers.
    pub fn bytes_per_page(&self, elem_bytes: usize) -> usize {
        self.bytes_per_token(elem_bytes) * self.page_size
    }
}

/// Host memory for `num_pages` pages of every layer, f32.
#[derive(Debug)]
pub struct KvPool {
    pub layout: KvLayout,
    pub num_pages: usize,
    data: Vec<f32>,
    /// Per-page key min/max for sparse attention, kept in step with `data`.
    summaries: KeySummaries,
    /// The pages live on a device (see [`KvPool::detached`]): `data` is empty.
    detached: bool,
    /// Copy-on-write copies `(src, dst, slots)` a detached pool's device must still make.
    copies: Vec<(PageId, PageId, usize)>,
}

impl KvPool {
    pub fn new(layout: KvLayout, num_pages: usize) -> Self {
        let n = layout.num_layers * num_pages * layout.page_elems_per_layer();
        KvPool {
            layout,
            num_pages,
            data: vec![0.0; n],
            summaries: KeySummaries::new(&layout, num_pages),
            detached: false,
            copies: Vec::new(),
        }
    }

    /// A pool whose pages live in device memory: it holds no K/V on the host; writes are
    /// the device's business, and page copies are recorded for [`KvPool::take_copies`].
    pub fn detached(layout: KvLayout, num_pages: usize) -> Self {
        KvPool {
            layout,
            num_pages,
            data: Vec::new(),
            summaries: KeySummaries::new(&layout, 0),
            detached: true,
            copies: Vec::new(),
        }
    }

    /// Whether the pages live on a device.
    pub fn is_detached(&self) -> bool {
        self.detached
    }

    /// The page copies recorded since the last call (detached pools only), in order.
    pub fn take_copies(&mut self) -> Vec<(PageId, PageId, usize)> {
        std::mem::take(&mut self.copies)
    }

    fn offset(&self, layer: usize, page: PageId, kv: usize, head: usize, slot: usize) -> usize {
        let l = &self.layout;
        ((((layer * self.num_pages + page as usize) * 2 + kv) * l.num_kv_heads + head)
            * l.page_size
            + slot)
            * l.head_dim
    }

    /// Stores one token's K and V (`num_kv_heads × head_dim` each) at `slot` of `page`.
    pub fn write(&mut self, layer: usize, page: PageId, slot: usize, k: &[f32], v: &[f32]) {
        if self.detached {
            return;
        }
        let hd = self.layout.head_dim;
        for h in 0..self.layout.num_kv_heads {
            let o = self.offset(layer, page, 0, h, slot);
            self.data[o..o + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            let o = self.offset(layer, page, 1, h, slot);
            self.data[o..o + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
        let (k0, stride) = (
            self.offset(layer, page, 0, 0, 0),
            self.layout.page_size * hd,
        );
        let data = &self.data;
        self.summaries
            .record(layer, page, slot, k, |h| &data[k0 + h * stride..][..stride]);
    }

    /// Per-page key summaries (min/max per channel) for sparse attention.
    pub fn summaries(&self) -> &KeySummaries {
        &self.summaries
    }

    /// K vectors of `head` for every slot of `page`: `page_size × head_dim`.
    pub fn keys(&self, layer: usize, page: PageId, head: usize) -> &[f32] {
        let o = self.offset(layer, page, 0, head, 0);
        &self.data[o..o + self.layout.page_size * self.layout.head_dim]
    }

    /// V vectors of `head` for every slot of `page`: `page_size × head_dim`.
    pub fn values(&self, layer: usize, page: PageId, head: usize) -> &[f32] {
        let o = self.offset(layer, page, 1, head, 0);
        &self.data[o..o + self.layout.page_size * self.layout.head_dim]
    }

    /// Copies the first `slots` positions of page `src` into page `dst` in every layer
    /// (copy-on-write of a shared partial page).
    pub fn copy_page(&mut self, src: PageId, dst: PageId, slots: usize) {
        if self.detached {
            self.copies.push((src, dst, slots));
            return;
        }
        let l = self.layout;
        for layer in 0..l.num_layers {
            for kv in 0..2 {
                for h in 0..l.num_kv_heads {
                    let s = self.offset(layer, src, kv, h, 0);
                    let d = self.offset(layer, dst, kv, h, 0);
                    self.data.copy_within(s..s + slots * l.head_dim, d);
                }
            }
            let (k0, stride) = (self.offset(layer, dst, 0, 0, 0), l.page_size * l.head_dim);
            let data = &self.data;
            self.summaries
                .recompute(layer, dst, slots, |h| &data[k0 + h * stride..][..stride]);
        }
    }

    /// Grows or shrinks the pool to `num_pages` pages, keeping the K/V of the pages both
    /// sizes have (a layer-major copy: a page's place depends on the page count).
    pub fn resize(&mut self, num_pages: usize) {
        if !self.detached {
            let per_page = self.layout.page_elems_per_layer();
            let (layers, old) = (self.layout.num_layers, self.num_pages);
            self.data = relayout(&self.data, layers, old, num_pages, per_page);
            self.summaries.resize(num_pages);
        }
        self.num_pages = num_pages;
    }

    /// Bytes of one page across all layers.
    pub fn page_bytes(&self) -> usize {
        self.layout.bytes_per_page(4)
    }

    /// Bytes of host memory the pool holds (K/V and their key summaries).
    pub fn nbytes(&self) -> usize {
        self.data.len() * 4 + self.summaries.nbytes()
    }
}

/// `data` laid out `[layer][page][per_page]` over `old` pages, re-laid over `new` pages: the
/// first `min(old, new)` pages of every layer kept, new ones zero.
pub(crate) fn relayout<T: Copy + Default>(
    data: &[T],
    layers: usize,
    old: usize,
    new: usize,
    per_page: usize,
) -> Vec<T> {
    let mut out = vec![T::default(); layers * new * per_page];
    let keep = old.min(new) * per_page;
    for l in 0..layers {
        out[l * new * per_page..][..keep].copy_from_slice(&data[l * old * per_page..][..keep]);
    }
    out
}
