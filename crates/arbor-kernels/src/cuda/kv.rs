//! The KV pool in GPU memory: bf16, laid out as the host pool
//! (`[layer][page][k|v][kv_head][slot][head_dim]`), so the page bookkeeping of
//! [`crate::kv::KvCache`] (allocator, block tables, prefix index) drives it unchanged.

use super::{Gpu, GpuError};
use crate::kv::KvLayout;
use cudarc::driver::CudaSlice;
use half::bf16;

/// Device storage of `num_pages` KV pages of every layer.
pub struct GpuKvPool {
    pub layout: KvLayout,
    pub num_pages: usize,
    pub data: CudaSlice<bf16>,
}

impl GpuKvPool {
    /// Allocates the pool (zeroed).
    pub fn new(gpu: &Gpu, layout: KvLayout, num_pages: usize) -> Result<Self, GpuError> {
        let n = layout.num_layers * num_pages * layout.page_elems_per_layer();
        Ok(GpuKvPool {
            layout,
            num_pages,
            data: gpu.zeros::<bf16>(n, "the KV cache")?,
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
        let per_page = self.layout.page_elems_per_layer();
        let (old, layers) = (self.num_pages, self.layout.num_layers);
        let mut data = gpu.zeros::<bf16>(layers * num_pages * per_page, "the KV cache")?;
        let keep = old.min(num_pages) * per_page;
        if keep > 0 {
            for l in 0..layers {
                let (from, to) = (l * old * per_page, l * num_pages * per_page);
                let src = self.data.slice(from..from + keep);
                let mut dst = data.slice_mut(to..to + keep);
                gpu.stream().memcpy_dtod(&src, &mut dst).map_err(|e| {
                    GpuError::driver("copying the KV cache into its resized pool", e)
                })?;
            }
        }
        self.data = data;
        self.num_pages = num_pages;
        Ok(())
    }

    /// Bytes of device memory held.
    pub fn nbytes(&self) -> usize {
        self.data.len() * 2
    }
}
