//! The CUDA side of `arbor bench attention`: the pool in device memory, kernels timed with
//! CUDA events.

use super::{
    cascade_positions, max_abs_diff, median, sparse_params, AttentionArgs, Rng, SparseTiming,
    Timing, Tree,
};
use anyhow::{anyhow, Context};
use arbor_kernels::cuda::cudarc::driver::sys::CUevent_flags;
use arbor_kernels::cuda::cudarc::driver::{CudaSlice, DriverError};
use arbor_kernels::cuda::ops::attention::{self, AttentionBatch};
use arbor_kernels::cuda::ops::cascade::{self, GpuCascadePlan, TASK_ROWS};
use arbor_kernels::cuda::ops::sparse::{summarise_pages, GpuSparsePlan};
use arbor_kernels::cuda::{Gpu, GpuKvPool};
use arbor_kernels::ops::cascade::CascadePlan;
use arbor_kernels::ops::AttentionParams;
use half::bf16;
use std::sync::Arc;

/// Elements of the random block copied over the pool (8 MiB of bf16).
const FILL_ELEMS: usize = 4 << 20;

/// The opened GPU and its copy bandwidth.
pub struct GpuBench {
    gpu: Arc<Gpu>,
    /// Device copy bandwidth, bytes read + written per second, in GB/s.
    pub copy_bw: f64,
}

fn driver(what: &'static str) -> impl Fn(DriverError) -> anyhow::Error {
    move |e| anyhow!("{what}: CUDA error {e:?}")
}

impl GpuBench {
    /// Opens GPU `ordinal` and times a copy of `copy_mib` MiB (median of `reps`).
    pub fn open(ordinal: usize, copy_mib: usize, reps: usize) -> anyhow::Result<Self> {
        let gpu = Gpu::open(ordinal).context("opening the GPU")?;
        let n = copy_mib << 20;
        let src = gpu.zeros::<u8>(n, "the copy source")?;
        let mut dst = gpu.zeros::<u8>(n, "the copy destination")?;
        let stream = gpu.stream().clone();
        let ms = timed(&gpu, reps.max(3), &mut || {
            stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(driver("device copy"))
        })?;
        Ok(GpuBench {
            copy_bw: (2 * n) as f64 / (ms * 1e-3) / 1e9,
            gpu,
        })
    }

    /// `cuda:N NAME (arch)`.
    pub fn describe(&self) -> String {
        let g = &self.gpu;
        format!("cuda:{} {} ({})", g.ordinal, g.name, g.arch)
    }

    /// Times one cell (see [`super::run_cpu`] for the CPU side).
    pub fn run(
        &mut self,
        tree: &Tree,
        plan: &CascadePlan,
        sparse: Option<&CascadePlan>,
        p: &AttentionParams,
        a: &AttentionArgs,
        seed: u64,
    ) -> anyhow::Result<Timing> {
        let gpu = &self.gpu;
        let layout = a.kv_layout();
        let mut pool = GpuKvPool::new(gpu, layout, tree.pages)?;
        let mut rng = Rng::new(seed);
        // Random K/V: one random block uploaded, then copied over the whole pool.
        let total = pool.data.len();
        let block: Vec<bf16> = (0..FILL_ELEMS.min(total))
            .map(|_| bf16::from_f32(rng.next()))
            .collect();
        let block = gpu.upload(&block, "random K/V")?;
        let mut at = 0;
        while at < total {
            let n = block.len().min(total - at);
            let src = block.slice(..n);
            let mut dst = pool.data.slice_mut(at..at + n);
            gpu.stream()
                .memcpy_dtod(&src, &mut dst)
                .map_err(driver("filling the pool"))?;
            at += n;
        }
        let w = a.heads * a.head_dim;
        let rows = tree.positions.len();
        let q = gpu.upload(&rng.vec(rows * w), "queries")?;
        let mut out_c = gpu.zeros::<bf16>(rows * w, "cascade output")?;
        let mut out_p = gpu.zeros::<bf16>(rows * w, "paged output")?;

        let dplan = GpuCascadePlan::upload(gpu, plan)?;
        let cascade_ms = timed(gpu, a.reps, &mut || {
            cascade::cascade_attention(gpu, &q, rows, &dplan, &pool, 0, p, None, &mut out_c)
                .map_err(anyhow::Error::from)
        })?;

        // Every row its own sequence over its own block table.
        let up = |v: &[u32], what: &str| gpu.upload(v, what);
        let positions: Vec<u32> = tree.positions.iter().map(|&x| x as u32).collect();
        let seq_ids: Vec<u32> = (0..rows as u32).collect();
        let seq_indptr: Vec<u32> = (0..=rows as u32).collect();
        let (mut page_indptr, mut page_indices) = (vec![0u32], Vec::new());
        for (t, &pos) in tree.tables.iter().zip(&tree.positions) {
            page_indices.extend_from_slice(&t[..pos / a.page_size + 1]);
            page_indptr.push(page_indices.len() as u32);
        }
        let d_pos = up(&positions, "positions")?;
        let d_seq = up(&seq_ids, "row sequences")?;
        let d_seq_ptr = up(&seq_indptr, "sequence rows")?;
        let d_page_ptr = up(&page_indptr, "page pointers")?;
        let d_pages = up(&page_indices, "page indices")?;
        let batch = AttentionBatch {
            positions: &d_pos,
            row_seq: &d_seq,
            seq_row_indptr: &d_seq_ptr,
            page_indptr: &d_page_ptr,
            page_indices: &d_pages,
            seqs: rows,
            max_rows_per_seq: 1,
            max_context: tree.positions.iter().max().map_or(1, |&m| m + 1),
        };
        let paged_ms = timed(gpu, a.reps, &mut || {
            attention::attention(gpu, &q, rows, &batch, &pool, 0, p, &mut out_p)
                .map_err(anyhow::Error::from)
        })?;

        let down = |o: &CudaSlice<bf16>| -> anyhow::Result<Vec<f32>> {
            let v = gpu.download(o, "attention output")?;
            Ok(v[..rows * w].iter().map(|x| x.to_f32()).collect())
        };
        let sparse = match sparse {
            None => None,
            Some(sp_plan) => {
                // Every page is full: summaries of all their slots (not timed).
                let full: Vec<(u32, u32)> = (0..tree.pages as u32)
                    .map(|pg| (pg, a.page_size as u32))
                    .collect();
                summarise_pages(gpu, &mut pool, &full)?;
                let sp = sparse_params();
                let dsp = GpuCascadePlan::upload(gpu, sp_plan)?;
                let mut sel = GpuSparsePlan::upload(gpu, sp_plan, p, &sp)?
                    .context("a plan with budgets has sparse rows")?;
                let mut out_s = gpu.zeros::<bf16>(rows * w, "sparse output")?;
                let ms = timed(gpu, a.reps, &mut || {
                    let marks = sel.select(gpu, &q, &pool, 0, p)?;
                    cascade::cascade_attention(gpu, &q, rows, &dsp, &pool, 0, p, marks, &mut out_s)
                        .map_err(anyhow::Error::from)
                })?;
                let select_ms = timed(gpu, a.reps, &mut || {
                    sel.select(gpu, &q, &pool, 0, p)?;
                    Ok(())
                })?;
                let marks = sel.select(gpu, &q, &pool, 0, p)?;
                let marked = match marks {
                    Some(m) => gpu
                        .download(m, "page marks")?
                        .iter()
                        .filter(|&&x| x != 0)
                        .count(),
                    None => 0,
                };
                Some(SparseTiming {
                    ms,
                    select_ms,
                    marked,
                    total: sp_plan.pages_read() * a.kv_heads,
                    max_abs_diff: max_abs_diff(&down(&out_s)?, &down(&out_c)?),
                })
            }
        };
        let pass_rows = cascade::rows_per_pass(a.head_dim, a.heads / a.kv_heads);
        Ok(Timing {
            cascade_ms,
            paged_ms,
            max_abs_diff: max_abs_diff(&down(&out_c)?, &down(&out_p)?),
            cascade_positions: cascade_positions(plan, TASK_ROWS, pass_rows),
            sparse,
        })
    }
}

/// Median milliseconds of `reps` runs of `f` (after one warm-up), each between two CUDA
/// events on the stream.
fn timed(gpu: &Gpu, reps: usize, f: &mut dyn FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    gpu.synchronize()?;
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = gpu.stream().record_event(flags).map_err(driver("event"))?;
        f()?;
        let e = gpu.stream().record_event(flags).map_err(driver("event"))?;
        times.push(s.elapsed_ms(&e).map_err(driver("event timing"))? as f64);
    }
    Ok(median(times))
}
