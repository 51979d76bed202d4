//! KV pool utilities on the GPU (`kernels/kv.cu`): copy-on-write page copies (CPU reference
//! [`crate::kv::KvPool::copy_page`]) and f32 ↔ bf16 casts.

use super::super::{Gpu, GpuError, GpuKvPool};
use super::activation::grid_stride;
use super::{int_arg, launch_error, need_len, product};
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

/// For each `(src, dst, slots)`, copies the first `slots` positions of page `src` to page
/// `dst` in every layer, K and V, every KV head (copy-on-write of a shared partial page), and
/// recomputes `dst`'s key summaries.
/// The copies run concurrently, so no page may be both a source and a destination, nor the
/// destination of two copies; pages must lie in the pool and `slots ≤ page_size`.
pub fn copy_pages(
    gpu: &Gpu,
    pool: &mut GpuKvPool,
    copies: &[(u32, u32, u32)],
) -> Result<(), GpuError> {
    const OP: &str = "copy_pages";
    let l = pool.layout;
    let invalid = |m: String| Err(GpuError::Invalid(format!("{OP}: {m}")));
    let mut dsts = std::collections::HashSet::new();
    for (i, &(src, dst, slots)) in copies.iter().enumerate() {
        if src as usize >= pool.num_pages || dst as usize >= pool.num_pages {
            return invalid(format!(
                "copy {i} ({src} → {dst}) names a page beyond the pool's {}",
                pool.num_pages
            ));
        }
        if slots as usize > l.page_size {
            return invalid(format!(
                "copy {i} copies {slots} slots of {}-slot pages",
                l.page_size
            ));
        }
        if !dsts.insert(dst) {
            return invalid(format!("page {dst} is the destination of two copies"));
        }
    }
    if let Some(&(src, _, _)) = copies.iter().find(|c| dsts.contains(&c.0)) {
        return invalid(format!("page {src} is both a source and a destination"));
    }
    let per_copy = product(
        OP,
        "layers × 2 × kv heads",
        l.num_layers * 2,
        l.num_kv_heads,
    )?;
    let blocks = product(OP, "blocks", copies.len(), per_copy)?;
    if blocks == 0 || l.head_dim == 0 {
        return Ok(());
    }
    if blocks > i32::MAX as usize {
        return invalid(format!(
            "{} copies need {blocks} blocks, too many for one launch",
            copies.len()
        ));
    }
    let flat: Vec<u32> = copies.iter().flat_map(|&(s, d, n)| [s, d, n]).collect();
    let dev = gpu.upload(&flat, "the page copy list")?;
    let n = int_arg(OP, "copies", copies.len())?;
    let dims = [
        int_arg(OP, "layers", l.num_layers)?,
        int_arg(OP, "pages", pool.num_pages)?,
        int_arg(OP, "kv heads", l.num_kv_heads)?,
        int_arg(OP, "page size", l.page_size)?,
        int_arg(OP, "head dim", l.head_dim)?,
    ];
    let f = gpu.func("kv", "copy_pages")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&dev).arg(&n).arg(&mut pool.data);
    for d in &dims {
        b.arg(d);
    }
    // SAFETY: arguments match the kernel; every page and slot count was checked above, so
    // every offset lies inside the pool.
    unsafe {
        b.launch(super::super::LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map_err(launch_error(OP))?;
    // The copies' key summaries, for sparse attention.
    let pages: Vec<(u32, u32)> = copies.iter().map(|&(_, d, n)| (d, n)).collect();
    super::sparse::summarise_pages(gpu, pool, &pages)
}

/// `out[i] = bf16(x[i])` (round to nearest even) for `i < n`.
pub fn cast_f32_to_bf16(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    n: usize,
    out: &mut CudaSlice<bf16>,
) -> Result<(), GpuError> {
    const OP: &str = "cast_f32_to_bf16";
    need_len(OP, "x", x.len(), n)?;
    need_len(OP, "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let f = gpu.func("kv", "cast_f32_to_bf16")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(out).arg(&n64);
    // SAFETY: arguments match the kernel; lengths checked above.
    unsafe { b.launch(grid_stride(n)) }.map_err(launch_error(OP))?;
    Ok(())
}

/// `out[i] = f32(x[i])` (exact) for `i < n`.
pub fn cast_bf16_to_f32(
    gpu: &Gpu,
    x: &CudaSlice<bf16>,
    n: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    const OP: &str = "cast_bf16_to_f32";
    need_len(OP, "x", x.len(), n)?;
    need_len(OP, "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let n64 = n as u64;
    let f = gpu.func("kv", "cast_bf16_to_f32")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(out).arg(&n64);
    // SAFETY: arguments match the kernel; lengths checked above.
    unsafe { b.launch(grid_stride(n)) }.map_err(launch_error(OP))?;
    Ok(())
}
