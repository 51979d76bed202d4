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

    /// Bytes of device memory held.
    pub fn nbytes(&self) -> usize {
        self.data.len() * 2
    }
}
