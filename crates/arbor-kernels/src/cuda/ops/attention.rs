//! Paged causal GQA attention on the GPU (`kernels/attention.cu`); CPU reference
//! [`crate::ops::paged_attention`], one call per sequence there, one call per batch here.
//!
//! Kernel choice (per sequence, made on the device from `seq_row_indptr`): a sequence with
//! fewer than [`PREFILL_MIN_ROWS`] rows in the batch (decode, a few tree branches) goes through
//! the decode kernel — one block per (row, KV head), the context split across the block's
//! warps; a sequence with more (a prompt or prompt chunk) through the prefill kernel — one
//! block per (tile of consecutive rows, KV head), each 32-key block of K/V staged in shared
//! memory once per tile. The host only decides which kernels to launch: the prefill kernel
//! when `max_rows_per_seq ≥ PREFILL_MIN_ROWS`, the decode kernel always (its blocks for rows
//! of prefill sequences exit at once).

use super::super::{Gpu, GpuError, GpuKvPool, LaunchConfig};
use super::{int_arg, launch_error, need_len, product};
use crate::ops::AttentionParams;
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};
use half::bf16;

/// Head dims with compiled kernels (the `HEAD_DIM(..)` list of attention.cu).
pub const ATTENTION_HEAD_DIMS: &[usize] = &[16, 32, 64, 96, 128, 256];

/// Sequences with at least this many rows in a batch use the prefill kernel.
pub const PREFILL_MIN_ROWS: usize = 8;

/// Query vectors (rows × heads of a group) per prefill tile per 256/head_dim threads
/// (`PREFILL_J` in attention.cu).
const PREFILL_J: usize = 16;

/// Most warps of a decode block (`DEC_MAX_WARPS` in attention.cu).
const DECODE_MAX_WARPS: usize = 8;

/// Device description of one attention batch (FlashInfer style). Rows of one sequence are
/// contiguous: sequence `s` owns rows `seq_row_indptr[s]..seq_row_indptr[s + 1]`, and
/// `row_seq[r] = s` for each of them; its pages are
/// `page_indices[page_indptr[s]..page_indptr[s + 1]]`, in position order (position `p` in page
/// `p / page_size`, slot `p % page_size`). Pages may be shared between sequences.
///
/// The arrays are whole device buffers (`M = CudaSlice<u32>`) or views into one
/// (`M = CudaView<u32>`, e.g. sections of a step's packed metadata). A row whose `row_seq` is
/// `seqs` or more (a padding row) gets zeros; sequences may own no rows and no pages.
pub struct AttentionBatch<'a, M: DevicePtr<u32> = CudaSlice<u32>> {
    /// Absolute position of each row; the row's own K/V must already be in the pool.
    pub positions: &'a M,
    /// Sequence index of each row.
    pub row_seq: &'a M,
    /// `seqs + 1` row offsets.
    pub seq_row_indptr: &'a M,
    /// `seqs + 1` offsets into `page_indices`.
    pub page_indptr: &'a M,
    /// Page ids of every sequence, concatenated (a longer buffer is fine: the kernels read
    /// only the ranges `page_indptr` gives, clamped to this length).
    pub page_indices: &'a M,
    /// Sequences in the batch.
    pub seqs: usize,
    /// Most rows of one sequence (an upper bound is fine; it sizes the prefill grid and picks
    /// the kernels, a low value only costs speed).
    pub max_rows_per_seq: usize,
    /// Most positions one row attends (an upper bound is fine; it sizes decode blocks, and
    /// `usize::MAX` gives every decode block the most warps, a launch shape that does not
    /// change from step to step, as CUDA graphs need). The result does not depend on it.
    pub max_context: usize,
}

// By hand: a derive would ask `M: Copy`, which a `CudaSlice` is not.
impl<M: DevicePtr<u32>> Clone for AttentionBatch<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M: DevicePtr<u32>> Copy for AttentionBatch<'_, M> {}

/// Checks shared by the paged and cascade attention wrappers (`op` names the caller): GQA
/// grouping, a compiled head dim, a group that fits `per_thread · (256 / head_dim)` query
/// vectors per block, agreement with the pool, and the layer. Returns the group size.
pub(super) fn check_shapes(
    op: &str,
    p: &AttentionParams,
    pool: &GpuKvPool,
    layer: usize,
    per_thread: usize,
) -> Result<usize, GpuError> {
    let invalid = |m: String| Err(GpuError::Invalid(format!("{op}: {m}")));
    let (hd, l) = (p.head_dim, pool.layout);
    if p.n_kv_heads == 0 || !p.n_heads.is_multiple_of(p.n_kv_heads) {
        return invalid(format!(
            "{} query heads cannot share {} KV heads",
            p.n_heads, p.n_kv_heads
        ));
    }
    if !ATTENTION_HEAD_DIMS.contains(&hd) {
        return invalid(format!(
            "head_dim {hd} is not supported (compiled: {ATTENTION_HEAD_DIMS:?})"
        ));
    }
    let group = p.n_heads / p.n_kv_heads;
    let per_block = per_thread * (256 / hd);
    if group > per_block {
        return invalid(format!(
            "{group} query heads per KV head exceed the {per_block} a block holds at head_dim {hd}"
        ));
    }
    if p.n_kv_heads != l.num_kv_heads || hd != l.head_dim {
        return invalid(format!(
            "{} KV heads × {hd} dims, but the pool holds {} × {}",
            p.n_kv_heads, l.num_kv_heads, l.head_dim
        ));
    }
    if layer >= l.num_layers {
        return invalid(format!("layer {layer} of a {}-layer pool", l.num_layers));
    }
    Ok(group)
}

/// `out = softmax(q·kᵀ·scale) · v` per row and query head over the row's causal context (or
/// sliding window) in `layer` of `pool`; `q` is `[rows × n_heads × head_dim]` f32, `out` the
/// same shape in bf16. head_dim must be one of [`ATTENTION_HEAD_DIMS`], `n_kv_heads` must divide
/// `n_heads`, and the group (`n_heads / n_kv_heads`) must be at most `16 · (256 / head_dim)`.
/// Device data is not read back: a page id beyond the pool is skipped and a position beyond
/// its sequence's pages attends only what the pages hold.
#[allow(clippy::too_many_arguments)]
pub fn attention<M: DevicePtr<u32>>(
    gpu: &Gpu,
    q: &CudaSlice<f32>,
    rows: usize,
    b: &AttentionBatch<M>,
    pool: &GpuKvPool,
    layer: usize,
    p: &AttentionParams,
    out: &mut CudaSlice<bf16>,
) -> Result<(), GpuError> {
    const OP: &str = "attention";
    let invalid = |m: String| Err(GpuError::Invalid(format!("{OP}: {m}")));
    let group = check_shapes(OP, p, pool, layer, PREFILL_J)?;
    let (hd, l) = (p.head_dim, pool.layout);
    if l.page_size == 0 {
        return invalid("the pool's page size is 0".into());
    }
    if rows == 0 {
        return Ok(());
    }
    if b.seqs == 0 {
        return invalid(format!("{rows} rows but no sequences"));
    }
    let n = product(OP, "rows × heads × head_dim", rows, p.n_heads * hd)?;
    need_len(OP, "q", q.len(), n)?;
    need_len(OP, "out", out.len(), n)?;
    need_len(OP, "positions", b.positions.len(), rows)?;
    need_len(OP, "row_seq", b.row_seq.len(), rows)?;
    need_len(OP, "seq_row_indptr", b.seq_row_indptr.len(), b.seqs + 1)?;
    need_len(OP, "page_indptr", b.page_indptr.len(), b.seqs + 1)?;
    if p.n_kv_heads > 65535 {
        return invalid(format!("{} KV heads exceed the grid", p.n_kv_heads));
    }

    let window = match p.sliding_window {
        Some(w) => int_arg(OP, "sliding window", w.max(1))?,
        None => 0,
    };
    let ints = [
        int_arg(OP, "page_indices", b.page_indices.len())?,
        int_arg(OP, "layer", layer)?,
        int_arg(OP, "pages", pool.num_pages)?,
        int_arg(OP, "page size", l.page_size)?,
        int_arg(OP, "n_heads", p.n_heads)?,
        int_arg(OP, "n_kv_heads", p.n_kv_heads)?,
    ];
    let rows_i = int_arg(OP, "rows", rows)?;
    let seqs_i = int_arg(OP, "seqs", b.seqs)?;
    let prefill = b.max_rows_per_seq >= PREFILL_MIN_ROWS;
    // Sequences with at least `split` rows are the prefill kernel's.
    let split: u32 = if prefill {
        PREFILL_MIN_ROWS as u32
    } else {
        u32::MAX
    };

    // Decode: query heads of a group in blocks of G ∈ {1, 2, 4, 8}.
    let g = [1, 2, 4, 8].into_iter().find(|&g| g >= group).unwrap_or(8);
    let warps = b.max_context.div_ceil(32).clamp(1, DECODE_MAX_WARPS);
    let stream = gpu.stream();
    // Raw pointers of the layout arrays (buffers or views alike); the guards outlive both
    // launches.
    let (pos_p, _g0) = b.positions.device_ptr(stream);
    let (seq_p, _g1) = b.row_seq.device_ptr(stream);
    let (rowptr_p, _g2) = b.seq_row_indptr.device_ptr(stream);
    let (pageptr_p, _g3) = b.page_indptr.device_ptr(stream);
    let (pages_p, _g4) = b.page_indices.device_ptr(stream);
    let f = gpu.func("attention", &format!("attn_decode_h{hd}_g{g}"))?;
    let mut lb = stream.launch_builder(&f);
    lb.arg(q)
        .arg(&mut *out)
        .arg(&pos_p)
        .arg(&seq_p)
        .arg(&rowptr_p)
        .arg(&pageptr_p)
        .arg(&pages_p);
    lb.arg(&ints[0]).arg(&pool.data);
    for i in &ints[1..] {
        lb.arg(i);
    }
    lb.arg(&rows_i)
        .arg(&seqs_i)
        .arg(&p.scale)
        .arg(&window)
        .arg(&split);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, p.n_kv_heads as u32, group.div_ceil(g) as u32),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match the kernel; host-side lengths are checked above and the kernel
    // bounds every device-side index (sequences, page ranges, page ids).
    unsafe { lb.launch(cfg) }.map_err(launch_error(OP))?;

    if prefill {
        let tile_rows = PREFILL_J * (256 / hd) / group;
        let tiles_per_seq = b.max_rows_per_seq.div_ceil(tile_rows);
        let blocks = product(OP, "prefill blocks", b.seqs, tiles_per_seq)?;
        if blocks > i32::MAX as usize {
            return invalid(format!("{blocks} prefill blocks exceed the grid"));
        }
        let (tps_i, tile_rows_i) = (
            int_arg(OP, "tiles per sequence", tiles_per_seq)?,
            int_arg(OP, "tile rows", tile_rows)?,
        );
        let f = gpu.func("attention", &format!("attn_prefill_h{hd}"))?;
        let mut lb = stream.launch_builder(&f);
        lb.arg(q)
            .arg(&mut *out)
            .arg(&pos_p)
            .arg(&rowptr_p)
            .arg(&pageptr_p)
            .arg(&pages_p)
            .arg(&ints[0])
            .arg(&pool.data);
        for i in &ints[1..] {
            lb.arg(i);
        }
        lb.arg(&seqs_i)
            .arg(&tps_i)
            .arg(&tile_rows_i)
            .arg(&p.scale)
            .arg(&window)
            .arg(&split);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, p.n_kv_heads as u32, 1),
            block_dim: ((hd * (256 / hd)) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as for the decode launch.
        unsafe { lb.launch(cfg) }.map_err(launch_error(OP))?;
    }
    Ok(())
}
