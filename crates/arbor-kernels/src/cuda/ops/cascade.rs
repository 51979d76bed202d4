//! Cascade (tree) attention on the GPU (`kernels/cascade.cu`); CPU reference
//! [`crate::ops::cascade::cascade_attention`] (partials per (group, row) merged by LSE).
//!
//! Use: [`GpuCascadePlan::upload`] once per forward pass (the plan is the same for every
//! layer), then [`cascade_attention`] per layer. Two launches: `cascade_partial_h{HD}` (one
//! block per (task, KV head); a task is up to [`TASK_ROWS`] entries of one group, so a group's
//! pages are read once per task for all of its rows and all query heads of the KV head) and
//! `cascade_merge` (one block per row). Sparse rows: [`cascade_attention`] takes the page marks
//! that [`super::sparse::GpuSparsePlan::select`] leaves for the layer, and each (group, KV head)
//! reads only its marked pages.
//!
//! CUDA graphs: a plan's arrays sit at capacity-sized places in its buffer ([`PlanLayout`]),
//! the partial kernel reads the task count from the buffer and gets a block per task the
//! capacity holds, and rows may be padded; so every plan of one [`GpuCascadePlan::epoch`]
//! launches alike and a captured decode step replays for a tree whose shape moves.

use super::super::{Gpu, GpuError, GpuKvPool, LaunchConfig};
use super::attention::check_shapes;
use super::{int_arg, launch_error, need_len, product, row_blocks};
use crate::ops::cascade::CascadePlan;
use crate::ops::AttentionParams;
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};
use half::bf16;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// `[n_tasks]`: the kernel reads the task count here, not from a launch argument.
    Header,
    /// `(group, first entry, end entry)` per task.
    Tasks,
    GroupPageIndptr,
    PageIds,
    GroupFirstPage,
    GroupRows,
    RowPos,
    /// Padded to the plan's (padded) rows + 1 with its last value: padding rows have none.
    RowEntryIndptr,
    RowEntries,
}

const ARRAYS: usize = 9;

/// Where the plan's arrays sit in its buffer. Each array has a capacity, a power of two at
/// least its length that never shrinks while the buffer is reused, so that a tree whose shape
/// changes from step to step keeps its arrays at the same addresses: a CUDA graph captured
/// with them stays valid (the counts it needs are read from device memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanLayout {
    caps: [usize; ARRAYS],
}

impl PlanLayout {
    /// The layout for arrays of `lens` (in [`Array`] order): each capacity the next power of
    /// two that holds its array, and at least `old`'s.
    fn fit(lens: [usize; ARRAYS], old: Option<&PlanLayout>) -> PlanLayout {
        let mut caps = lens.map(|n| n.max(1).next_power_of_two());
        if let Some(o) = old {
            for (c, &oc) in caps.iter_mut().zip(&o.caps) {
                *c = (*c).max(oc);
            }
        }
        PlanLayout { caps }
    }

    /// Where array `a` starts (in `u32`s).
    fn start(&self, a: Array) -> usize {
        self.caps[..a as usize].iter().sum()
    }

    /// `u32`s the buffer needs.
    fn len(&self) -> usize {
        self.caps.iter().sum()
    }

    /// Blocks along x of the partial kernel: every task the capacity holds.
    fn task_blocks(&self) -> usize {
        (self.caps[Array::Tasks as usize] / 3).max(1)
    }

    /// Entries per KV head in the partials buffers.
    fn entry_stride(&self) -> usize {
        self.caps[Array::GroupRows as usize]
    }
}

/// A [`CascadePlan`] in device memory: the host-made task list and the plan's CSR arrays in
/// one buffer laid out by a [`PlanLayout`] (one upload per step), and a partials buffer reused
/// by every layer. Both are reused by the next step's plan through
/// [`GpuCascadePlan::upload_reusing`]; while they are, the launches of [`cascade_attention`]
/// take the same arguments (see [`GpuCascadePlan::epoch`]).
pub struct GpuCascadePlan {
    /// Query rows, padding rows included.
    rows: usize,
    entries: usize,
    /// Group pages (the plan's `page_ids`): with the KV heads, the length of a marks array.
    pages_read: usize,
    page_size: usize,
    data: CudaSlice<u32>,
    layout: PlanLayout,
    epoch: u64,
    /// Partial outputs and LSEs (grown on demand; fully rewritten by every call).
    scratch: Mutex<Option<(CudaSlice<f32>, CudaSlice<f32>)>>,
}

impl GpuCascadePlan {
    /// Uploads `plan`. Fails on inconsistent CSR arrays.
    pub fn upload(gpu: &Gpu, plan: &CascadePlan) -> Result<Self, GpuError> {
        Self::upload_reusing(gpu, plan, plan.num_rows(), None)
    }

    /// [`GpuCascadePlan::upload`] into the buffers of `old` (an earlier step's plan) where they
    /// are big enough, so that a step of a stable tree allocates nothing, with the rows padded
    /// to `pad_rows` (≥ the plan's): padding rows read nothing and come out as zeros.
    pub fn upload_reusing(
        gpu: &Gpu,
        plan: &CascadePlan,
        pad_rows: usize,
        old: Option<GpuCascadePlan>,
    ) -> Result<Self, GpuError> {
        const OP: &str = "cascade plan upload";
        let invalid = |m: String| Err(GpuError::Invalid(format!("{OP}: {m}")));
        let (groups, rows, entries) = (plan.num_groups(), plan.num_rows(), plan.num_entries());
        if plan.page_size == 0 {
            return invalid("page size 0".into());
        }
        if pad_rows < rows {
            return invalid(format!("{rows} rows do not fit {pad_rows} padded rows"));
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
        let (packed, layout) = pack(plan, pad_rows, old.as_ref().map(|o| &o.layout));
        let (data, scratch, epoch) = match old {
            Some(o) if o.layout == layout => {
                let mut data = o.data;
                gpu.upload_into(&packed, &mut data, "the cascade plan")?;
                (data, o.scratch, o.epoch)
            }
            Some(o) => (
                gpu.upload(&packed, "the cascade plan")?,
                o.scratch,
                next_epoch(),
            ),
            None => (
                gpu.upload(&packed, "the cascade plan")?,
                Mutex::new(None),
                next_epoch(),
            ),
        };
        Ok(GpuCascadePlan {
            rows: pad_rows,
            entries,
            pages_read: plan.page_ids.len(),
            page_size: plan.page_size,
            data,
            layout,
            epoch,
            scratch,
        })
    }

    /// Device address of array `a` (the buffer's base plus its start).
    fn addr(&self, base: u64, a: Array) -> u64 {
        base + (self.layout.start(a) * std::mem::size_of::<u32>()) as u64
    }

    /// Query rows of the plan, padding rows included.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// (group, row) entries of the plan.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Changes whenever the plan's buffer or layout does. Two plans of one epoch make
    /// [`cascade_attention`] launch the same kernels with the same arguments (for the same
    /// rows, pool, layer and buffers), so a CUDA graph captured with one replays the other
    /// once its data is uploaded. The partials buffer is allocated by the first call of an
    /// epoch: run one eagerly before capturing.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// A fresh [`GpuCascadePlan::epoch`] (or [`super::sparse::GpuSparsePlan::epoch`]).
pub(super) fn next_epoch() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The buffer of a checked `plan` with rows padded to `pad_rows`: the task list (runs of at
/// most [`TASK_ROWS`] entries of one group) and the CSR arrays, each at its place in a layout
/// that holds `old`'s.
fn pack(plan: &CascadePlan, pad_rows: usize, old: Option<&PlanLayout>) -> (Vec<u32>, PlanLayout) {
    let mut tasks = Vec::new();
    for g in 0..plan.num_groups() {
        let e = plan.entries(g);
        for lo in e.clone().step_by(TASK_ROWS) {
            tasks.extend([g as u32, lo as u32, (lo + TASK_ROWS).min(e.end) as u32]);
        }
    }
    let mut row_entry_indptr = plan.row_entry_indptr.clone();
    row_entry_indptr.resize(pad_rows + 1, plan.row_entries.len() as u32);
    let header = [(tasks.len() / 3) as u32];
    let arrays: [&[u32]; ARRAYS] = [
        &header,
        &tasks,
        &plan.group_page_indptr,
        &plan.page_ids,
        &plan.group_first_page,
        &plan.group_rows,
        &plan.row_pos,
        &row_entry_indptr,
        &plan.row_entries,
    ];
    let layout = PlanLayout::fit(arrays.map(<[u32]>::len), old);
    let mut packed = vec![0u32; layout.len()];
    let mut at = 0;
    for (a, cap) in arrays.iter().zip(layout.caps) {
        packed[at..at + a.len()].copy_from_slice(a);
        at += cap;
    }
    (packed, layout)
}

/// Cascade attention of every row of `plan` over `layer` of `pool`: `q` is
/// `[rows × n_heads × head_dim]` f32 (rows in the plan's order), `out` the same shape in bf16.
/// Equals per-sequence [`crate::ops::paged_attention`] up to rounding; with `marks` (one byte
/// per group page and KV head, laid out as [`crate::ops::cascade::mark_index`]) each (group,
/// KV head) reads only its marked pages, as the CPU's sparse selection. head_dim must be one of
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
    marks: Option<&CudaSlice<u8>>,
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
    let stride = plan.layout.entry_stride();
    let n_lse = product(OP, "partials", stride, p.n_heads)?;
    let n_o = product(OP, "partial values", n_lse, hd)?;
    let window = match p.sliding_window {
        Some(w) => int_arg(OP, "sliding window", w.max(1))?,
        None => 0,
    };
    let layer_i = int_arg(OP, "layer", layer)?;
    let pages_i = int_arg(OP, "pages", pool.num_pages)?;
    let ps_i = int_arg(OP, "page size", l.page_size)?;
    let nh_i = int_arg(OP, "n_heads", p.n_heads)?;
    let nkv_i = int_arg(OP, "n_kv_heads", p.n_kv_heads)?;
    let stride_i = int_arg(OP, "entry stride", stride)?;
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

    if let Some(m) = marks {
        let need = product(OP, "marks", plan.pages_read, p.n_kv_heads)?;
        need_len(OP, "marks", m.len(), need)?;
    }
    let marks_guard = marks.map(|m| m.device_ptr(gpu.stream()));
    let marks_addr: u64 = marks_guard.as_ref().map_or(0, |g| g.0);
    let (base, _guard) = plan.data.device_ptr(gpu.stream());
    let [header, tasks, group_page_indptr, page_ids, group_first_page, group_rows, row_pos, row_entry_indptr, row_entries] =
        [
            Array::Header,
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
    // Every task the layout holds gets a block (those beyond the header's count return), so
    // the launch is the same for every plan of the epoch.
    let task_blocks = u32::try_from(plan.layout.task_blocks())
        .map_err(|_| GpuError::Invalid(format!("{OP}: too many tasks for the grid")))?;
    {
        let f = gpu.func("cascade", &format!("cascade_partial_h{hd}"))?;
        let mut lb = gpu.stream().launch_builder(&f);
        lb.arg(q)
            .arg(&header)
            .arg(&tasks)
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
            .arg(&stride_i)
            .arg(&p.scale)
            .arg(&window)
            .arg(&marks_addr)
            .arg(&mut *part_o)
            .arg(&mut *part_lse);
        let cfg = LaunchConfig {
            grid_dim: (task_blocks, p.n_kv_heads as u32, 1),
            block_dim: ((hd * (256 / hd)) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel; the plan's CSR arrays were checked at upload,
        // buffer lengths (the marks' too) above, and the kernel skips page ids beyond the pool.
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
        .arg(&stride_i)
        .arg(&mut *out);
    let cfg = row_blocks(rows, MERGE_THREADS);
    // SAFETY: as for the partial launch; every partial a row's entries name was written by it.
    unsafe { lb.launch(cfg) }.map_err(launch_error(OP))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cascade::{PlanOptions, PlanSeq};

    /// Three sequences sharing a 2-page prefix, one row each at position `pos`.
    fn plan(pos: usize) -> CascadePlan {
        let tables: [Vec<u32>; 3] = [vec![0, 1, 2], vec![0, 1, 3], vec![0, 1, 4]];
        let seqs: Vec<PlanSeq> = (tables.iter().enumerate())
            .map(|(i, t)| PlanSeq {
                pages: t,
                rows: i..i + 1,
                sparse_budget: None,
            })
            .collect();
        CascadePlan::build(&seqs, &[pos; 3], 4, &PlanOptions::default()).expect("plan")
    }

    #[test]
    fn packing_puts_each_array_at_its_capacity_and_pads_rows() {
        let p = plan(9);
        let (buf, lay) = pack(&p, 5, None);
        assert_eq!(buf.len(), lay.len());
        assert!(lay.caps.iter().all(|c| c.is_power_of_two()));
        let at = |a: Array, n: usize| &buf[lay.start(a)..lay.start(a) + n];
        let n_tasks = buf[lay.start(Array::Header)] as usize;
        assert_eq!(n_tasks, p.num_groups(), "one task per group of few rows");
        assert!(lay.task_blocks() >= n_tasks);
        assert_eq!(at(Array::PageIds, p.page_ids.len()), &p.page_ids[..]);
        assert_eq!(
            at(Array::RowEntries, p.row_entries.len()),
            &p.row_entries[..]
        );
        assert!(lay.entry_stride() >= p.num_entries());
        // Rows 3 and 4 are padding: no entries.
        let indptr = at(Array::RowEntryIndptr, 6);
        assert_eq!(&indptr[..4], &p.row_entry_indptr[..]);
        assert_eq!(indptr[4], indptr[3]);
        assert_eq!(indptr[5], indptr[3]);
    }

    #[test]
    fn a_later_plan_keeps_the_layout_while_it_fits() {
        let (_, first) = pack(&plan(9), 4, None);
        // One position further: same shape, same layout.
        let (_, same) = pack(&plan(10), 4, Some(&first));
        assert_eq!(same, first);
        // A smaller plan keeps the larger layout; a larger one grows it.
        let one = CascadePlan::build(
            &[PlanSeq {
                pages: &[0],
                rows: 0..1,
                sparse_budget: None,
            }],
            &[2],
            4,
            &PlanOptions::default(),
        )
        .expect("plan");
        assert_eq!(pack(&one, 1, Some(&first)).1, first);
        let (_, wider) = pack(&plan(9), 64, Some(&first));
        assert!(wider.caps.iter().zip(first.caps).all(|(w, f)| *w >= f));
        assert_ne!(wider, first);
        assert!(wider.start(Array::RowEntries) > first.start(Array::RowEntries));
    }
}
