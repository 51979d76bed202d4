//! Mixture-of-experts layers on the GPU: the weights of a [`MoeBlock`] (experts stacked for
//! the grouped GEMM), the scratch every MoE layer of a step reuses, and the per-expert token
//! statistics ([`CudaModel::take_expert_counts`]).
//!
//! A layer (see `arbor_kernels::cuda::ops::moe`): router GEMM (cuBLASLt) → top-k softmax →
//! grouping by expert → grouped gate/up GEMM → SwiGLU → grouped down GEMM → combine (with
//! Qwen2-MoE's shared expert through the dense GEMMs and its sigmoid gate in the combine).
//! Nothing waits for the device: grids follow the step's token count, never the routing.
//!
//! Statistics: each layer's grouping adds its per-expert counts into a device table (one row
//! per MoE layer) while counting is on; the host reads the table only when asked (the bench
//! asks once per step) and reports the difference from the last read.

use super::upload::Uploader;
use super::CudaModel;
use crate::model::{ExpertCounts, Model, MoeBlock};
use crate::RuntimeError;
use arbor_kernels::cuda::cudarc::driver::{CudaSlice, CudaView};
use arbor_kernels::cuda::gemm::Gemm;
use arbor_kernels::cuda::ops::activation;
use arbor_kernels::cuda::ops::moe::{
    self as ops, ExpertStatsRow, GpuExpertGroups, GroupedInput, SharedExpertOut,
};
use arbor_kernels::cuda::Gpu;
use half::bf16;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// One MoE layer's weights on the GPU.
pub struct GpuMoe {
    /// Router, `num_experts × hidden`.
    pub router: CudaSlice<bf16>,
    /// Every expert's gate and up stacked (gate rows first), `num_experts × 2·inter × hidden`.
    pub gate_up: CudaSlice<bf16>,
    /// Every expert's down projection, `num_experts × hidden × inter`.
    pub down: CudaSlice<bf16>,
    pub shared: Option<GpuSharedExpert>,
    pub num_experts: usize,
    pub top_k: usize,
    /// An expert's intermediate size.
    pub inter: usize,
    pub renormalize: bool,
    /// This layer's row of the statistics table (its index among the MoE layers).
    pub slot: usize,
}

/// Qwen2-MoE's shared expert on the GPU.
pub struct GpuSharedExpert {
    /// `2·inter × hidden`, gate rows first.
    pub gate_up: CudaSlice<bf16>,
    /// `hidden × inter`.
    pub down: CudaSlice<bf16>,
    /// The sigmoid gate's weights, `hidden` f32.
    pub gate: CudaSlice<f32>,
    pub inter: usize,
}

/// Uploads layer `layer`'s MoE block as statistics row `slot`.
pub(super) fn upload(
    up: &mut Uploader,
    m: &MoeBlock,
    layer: usize,
    slot: usize,
) -> Result<GpuMoe, RuntimeError> {
    let unsupported = |why: String| {
        RuntimeError::Config(format!(
            "layer {layer}: {why}, which the CUDA backend does not run: use --device cpu"
        ))
    };
    let (e, h) = (m.experts.len(), m.router.cols);
    let first = m
        .experts
        .first()
        .ok_or_else(|| unsupported("a mixture of experts without experts".into()))?;
    let inter = first.ff();
    for (i, x) in m.experts.iter().enumerate() {
        let shapes = [(x.gate_up.rows, x.gate_up.cols), (x.down.rows, x.down.cols)];
        if shapes != [(2 * inter, h), (h, inter)] {
            return Err(unsupported(format!(
                "expert {i} has gate/up {:?} and down {:?}, unlike expert 0's ({}, {h}) and ({h}, {inter})",
                shapes[0], shapes[1], 2 * inter
            )));
        }
    }
    if m.router.rows != e || m.top_k == 0 || m.top_k > e {
        return Err(unsupported(format!(
            "a router of {} rows for {e} experts, top-{}",
            m.router.rows, m.top_k
        )));
    }
    let gate_ups: Vec<_> = m.experts.iter().map(|x| &x.gate_up).collect();
    let downs: Vec<_> = m.experts.iter().map(|x| &x.down).collect();
    let shared = match &m.shared {
        None => None,
        Some(s) => Some(GpuSharedExpert {
            gate_up: up.matrix(&s.ffn.gate_up, "a shared expert's gate/up projection")?,
            down: up.matrix(&s.ffn.down, "a shared expert's down projection")?,
            gate: up.vector(&s.gate, "a shared expert's gate")?,
            inter: s.ffn.ff(),
        }),
    };
    Ok(GpuMoe {
        router: up.matrix(&m.router, "a MoE router")?,
        gate_up: up.stacked(&gate_ups, "the experts' gate/up projections")?,
        down: up.stacked(&downs, "the experts' down projections")?,
        shared,
        num_experts: e,
        top_k: m.top_k,
        inter,
        renormalize: m.renormalize,
        slot,
    })
}

/// The MoE state of a [`CudaModel`]: scratch buffers shared by every MoE layer (they run one
/// after another on one stream), grown to the largest step seen and never shrunk or
/// reallocated per layer, and the expert statistics.
pub(super) struct MoeState {
    /// Count tokens per expert ([`CudaModel::set_expert_stats`]).
    counting: AtomicBool,
    /// Changes whenever the scratch moves or counting is switched, either of which changes
    /// the launches a CUDA graph of a MoE step captured.
    generation: AtomicU64,
    /// Model layer index of each MoE layer (the statistics rows, in order).
    layers: Vec<usize>,
    num_experts: usize,
    /// `layers × num_experts` tokens routed since the upload; `None` for a dense model.
    stats: Option<CudaSlice<u64>>,
    /// The table as last read by [`CudaModel::take_expert_counts`].
    taken: Mutex<Vec<u64>>,
    bufs: Option<MoeBuffers>,
}

/// Scratch of one MoE layer for up to `rows` tokens.
struct MoeBuffers {
    rows: usize,
    /// Router logits, then probabilities, `rows × experts`.
    logits: CudaSlice<f32>,
    /// Routed experts and weights, `rows × top_k`.
    ids: CudaSlice<u32>,
    weights: CudaSlice<f32>,
    groups: GpuExpertGroups,
    /// Gate/up outputs per assignment, `rows·top_k × 2·inter`.
    gate_up: CudaSlice<f32>,
    /// SwiGLU activations, `rows·top_k × inter`.
    act: CudaSlice<bf16>,
    /// Down outputs per assignment, `rows·top_k × hidden`.
    y: CudaSlice<f32>,
    /// The shared expert's gate/up, activations and output (`rows × …`); empty without one.
    shared_gate_up: CudaSlice<f32>,
    shared_act: CudaSlice<bf16>,
    shared_y: CudaSlice<f32>,
}

/// Widest shapes over a model's MoE layers, for sizing the scratch.
#[derive(Clone, Copy, Default)]
struct Dims {
    experts: usize,
    top_k: usize,
    inter: usize,
    shared_inter: usize,
}

impl MoeState {
    /// See the field: graphs of MoE steps are valid while this stays the same.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The state for `model` (nothing allocated for a dense one).
    pub fn new(gpu: &Gpu, model: &Model) -> Result<Self, RuntimeError> {
        let layers: Vec<usize> = (0..model.layers.len())
            .filter(|&i| model.layers[i].moe().is_some())
            .collect();
        let num_experts = model.cfg.moe.as_ref().map_or(0, |m| m.num_experts);
        let stats = match layers.is_empty() {
            true => None,
            false => Some(gpu.zeros::<u64>(layers.len() * num_experts, "expert token counts")?),
        };
        Ok(MoeState {
            counting: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            taken: Mutex::new(vec![0; layers.len() * num_experts]),
            layers,
            num_experts,
            stats,
            bufs: None,
        })
    }

    /// Scratch for `rows` tokens of layers shaped like `m`, grown (rounded up to 64 rows) if
    /// the current buffers are smaller.
    fn buffers(
        &mut self,
        gpu: &Gpu,
        m: &GpuMoe,
        rows: usize,
        h: usize,
    ) -> Result<&mut MoeBuffers, RuntimeError> {
        let need = Dims {
            experts: m.num_experts,
            top_k: m.top_k,
            inter: m.inter,
            shared_inter: m.shared.as_ref().map_or(0, |s| s.inter),
        };
        let fits = |b: &MoeBuffers| {
            let a = rows * need.top_k;
            b.rows >= rows
                && b.logits.len() >= rows * need.experts
                && b.ids.len() >= a
                && b.gate_up.len() >= a * 2 * need.inter
                && b.act.len() >= a * need.inter
                && b.y.len() >= a * h
                && b.shared_gate_up.len() >= rows * 2 * need.shared_inter
                && b.shared_act.len() >= rows * need.shared_inter
                && b.shared_y.len() >= rows * h * usize::from(need.shared_inter > 0)
        };
        if !self.bufs.as_ref().is_some_and(fits) {
            // Grow every dimension to the largest seen, so layers of different shapes (none
            // today) cannot make the buffers shrink back and forth.
            let old = self.bufs.take();
            let old_rows = old.as_ref().map_or(0, |b| b.rows);
            let cap = rows.max(old_rows).div_ceil(64) * 64;
            let mut groups = match old {
                Some(b) => b.groups,
                None => GpuExpertGroups::new(gpu, cap * need.top_k, need.experts)?,
            };
            groups.reserve(gpu, cap * need.top_k, need.experts)?;
            let a = cap * need.top_k;
            let s = need.shared_inter;
            let what = "MoE scratch";
            self.generation.fetch_add(1, Ordering::Relaxed);
            self.bufs = Some(MoeBuffers {
                rows: cap,
                logits: gpu.zeros(cap * need.experts, what)?,
                ids: gpu.zeros(a, what)?,
                weights: gpu.zeros(a, what)?,
                groups,
                gate_up: gpu.zeros(a * 2 * need.inter, what)?,
                act: gpu.zeros(a * need.inter, what)?,
                y: gpu.zeros(a * h, what)?,
                shared_gate_up: gpu.zeros(cap * 2 * s, what)?,
                shared_act: gpu.zeros(cap * s, what)?,
                shared_y: gpu.zeros(if s > 0 { cap * h } else { 0 }, what)?,
            });
        }
        self.bufs
            .as_mut()
            .ok_or_else(|| RuntimeError::Config("MoE scratch missing after allocation".into()))
    }

    /// Layer `m`'s MoE block for `rows` tokens of width `h`: `out (rows × h) = MoE(xn)`; rows
    /// from the device scalar `valid_rows` on are padding, routed to no expert (their `out`
    /// is the shared expert's alone, or zero).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        gpu: &Gpu,
        gemm: &Gemm,
        m: &GpuMoe,
        rows: usize,
        h: usize,
        valid_rows: &CudaView<u32>,
        xn: &CudaSlice<bf16>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), RuntimeError> {
        if rows == 0 {
            return Ok(());
        }
        let counting = self.counting.load(Ordering::Relaxed);
        let (e, k, f) = (m.num_experts, m.top_k, m.inter);
        // Split borrows: the statistics table beside the scratch.
        let mut stats = self.stats.take();
        let result = (|| {
            let b = self.buffers(gpu, m, rows, h)?;
            gemm.matmul_bt(xn, rows, &m.router, e, h, &mut b.logits)?;
            ops::route_softmax_topk(
                gpu,
                &mut b.logits,
                rows,
                e,
                k,
                m.renormalize,
                Some(valid_rows),
                &mut b.ids,
                &mut b.weights,
            )?;
            let row = match (&mut stats, counting) {
                (Some(table), true) => Some(ExpertStatsRow { table, row: m.slot }),
                _ => None,
            };
            b.groups.group(gpu, &b.ids, &b.weights, rows, k, e, row)?;
            let a = rows * k;
            let groups = &b.groups;
            ops::grouped_matmul_bt(
                gpu,
                xn,
                GroupedInput::Tokens,
                groups,
                &m.gate_up,
                2 * f,
                h,
                &mut b.gate_up,
            )?;
            activation::swiglu(gpu, &b.gate_up, a, f, &mut b.act)?;
            ops::grouped_matmul_bt(
                gpu,
                &b.act,
                GroupedInput::Grouped,
                groups,
                &m.down,
                h,
                f,
                &mut b.y,
            )?;
            let shared = match &m.shared {
                None => None,
                Some(s) => {
                    let si = s.inter;
                    gemm.matmul_bt(xn, rows, &s.gate_up, 2 * si, h, &mut b.shared_gate_up)?;
                    activation::swiglu(gpu, &b.shared_gate_up, rows, si, &mut b.shared_act)?;
                    gemm.matmul_bt(&b.shared_act, rows, &s.down, h, si, &mut b.shared_y)?;
                    Some(SharedExpertOut {
                        y: &b.shared_y,
                        xn,
                        gate: &s.gate,
                    })
                }
            };
            ops::moe_combine(gpu, &b.y, groups, h, shared, out)?;
            Ok(())
        })();
        self.stats = stats;
        result
    }
}

impl CudaModel {
    /// Switches per-expert token counting on or off (off at first), as
    /// [`Model::set_expert_stats`] does for the CPU path.
    pub fn set_expert_stats(&self, on: bool) {
        if self.moe.counting.swap(on, Ordering::Relaxed) != on {
            self.moe.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Tokens routed to each expert of each MoE layer since the last call (counted while
    /// [`CudaModel::set_expert_stats`] is on), as [`Model::take_expert_counts`]; `None` for a
    /// dense model. Reads the device table back (waits for the stream).
    pub fn take_expert_counts(&self) -> Result<Option<ExpertCounts>, RuntimeError> {
        let s = &self.moe;
        let Some(table) = &s.stats else {
            return Ok(None);
        };
        let now = self.gpu.download(table, "expert token counts")?;
        let e = s.num_experts;
        let mut taken = s.taken.lock().unwrap_or_else(|p| p.into_inner());
        let counts = (0..s.layers.len())
            .map(|i| {
                (i * e..(i + 1) * e)
                    .map(|j| now[j].wrapping_sub(taken[j]))
                    .collect()
            })
            .collect();
        taken.copy_from_slice(&now[..s.layers.len() * e]);
        Ok(Some(ExpertCounts {
            layers: s.layers.clone(),
            counts,
        }))
    }
}
