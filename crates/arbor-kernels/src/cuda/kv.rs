//! The KV pool in GPU memory: bf16, laid out `[layer][page][k|v][kv_head][slot][head_dim]`
//! (a page's heads together; the host pool is head-major), with the same page ids, so the
//! page bookkeeping of
//! [`crate::kv::KvCache`] (allocator, block tables, prefix index) drives it unchanged.
//! Beside it, the per-page key summaries of sparse attention (as [`crate::kv::KeySummaries`]:
//! per (layer, page, KV head) the per-channel min and max of the page's keys, here bf16,
//! `[layer][page][kv_head][min | max][head_dim]`), 1/page_size of the pool's size, kept up to
//! date by [`super::ops::sparse`] after every K/V store and page copy.

use super::{Gpu, GpuError};
use crate::kv::KvLayout;
use cudarc::driver::CudaSlice;
use half::bf16;

/// Device storage of `num_pages` KV pages of every layer.
pub struct GpuKvPool {
    pub layout: KvLayout,
    pub num_pages: usize,
    pub data: CudaSlice<bf16>,
    /// Key summaries (see the module documentation).
    pub summaries: CudaSlice<bf16>,
}

impl GpuKvPool {
    /// Allocates the pool (zeroed).
    pub fn new(gpu: &Gpu, layout: KvLayout, num_pages: usize) -> Result<Self, GpuError> {
        let n = layout.num_layers * num_pages * layout.page_elems_per_layer();
        let ns = layout.num_layers * num_pages * summary_elems_per_page(&layout);
        Ok(GpuKvPool {
            layout,
            num_pages,
            data: gpu.zeros::<bf16>(n, "the KV cache")?,
            summaries: gpu.zeros::<bf16>(ns, "the KV cache's key summaries")?,
        })
    }

    /// Element offset of (layer, page, k|v, head, slot) — the host pool's formula.
    pub fn offset(&self, layer: usize, page: usize, kv: usize, head: usize, slot: usize) -> usize {
        let l = &self.layout;
        ((((layer * self.num_pages + page) * 2 + kv) * l.num_kv_heads + head) * l.page_size + slot)
            * l.head_dim
    }

    /// Grows or shrinks the pool to `num_pages` pages, keeping the K/V of the pages both sizes
    /// have (one device copy per layer: a page's place depends on the page count). The new
    /// buffer is allocated before the old one is freed; on failure the pool is unchanged.
    pub fn resize(&mut self, gpu: &Gpu, num_pages: usize) -> Result<(), GpuError> {
        if num_pages == self.num_pages {
            return Ok(());
        }
        let data = self.relayout(
            gpu,
            &self.data,
            num_pages,
            self.layout.page_elems_per_layer(),
        )?;
        let per = summary_elems_per_page(&self.layout);
        let summaries = self.relayout(gpu, &self.summaries, num_pages, per)?;
        self.data = data;
        self.summaries = summaries;
        self.num_pages = num_pages;
        Ok(())
    }

    /// `buf` (`[layer][page][per_page]` over this pool's pages) copied into a new buffer over
    /// `num_pages` pages, the pages both hold kept.
    fn relayout(
        &self,
        gpu: &Gpu,
        buf: &CudaSlice<bf16>,
        num_pages: usize,
        per_page: usize,
    ) -> Result<CudaSlice<bf16>, GpuError> {
        let (old, layers) = (self.num_pages, self.layout.num_layers);
        let mut out = gpu.zeros::<bf16>(layers * num_pages * per_page, "the KV cache")?;
        let keep = old.min(num_pages) * per_page;
        if keep > 0 {
            for l in 0..layers {
                let (from, to) = (l * old * per_page, l * num_pages * per_page);
                let src = buf.slice(from..from + keep);
                let mut dst = out.slice_mut(to..to + keep);
                gpu.stream().memcpy_dtod(&src, &mut dst).map_err(|e| {
                    GpuError::driver("copying the KV cache into its resized pool", e)
                })?;
            }
        }
        Ok(out)
    }

    /// Bytes of device memory held (K/V and the key summaries).
    pub fn nbytes(&self) -> usize {
        (self.data.len() + self.summaries.len()) * 2
    }
}

/// Elements of one (layer, page)'s key summaries: min and max per KV head and channel.
pub fn summary_elems_per_page(l: &KvLayout) -> usize {
    l.num_kv_heads * 2 * l.head_dim
}
