//! The attention input stage on the GPU (`kernels/qkv.cu`), fused per row: bias, per-head
//! q/k RMSNorm, RoPE, q out as f32, k and v stored as bf16 into the KV pool. CPU reference:
//! the same steps in `arbor-runtime`'s decoder layer ([`crate::ops::rms_norm_rows`],
//! [`crate::ops::RopeTable::apply`], [`crate::kv::KvPool::write`]).

use super::super::{Gpu, GpuError, GpuKvPool};
use super::{int_arg, launch_error, need_len, product, row_blocks};
use crate::ops::RopeLayout;
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};

/// The largest head_dim the kernel takes (`QKV_MAX_HEAD_DIM` in qkv.cu).
pub const QKV_MAX_HEAD_DIM: usize = 256;

/// Shapes and options of [`qkv_rope_store`].
#[derive(Clone, Copy, Debug)]
pub struct QkvParams {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (the pool's).
    pub n_kv_heads: usize,
    /// Dimensions per head (≤ [`QKV_MAX_HEAD_DIM`]).
    pub head_dim: usize,
    /// Rotated dimensions per head; as on the CPU, `min(rot_dim, head_dim) / 2` pairs turn.
    pub rot_dim: usize,
    /// Which dimensions pair up.
    pub layout: RopeLayout,
    /// RMSNorm epsilon of the q/k norms.
    pub eps: f32,
}

/// Device weights of [`qkv_rope_store`].
#[derive(Clone, Copy)]
pub struct QkvWeights<'a> {
    /// Added to each row before anything else: `(n_heads + 2·n_kv_heads)·head_dim` values.
    pub bias: Option<&'a CudaSlice<f32>>,
    /// Per-head RMSNorm weights of q (head_dim values, Qwen3).
    pub q_norm: Option<&'a CudaSlice<f32>>,
    /// Per-head RMSNorm weights of k (head_dim values).
    pub k_norm: Option<&'a CudaSlice<f32>>,
    /// The RoPE table's inverse frequencies ([`crate::ops::RopeTable::inv_freq`]), at least
    /// `min(rot_dim, head_dim) / 2` values.
    pub inv_freq: &'a CudaSlice<f32>,
}

/// For each of the first `rows` rows of `qkv` (`[rows × (n_heads + 2·n_kv_heads)·head_dim]`
/// f32, q then k then v): adds the bias, RMS-normalises each q and k head, rotates q and k by
/// the row's position (`positions[row]`), writes q to `q_out` (`[rows × n_heads·head_dim]`)
/// and stores k and v as bf16 into `pool` (`layer`) at slot `slot_mapping[row]`
/// (`= page · page_size + slot_in_page`). A slot mapping at or beyond `num_pages · page_size`
/// (e.g. `u32::MAX` for a padding row) skips the store; q is still written. `positions` and
/// `slot_mapping` are whole buffers or views of one (e.g. of a step's packed metadata).
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_store<P: DevicePtr<u32>, S: DevicePtr<u32>>(
    gpu: &Gpu,
    qkv: &CudaSlice<f32>,
    rows: usize,
    p: &QkvParams,
    w: &QkvWeights,
    positions: &P,
    slot_mapping: &S,
    pool: &mut GpuKvPool,
    layer: usize,
    q_out: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    const OP: &str = "qkv_rope_store";
    let invalid = |m: String| Err(GpuError::Invalid(format!("{OP}: {m}")));
    let l = pool.layout;
    if p.n_kv_heads != l.num_kv_heads || p.head_dim != l.head_dim {
        return invalid(format!(
            "{} KV heads × {} dims, but the pool holds {} × {}",
            p.n_kv_heads, p.head_dim, l.num_kv_heads, l.head_dim
        ));
    }
    if p.head_dim == 0 || p.head_dim > QKV_MAX_HEAD_DIM {
        return invalid(format!(
            "head_dim {} is not in 1..={QKV_MAX_HEAD_DIM}",
            p.head_dim
        ));
    }
    if layer >= l.num_layers {
        return invalid(format!("layer {layer} of a {}-layer pool", l.num_layers));
    }
    if l.page_size == 0 {
        return invalid("the pool's page size is 0".into());
    }
    if rows == 0 {
        return Ok(());
    }
    let heads = p.n_heads + 2 * p.n_kv_heads;
    let width = product(OP, "row width", heads, p.head_dim)?;
    need_len(
        OP,
        "qkv",
        qkv.len(),
        product(OP, "rows × width", rows, width)?,
    )?;
    let qd = p.n_heads * p.head_dim;
    need_len(
        OP,
        "q_out",
        q_out.len(),
        product(OP, "rows × q width", rows, qd)?,
    )?;
    need_len(OP, "positions", positions.len(), rows)?;
    need_len(OP, "slot_mapping", slot_mapping.len(), rows)?;
    let rot_half = p.rot_dim.min(p.head_dim) / 2;
    need_len(OP, "inv_freq", w.inv_freq.len(), rot_half)?;
    if let Some(b) = w.bias {
        need_len(OP, "bias", b.len(), width)?;
    }
    for (name, n) in [("q_norm", w.q_norm), ("k_norm", w.k_norm)] {
        if let Some(n) = n {
            need_len(OP, name, n.len(), p.head_dim)?;
        }
    }
    let ints = [
        int_arg(OP, "rows", rows)?,
        int_arg(OP, "n_heads", p.n_heads)?,
        int_arg(OP, "n_kv_heads", p.n_kv_heads)?,
        int_arg(OP, "head_dim", p.head_dim)?,
        int_arg(OP, "rot_dim / 2", rot_half)?,
        i32::from(p.layout == RopeLayout::Interleaved),
    ];
    let (layer_i, pages_i, page_size_i) = (
        int_arg(OP, "layer", layer)?,
        int_arg(OP, "pages", pool.num_pages)?,
        int_arg(OP, "page size", l.page_size)?,
    );
    // Absent weights: a flag of 0 and any valid pointer (never read).
    let flag = |o: Option<&CudaSlice<f32>>| i32::from(o.is_some());
    let (has_bias, has_qn, has_kn) = (flag(w.bias), flag(w.q_norm), flag(w.k_norm));
    let f = gpu.func("qkv", "qkv_rope_store")?;
    let stream = gpu.stream();
    let (pos_p, _pos_guard) = positions.device_ptr(stream);
    let (slot_p, _slot_guard) = slot_mapping.device_ptr(stream);
    let mut b = stream.launch_builder(&f);
    b.arg(qkv);
    for i in &ints {
        b.arg(i);
    }
    b.arg(&p.eps)
        .arg(w.bias.unwrap_or(w.inv_freq))
        .arg(&has_bias)
        .arg(w.q_norm.unwrap_or(w.inv_freq))
        .arg(&has_qn)
        .arg(w.k_norm.unwrap_or(w.inv_freq))
        .arg(&has_kn)
        .arg(w.inv_freq)
        .arg(&pos_p)
        .arg(&slot_p)
        .arg(&mut pool.data)
        .arg(&layer_i)
        .arg(&pages_i)
        .arg(&page_size_i)
        .arg(q_out);
    // SAFETY: arguments match the kernel; buffer lengths, the layer and the pool shape are
    // checked above, and the kernel skips stores to slots beyond the pool.
    unsafe { b.launch(row_blocks(rows, 256)) }.map_err(launch_error(OP))?;
    Ok(())
}
