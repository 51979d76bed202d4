//! Sparse attention on the GPU (`kernels/sparse.cu`): the pool's key summaries kept up to date
//! ([`summarise_rows`] after each layer's K/V store, [`summarise_pages`] after page copies),
//! and per layer the pages each (group, KV head) reads ([`GpuSparsePlan::select`]), which
//! [`super::cascade::cascade_attention`] then reads alone. The CPU reference is
//! [`crate::ops::cascade::select_pages`]: the host half here starts from its
//! [`selection_start`] (the same marks and candidates), and the kernel ranks by the same bound, operation
//! for operation, with the same tie rule, so the two choose the same pages from the same keys.

use super::super::{Gpu, GpuError, GpuKvPool, LaunchConfig};
use super::{int_arg, launch_error, need_len, product};
use crate::ops::cascade::{mark_index, selection_start, CascadePlan, SparseParams};
use crate::ops::AttentionParams;
use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};

/// Threads of a summary block (they stride over the channels).
const SUMMARY_THREADS: u32 = 128;
/// Threads of a selection block (`SELECT_THREADS` in sparse.cu).
const SELECT_THREADS: u32 = 256;

/// `n` blocks along grid axis `what` ("x", "y" or "z"; y and z hold at most 65535).
fn grid_dim(op: &str, what: &str, n: usize) -> Result<u32, GpuError> {
    let max = if what == "x" {
        i32::MAX as usize
    } else {
        65535
    };
    (n <= max)
        .then_some(n as u32)
        .ok_or_else(|| GpuError::Invalid(format!("{op}: {n} blocks along {what} exceed the grid")))
}

/// Recomputes, for layer `layer`, the summary of every page the step's K/V store wrote into:
/// `slots` holds each of the `rows` rows' `page · page_size + slot` (rows of one page adjacent
/// and in slot order, as a step lays them out; slots beyond the pool are padding).
pub fn summarise_rows(
    gpu: &Gpu,
    pool: &mut GpuKvPool,
    slots: &CudaView<u32>,
    rows: usize,
    layer: usize,
) -> Result<(), GpuError> {
    const OP: &str = "key summaries";
    let l = pool.layout;
    if rows == 0 || l.head_dim == 0 || l.num_kv_heads == 0 {
        return Ok(());
    }
    need_len(OP, "slots", slots.len(), rows)?;
    if layer >= l.num_layers {
        return Err(GpuError::Invalid(format!(
            "{OP}: layer {layer} of a {}-layer pool",
            l.num_layers
        )));
    }
    let f = gpu.func("sparse", "kv_summarise_rows")?;
    let mut lb = gpu.stream().launch_builder(&f);
    let ints = [
        int_arg(OP, "rows", rows)?,
        int_arg(OP, "layer", layer)?,
        int_arg(OP, "pages", pool.num_pages)?,
        int_arg(OP, "page size", l.page_size)?,
        int_arg(OP, "KV heads", l.num_kv_heads)?,
        int_arg(OP, "head_dim", l.head_dim)?,
    ];
    lb.arg(&pool.data).arg(slots);
    for v in &ints {
        lb.arg(v);
    }
    lb.arg(&mut pool.summaries);
    let cfg = LaunchConfig {
        grid_dim: (
            grid_dim(OP, "x", rows)?,
            grid_dim(OP, "y", l.num_kv_heads)?,
            1,
        ),
        block_dim: (SUMMARY_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match the kernel; `slots` holds `rows` entries, and pages beyond the
    // pool are skipped by the kernel, so every access lies in the pool and its summaries.
    unsafe { lb.launch(cfg) }.map_err(launch_error(OP))?;
    Ok(())
}

/// Recomputes the summaries of pages `(page, slots)` (their first `slots` slots) in every
/// layer, after those pages were copied.
pub fn summarise_pages(
    gpu: &Gpu,
    pool: &mut GpuKvPool,
    pages: &[(u32, u32)],
) -> Result<(), GpuError> {
    const OP: &str = "key summaries of copied pages";
    let l = pool.layout;
    if pages.is_empty() || l.head_dim == 0 || l.num_kv_heads == 0 || l.num_layers == 0 {
        return Ok(());
    }
    let flat: Vec<u32> = pages.iter().flat_map(|&(p, n)| [p, n]).collect();
    let dev = gpu.upload(&flat, "copied pages")?;
    let f = gpu.func("sparse", "kv_summarise_pages")?;
    let mut lb = gpu.stream().launch_builder(&f);
    let ints = [
        int_arg(OP, "pages", pages.len())?,
        int_arg(OP, "pool pages", pool.num_pages)?,
        int_arg(OP, "page size", l.page_size)?,
        int_arg(OP, "KV heads", l.num_kv_heads)?,
        int_arg(OP, "head_dim", l.head_dim)?,
    ];
    lb.arg(&pool.data).arg(&dev);
    for v in &ints {
        lb.arg(v);
    }
    lb.arg(&mut pool.summaries);
    let cfg = LaunchConfig {
        grid_dim: (
            grid_dim(OP, "x", pages.len())?,
            grid_dim(OP, "y", l.num_kv_heads)?,
            grid_dim(OP, "z", l.num_layers)?,
        ),
        block_dim: (SUMMARY_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match the kernel; pages beyond the pool are skipped and slots are
    // clamped to the page size by the kernel.
    unsafe { lb.launch(cfg) }.map_err(launch_error(OP))?;
    Ok(())
}

/// The host half of a step's sparse selection, made from its [`CascadePlan`]: the marks every
/// layer starts from (sinks, local windows, dense groups, rows whose budget covers every
/// candidate) and the ranked choices the kernel makes (one per sparse row that must choose).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SparseHostPlan {
    /// One byte per (group page, KV head), laid out as [`mark_index`].
    pub init_marks: Vec<u8>,
    /// Per ranked choice: (row, pages to take, first candidate, end candidate).
    pub selections: Vec<[u32; 4]>,
    /// Per candidate: (pool page, mark index for KV head 0, its group's page count).
    pub candidates: Vec<[u32; 3]>,
}

impl SparseHostPlan {
    /// The selection of `plan`'s sparse rows; `None` when it has none.
    pub fn new(
        plan: &CascadePlan,
        p: &AttentionParams,
        sp: &SparseParams,
    ) -> Result<Option<Self>, GpuError> {
        if !plan.has_sparse() {
            return Ok(None);
        }
        let nkv = p.n_kv_heads;
        let too_big =
            || GpuError::Invalid("sparse selection: the plan exceeds 32-bit indices".into());
        let n_marks = plan.pages_read().checked_mul(nkv).ok_or_else(too_big)?;
        u32::try_from(n_marks).map_err(|_| too_big())?;
        let start = selection_start(plan, p, sp);
        let mut out = SparseHostPlan {
            init_marks: start.marks.iter().map(|&m| u8::from(m)).collect(),
            ..Default::default()
        };
        for (r, rc) in &start.ranked {
            let c0 = out.candidates.len();
            for c in &rc.cands {
                out.candidates.push([
                    c.page,
                    mark_index(plan, nkv, c.group, 0, c.j) as u32,
                    plan.pages(c.group).len() as u32,
                ]);
            }
            let c1 = out.candidates.len();
            u32::try_from(c1).map_err(|_| too_big())?;
            out.selections
                .push([*r as u32, rc.take as u32, c0 as u32, c1 as u32]);
        }
        Ok(Some(out))
    }
}

/// Where a [`GpuSparsePlan`]'s arrays sit: each at a power-of-two capacity that never shrinks
/// while the buffers are reused, so that the steps of a growing tree launch alike and a CUDA
/// graph captured with one replays the next (the kernel reads the counts from the device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SparseLayout {
    /// Selections (4 `u32` each).
    sel: usize,
    /// Candidates (3 `u32` each; the keys scratch holds one per candidate and KV head).
    cand: usize,
    /// Mark bytes.
    marks: usize,
}

impl SparseLayout {
    fn fit(host: &SparseHostPlan, old: Option<&SparseLayout>) -> SparseLayout {
        let cap = |n: usize, o: usize| n.max(1).next_power_of_two().max(o);
        let o = old.copied().unwrap_or_default();
        SparseLayout {
            sel: cap(host.selections.len(), o.sel),
            cand: cap(host.candidates.len(), o.cand),
            marks: cap(host.init_marks.len(), o.marks),
        }
    }

    /// `u32`s of the data buffer: the counts, then the selections, then the candidates.
    fn data_len(&self) -> usize {
        2 + 4 * self.sel + 3 * self.cand
    }
}

/// A step's sparse selection on the device: the [`SparseHostPlan`] uploaded once (counts,
/// selections and candidates in one buffer, the initial marks in another), and the marks
/// buffer each layer's [`GpuSparsePlan::select`] fills. The buffers are reused by the next
/// step's plan through [`GpuSparsePlan::upload_reusing`]; see [`GpuSparsePlan::epoch`].
pub struct GpuSparsePlan {
    dense_layers: usize,
    n_kv_heads: usize,
    layout: SparseLayout,
    epoch: u64,
    data: CudaSlice<u32>,
    init: CudaSlice<u8>,
    marks: CudaSlice<u8>,
    keys: CudaSlice<u32>,
}

impl GpuSparsePlan {
    /// Uploads the selection of `plan`'s sparse rows (`None` when it has none).
    pub fn upload(
        gpu: &Gpu,
        plan: &CascadePlan,
        p: &AttentionParams,
        sp: &SparseParams,
    ) -> Result<Option<Self>, GpuError> {
        Self::upload_reusing(gpu, plan, p, sp, None)
    }

    /// [`GpuSparsePlan::upload`] into the buffers of `old` (an earlier step's) where they are
    /// big enough, keeping its epoch; otherwise into new ones, of a new epoch.
    pub fn upload_reusing(
        gpu: &Gpu,
        plan: &CascadePlan,
        p: &AttentionParams,
        sp: &SparseParams,
        old: Option<GpuSparsePlan>,
    ) -> Result<Option<Self>, GpuError> {
        let Some(host) = SparseHostPlan::new(plan, p, sp)? else {
            return Ok(None);
        };
        let old = old.filter(|o| o.n_kv_heads == p.n_kv_heads);
        let layout = SparseLayout::fit(&host, old.as_ref().map(|o| &o.layout));
        let mut data = vec![0u32; layout.data_len()];
        data[0] = host.selections.len() as u32;
        data[1] = host.candidates.len() as u32;
        for (i, v) in host.selections.iter().flatten().enumerate() {
            data[2 + i] = *v;
        }
        for (i, v) in host.candidates.iter().flatten().enumerate() {
            data[2 + 4 * layout.sel + i] = *v;
        }
        let n_keys = product("sparse selection", "keys", layout.cand, p.n_kv_heads)?;
        let mut plan = match old {
            Some(o) if o.layout == layout => o,
            _ => GpuSparsePlan {
                dense_layers: sp.dense_layers,
                n_kv_heads: p.n_kv_heads,
                layout,
                epoch: super::cascade::next_epoch(),
                data: gpu.zeros::<u32>(layout.data_len(), "sparse selections")?,
                init: gpu.zeros::<u8>(layout.marks, "sparse page marks")?,
                marks: gpu.zeros::<u8>(layout.marks, "sparse page marks")?,
                keys: gpu.zeros::<u32>(n_keys, "sparse page keys")?,
            },
        };
        plan.dense_layers = sp.dense_layers;
        gpu.upload_into(&data, &mut plan.data, "sparse selections")?;
        gpu.upload_into(&host.init_marks, &mut plan.init, "sparse page marks")?;
        Ok(Some(plan))
    }

    /// Changes whenever the buffers do: two plans of one epoch make [`GpuSparsePlan::select`]
    /// launch the same copy and kernel with the same arguments (for the same queries, pool
    /// and layer), so a CUDA graph captured with one replays the other once it is uploaded.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The page marks of `layer` for the queries `q` (`rows × n_heads × head_dim`, after RoPE,
    /// rows in the plan's order), or `None` for the first `dense_layers` layers (read every
    /// page). The marks stay valid until the next call.
    pub fn select(
        &mut self,
        gpu: &Gpu,
        q: &CudaSlice<f32>,
        pool: &GpuKvPool,
        layer: usize,
        p: &AttentionParams,
    ) -> Result<Option<&CudaSlice<u8>>, GpuError> {
        const OP: &str = "sparse page selection";
        if layer < self.dense_layers {
            return Ok(None);
        }
        // The whole capacity: a copy whose size does not depend on the step.
        gpu.stream()
            .memcpy_dtod(&self.init, &mut self.marks)
            .map_err(|e| GpuError::driver("resetting the sparse page marks", e))?;
        let l = pool.layout;
        if p.head_dim != l.head_dim || p.n_kv_heads != l.num_kv_heads || p.n_kv_heads == 0 {
            return Err(GpuError::Invalid(format!(
                "{OP}: {} KV heads of {} dims, the pool has {} of {}",
                p.n_kv_heads, p.head_dim, l.num_kv_heads, l.head_dim
            )));
        }
        if p.n_kv_heads != self.n_kv_heads {
            return Err(GpuError::Invalid(format!(
                "{OP}: {} KV heads, the plan was made for {}",
                p.n_kv_heads, self.n_kv_heads
            )));
        }
        let ints = [
            int_arg(OP, "n_heads", p.n_heads)?,
            int_arg(OP, "n_kv_heads", p.n_kv_heads)?,
            int_arg(OP, "head_dim", p.head_dim)?,
        ];
        let (layer_i, pages_i) = (
            int_arg(OP, "layer", layer)?,
            int_arg(OP, "pages", pool.num_pages)?,
        );
        let lay = self.layout;
        let counts = self.data.slice(0..2);
        let sel = self.data.slice(2..2 + 4 * lay.sel);
        let cand = self.data.slice(2 + 4 * lay.sel..lay.data_len());
        let f = gpu.func("sparse", "sparse_select")?;
        let mut lb = gpu.stream().launch_builder(&f);
        lb.arg(q);
        for v in &ints {
            lb.arg(v);
        }
        lb.arg(&pool.summaries)
            .arg(&layer_i)
            .arg(&pages_i)
            .arg(&counts)
            .arg(&sel)
            .arg(&cand)
            .arg(&mut self.keys)
            .arg(&mut self.marks);
        // A block per selection the buffer holds; those past this step's count return.
        let cfg = LaunchConfig {
            grid_dim: (
                grid_dim(OP, "x", lay.sel)?,
                grid_dim(OP, "y", p.n_kv_heads)?,
                1,
            ),
            block_dim: (SELECT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel. The host plan's rows index `q`'s plan rows, its
        // mark indices come from `mark_index` over the same plan (within the marks capacity),
        // blocks past the uploaded selection count return at once,
        // and the candidates' pages beyond the pool score −∞ without a read.
        unsafe { lb.launch(cfg) }.map_err(launch_error(OP))?;
        Ok(Some(&self.marks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cascade::{PlanOptions, PlanSeq};

    fn params(nkv: usize) -> AttentionParams {
        AttentionParams {
            n_heads: 2 * nkv,
            n_kv_heads: nkv,
            head_dim: 8,
            scale: 1.0,
            sliding_window: None,
        }
    }

    /// Two sequences sharing 6 pages (size 4), each with 2 private pages; row budgets given.
    fn plan(budgets: [Option<usize>; 2]) -> CascadePlan {
        let tables = [vec![0, 1, 2, 3, 4, 5, 6, 7], vec![0, 1, 2, 3, 4, 5, 8, 9]];
        let seqs: Vec<PlanSeq> = (tables.iter().enumerate())
            .map(|(i, t)| PlanSeq {
                pages: t,
                rows: i..i + 1,
                sparse_budget: budgets[i],
            })
            .collect();
        CascadePlan::build(&seqs, &[30, 30], 4, &PlanOptions::default()).expect("plan")
    }

    #[test]
    fn a_dense_plan_has_no_selection() {
        let host = SparseHostPlan::new(&plan([None, None]), &params(2), &SparseParams::default());
        assert_eq!(host.expect("plan"), None);
    }

    #[test]
    fn rows_choose_among_their_middle_pages_and_premark_the_rest() {
        // Page 0 is the sink, pages 6–7 the local window (position 30 is in page 7); pages
        // 1–5 are the candidates of each row, which takes 2 of them.
        let (p, sp) = (params(2), SparseParams::default());
        let pl = plan([Some(2), Some(2)]);
        let host = SparseHostPlan::new(&pl, &p, &sp)
            .expect("plan")
            .expect("sparse");
        assert_eq!(host.selections.len(), 2);
        for s in &host.selections {
            assert_eq!(s[1], 2, "take");
            assert_eq!(s[3] - s[2], 5, "candidates");
        }
        let pages: Vec<u32> = host.candidates.iter().map(|c| c[0]).collect();
        assert_eq!(pages, [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]);
        // Pre-marked: the sink and both rows' local pages, for both KV heads; nothing else.
        let marked = host.init_marks.iter().filter(|&&m| m == 1).count();
        assert_eq!(marked, (1 + 2 + 2) * 2);
    }

    #[test]
    fn a_budget_covering_every_candidate_premarks_what_the_cpu_reads() {
        // With nothing to rank, the host plan alone decides, and must mark exactly what the
        // CPU selection reads.
        let (p, sp) = (params(3), SparseParams::default());
        let pl = plan([Some(5), None]);
        let host = SparseHostPlan::new(&pl, &p, &sp)
            .expect("plan")
            .expect("sparse");
        assert!(host.selections.is_empty());
        let layout = crate::kv::KvLayout {
            num_layers: 3,
            num_kv_heads: 3,
            head_dim: 8,
            page_size: 4,
        };
        let pool = crate::kv::KvPool::new(layout, 10);
        let q = vec![0.0; 2 * p.n_heads * p.head_dim];
        let sel = crate::ops::cascade::select_pages(&q, &pl, &pool, 2, &p, &sp).expect("sparse");
        for g in 0..pl.num_groups() {
            for h in 0..3 {
                let want: Vec<u32> = sel.pages(g, h).to_vec();
                let got: Vec<u32> = (0..pl.pages(g).len() as u32)
                    .filter(|&j| host.init_marks[mark_index(&pl, 3, g, h, j as usize)] == 1)
                    .collect();
                assert_eq!(got, want, "group {g} head {h}");
            }
        }
    }
}
