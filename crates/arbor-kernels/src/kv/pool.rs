//! Storage of the KV pages.

use super::PageId;

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
}

impl KvPool {
    pub fn new(layout: KvLayout, num_pages: usize) -> Self {
        let n = layout.num_layers * num_pages * layout.page_elems_per_layer();
        KvPool {
            layout,
            num_pages,
            data: vec![0.0; n],
        }
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
        let hd = self.layout.head_dim;
        for h in 0..self.layout.num_kv_heads {
            let o = self.offset(layer, page, 0, h, slot);
            self.data[o..o + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            let o = self.offset(layer, page, 1, h, slot);
            self.data[o..o + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
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
        let l = self.layout;
        for layer in 0..l.num_layers {
            for kv in 0..2 {
                for h in 0..l.num_kv_heads {
                    let s = self.offset(layer, src, kv, h, 0);
                    let d = self.offset(layer, dst, kv, h, 0);
                    self.data.copy_within(s..s + slots * l.head_dim, d);
                }
            }
        }
    }

    /// Bytes of one page across all layers.
    pub fn page_bytes(&self) -> usize {
        self.layout.bytes_per_page(4)
    }

    /// Bytes of host memory the pool holds.
    pub fn nbytes(&self) -> usize {
        self.data.len() * 4
    }
}
