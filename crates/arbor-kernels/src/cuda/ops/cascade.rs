//! Cascade (tree) attention on the GPU (`kernels/cascade.cu`); CPU reference
//! [`crate::ops::cascade::cascade_attention`] (partials per (group, row) merged by LSE).
//!
//! Use: [`GpuCascadePlan::upload`] once per forward pass (the plan is the same for every
//! layer), then [`cascade_attention`] per layer. Two launches: `cascade_partial_h{HD}` (one
//! block per (task, KV head); a task is up to [`TASK_ROWS`] entries of one group, so a group's
//! pages are read once per task for all of its rows and all query heads of the KV head) and
//! `cascade_merge` (one block per row). Dense rows only: a plan with sparse budgets is refused.

use super::super::{Gpu, GpuError, GpuKvPool, LaunchConfig};
use super::attention::check_shapes;
use super::{int_arg, launch_error, need_len, product, row_blocks};
use crate::ops::cascade::CascadePlan;
use crate::ops::AttentionParams;
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};
use half::bf16;
use std::sync::Mutex;

/// Entries (rows of one group) per partial-kernel task (as the CPU's `ROWS_PER_TASK`).
pub const TASK_ROWS: usize = 32;

/// Query vectors per pass per `256 / head_dim` threads (`CASCADE_J` in cascade.cu).
const CASCADE_J: usize = 16;

/// Threads of a merge block.
const MERGE_THREADS: u32 = 256;

/// Rows of one group that a partial block scores per walk over the group's keys: its
/// `16 · (256 / head_dim)` query vectors over the `group` query heads of a KV head. A task of
/// more rows walks the keys once per such pass (from L2 while they still sit there), which is
/// what a count of the KV bytes the kernel loads must multiply by.
pub fn rows_per_pass(head_dim: usize, group: usize) -> usize {
    (CASCADE_J * (256 / head_dim.max(1)) / group.max(1)).max(1)
}

/// The plan's arrays, in the order they sit in [`GpuCascadePlan`]'s one buffer.
#[derive(Clone, Copy)]
enum Array {
    /// `(group, first entry, end entry)` per task.
    Tasks,
    GroupPageIndptr,
    PageIds,
    GroupFirstPage,
    GroupRows,
    RowPos,
    RowEntryIndptr,
    RowEntries,
}

/// A [`CascadePlan`] in device memory: the host-made task list and the plan's CSR arrays in
/// one buffer (one upload per step), and a partials buffer reused by every layer. Both are
/// reused by the next step's plan through [`GpuCascadePlan::upload_reusing`].
pub struct GpuCascadePlan {
    rows: usize,
    entries: usize,
    page_size: usize,
    n_tasks: usize,
    data: CudaSlice<u32>,
    /// Where each [`Array`] starts in `data`.
    starts: [usize; 8],
    /// Partial outputs and LSEs (grown on demand; fully rewritten by every call).
    scratch: Mutex<Option<(CudaSlice<f32>, CudaSlice<f32>)>>,
}

impl GpuCascadePlan {
    /// Uploads `plan` (dense rows only). Fails on a plan with sparse rows or inconsistent CSR
    /// arrays.
    pub fn upload(gpu: &Gpu, plan: &CascadePlan) -> Result<Self, GpuError> {
        Self::upload_reusing(gpu, plan, None)
    }

    /// [`GpuCascadePlan::upload`] into the buffers of `old` (an earlier step's plan) where they
    /// are big enough, so that a step of a stable tree allocates nothing.
    pub fn upload_reusing(
        gpu: &Gpu,
        plan: &CascadePlan,
        old: Option<GpuCascadePlan>,
    ) -> Result<Self, GpuError> {
        const OP: &str = "cascade plan upload";
        let invalid = |m: String| Err(GpuError::Invalid(format!("{OP}: {m}")));
        if plan.has_sparse() {
            return invalid("sparse rows are not supported on the GPU (dense rows only)".into());
        }
        let (groups, rows, entries) = (plan.num_groups(), plan.num_rows(), plan.num_entries());
        if plan.page_size == 0 {
            return invalid("page size 0".into());
        }
        let csr_ok = |ptr: &[u32], n: usize, len: usize| {
            ptr.len() == n + 1
                && ptr[0] == 0
                && ptr[n] as usize == len
                && ptr.windows(2).all(|w| w[0] <= w[1])
        };
        if !csr_ok(&plan.group_page_indptr, groups, plan.page_ids.len())
            || !csr_ok(&plan.group_row_indptr, groups, entries)
            || !csr_ok(&plan.row_entry_indptr, rows, plan.row_entries.len())
            || plan.row_budget.len() != rows
        {
            return invalid(format!(
                "inconsistent CSR arrays ({groups} groups, {rows} rows, {entries} entries)"
            ));
        }
        if plan.group_rows.iter().any(|&r| r as usize >= rows)
            || plan.row_entries.iter().any(|&e| e as usize >= entries)
        {
            return invalid(format!(
                "a row or entry index out of range ({rows} rows, {entries} entries)"
            ));
        }
        let mut tasks = Vec::new();
        for g in 0..groups {
            let e = plan.entries(g);
            for lo in e.clone().step_by(TASK_ROWS) {
                tasks.extend([g as u32, lo as u32, (lo + TASK_ROWS).min(e.end) as u32]);
            }
        }
        let arrays: [&[u32]; 8] = [
            &tasks,
            &plan.group_page_indptr,
            &plan.page_ids,
            &plan.group_first_page,
            &plan.group_rows,
            &plan.row_pos,
            &plan.row_entry_indptr,
            &plan.row_entries,
        ];
        let mut starts = [0; 8];
        let mut packed = Vec::with_capacity(arrays.iter().map(|a| a.len()).sum());
        for (start, a) in starts.iter_mut().zip(arrays) {
            *start = packed.len();
            packed.extend_from_slice(a);
        }
        let (data, scratch) = match old {
            Some(o) if o.data.len() >= packed.len() => {
                let mut data = o.data;
                gpu.upload_into(&packed, &mut data, "the cascade plan")?;
                (data, o.scratch)
            }
            Some(o) => (gpu.upload(&packed, "the cascade plan")?, o.scratch),
            None => (gpu.upload(&packed, "the cascade plan")?, Mutex::new(None)),
        };
        Ok(GpuCascadePlan {
            rows,
            entries,
            page_size: plan.page_size,
            n_tasks: tasks.len() / 3,
            data,
            starts,
            scratch,
        })
    }

    /// Device address of array `a` (the buffer's base plus its start).
    fn addr(&self, base: u64, a: Array) -> u64 {
        base + (self.starts[a as usize] * std::mem::size_of::<u32>()) as u64
    }

    /// Query rows of the plan.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// (group, row) entries of the plan.
    pub fn entries(&self) -> usize {
        self.entries
    }
}

/// Cascade attention of every row of `plan` over `layer` of `pool`: `q` is
/// `[rows × n_heads × head_dim]` f32 (rows in the plan's order), `out` the same shape in bf16.
/// Equals per-sequence [`crate::ops::paged_attention`] up to rounding. head_dim must be one of
/// [`super::attention::ATTENTION_HEAD_DIMS`], `n_kv_heads` must divide `n_heads`, and the group
/// (`n_heads / n_kv_heads`) must be at most `16 · (256 / head_dim)`.
#[allow(clippy::too_many_arguments)]
pub fn cascade_attention(
    gpu: &Gpu,
    q: &CudaSlice<f32>,
    rows: usize,
    plan: &GpuCascadePlan,
    pool: &GpuKvPool,
    layer: usize,
    p: &AttentionParams,
    out: &mut CudaSlice<bf16>,
) -> Result<(), GpuError> {
    const OP: &str = "cascade attention";
    let invalid = |m: String| Err(GpuError::Invalid(format!("{OP}: {m}")));
    check_shapes(OP, p, pool, layer, CASCADE_J)?;
    let (hd, l) = (p.head_dim, pool.layout);
    if plan.page_size != l.page_size {
        return invalid(format!(
            "the plan's page size {} differs from the pool's {}",
            plan.page_size, l.page_size
        ));
    }
    if rows != plan.rows {
        return invalid(format!("{rows} rows, but the plan has {}", plan.rows));
    }
    if rows == 0 {
        return Ok(());
    }
    let n = product(OP, "rows × heads × head_dim", rows, p.n_heads * hd)?;
    need_len(OP, "q", q.len(), n)?;
    need_len(OP, "out", out.len(), n)?;
    if p.n_kv_heads > 65535 {
        return invalid(format!("{} KV heads exceed the grid", p.n_kv_heads));
    }
    let n_lse = product(OP, "partials", plan.entries, p.n_heads)?;
    let n_o = product(OP, "partial values", n_lse, hd)?;
    let window = match p.sliding_window {
        Some(w) => int_arg(OP, "sliding window", w.max(1))?,
        None => 0,
    };
    let n_tasks = int_arg(OP, "tasks", plan.n_tasks)?;
    let layer_i = int_arg(OP, "layer", layer)?;
    let pages_i = int_arg(OP, "pages", pool.num_pages)?;
    let ps_i = int_arg(OP, "page size", l.page_size)?;
    let nh_i = int_arg(OP, "n_heads", p.n_heads)?;
    let nkv_i = int_arg(OP, "n_kv_heads", p.n_kv_heads)?;
    let ne_i = int_arg(OP, "entries", plan.entries)?;
    let rows_i = int_arg(OP, "rows", rows)?;
    let hd_i = int_arg(OP, "head_dim", hd)?;

    let mut scratch = plan
        .scratch
        .lock()
        .map_err(|_| GpuError::Invalid(format!("{OP}: the plan's scratch lock is poisoned")))?;
    let fits = matches!(&*scratch, Some((o, lse)) if o.len() >= n_o && lse.len() >= n_lse);
    if !fits {
        *scratch = Some((
            gpu.zeros::<f32>(n_o, "cascade partial outputs")?,
            gpu.zeros::<f32>(n_lse, "cascade partial LSEs")?,
        ));
    }
    let Some((part_o, part_lse)) = scratch.as_mut() else {
        return invalid("no partials buffer".into());
    };

    let (base, _guard) = plan.data.device_ptr(gpu.stream());
    let [tasks, group_page_indptr, page_ids, group_first_page, group_rows, row_pos, row_entry_indptr, row_entries] =
        [
            Array::Tasks,
            Array::GroupPageIndptr,
            Array::PageIds,
            Array::GroupFirstPage,
            Array::GroupRows,
            Array::RowPos,
            Array::RowEntryIndptr,
            Array::RowEntries,
        ]
        .map(|a| plan.addr(base, a));
    if plan.n_tasks > 0 {
        let f = gpu.func("cascade", &format!("cascade_partial_h{hd}"))?;
        let mut lb = gpu.stream().launch_builder(&f);
        lb.arg(q)
            .arg(&tasks)
            .arg(&n_tasks)
            .arg(&group_page_indptr)
            .arg(&page_ids)
            .arg(&group_first_page)
            .arg(&group_rows)
            .arg(&row_pos)
            .arg(&pool.data)
            .arg(&layer_i)
            .arg(&pages_i)
            .arg(&ps_i)
            .arg(&nh_i)
            .arg(&nkv_i)
            .arg(&ne_i)
            .arg(&p.scale)
            .arg(&window)
            .arg(&mut *part_o)
            .arg(&mut *part_lse);
        let cfg = LaunchConfig {
            grid_dim: (plan.n_tasks as u32, p.n_kv_heads as u32, 1),
            block_dim: ((hd * (256 / hd)) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel; the plan's CSR arrays were checked at upload,
        // buffer lengths above, and the kernel skips page ids beyond the pool.
        unsafe { lb.launch(cfg) }.map_err(launch_error(OP))?;
    }

    let f = gpu.func("cascade", "cascade_merge")?;
    let mut lb = gpu.stream().launch_builder(&f);
    lb.arg(&*part_o)
        .arg(&*part_lse)
        .arg(&row_entry_indptr)
        .arg(&row_entries)
        .arg(&rows_i)
        .arg(&nh_i)
        .arg(&nkv_i)
        .arg(&hd_i)
        .arg(&ne_i)
        .arg(&mut *out);
    let cfg = row_blocks(rows, MERGE_THREADS);
    // SAFETY: as for the partial launch; every partial a row's entries name was written by it.
    unsafe { lb.launch(cfg) }.map_err(launch_error(OP))?;
    Ok(())
}
