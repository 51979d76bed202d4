//! The mixture-of-experts FFN block (`Ffn::Moe`): a router, routed SwiGLU experts and an
//! optional gated shared expert (Qwen2-MoE), plus per-expert load counters.
//!
//! Weights: each expert is kept as its own pair of [`Weight`]s (gate and up fused, gate rows
//! first, as the dense FFN; down), in the stored type, so quantised experts run through the
//! same matmul as every other layer. Stacked tensors (GGUF `ffn_{gate,up,down}_exps`,
//! transformers-5 `mlp.experts.gate_up_proj`/`down_proj`) are sliced into per-expert
//! weights at load: a copy of the bytes the loader makes anyway, and on the CPU per-expert
//! matrices are what the grouped GEMM reads.
//!
//! The math (routing, grouping rows by expert, the grouped expert GEMM) is model-free and
//! lives in `arbor_kernels::ops::moe`.

use super::layer::stack_rows;
use super::linear::{linear, Precision};
use super::source::TensorSource;
use super::Model;
use crate::config::{ModelConfig, MoeConfig};
use crate::RuntimeError;
use arbor_kernels::ops::{self, ExpertFfn, ExpertGroups};
use arbor_kernels::{KernelError, Weight};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One layer's MoE block.
pub struct MoeBlock {
    /// `num_experts × hidden`.
    pub(crate) router: Weight,
    pub(crate) experts: Vec<ExpertFfn>,
    pub(crate) shared: Option<SharedExpert>,
    pub(crate) top_k: usize,
    pub(crate) renormalize: bool,
    stats: ExpertStats,
}

/// Qwen2-MoE's shared expert: every token goes through it, scaled by `sigmoid(gate · x)`.
pub(crate) struct SharedExpert {
    pub(crate) ffn: ExpertFfn,
    pub(crate) gate: Vec<f32>,
}

/// Tokens routed to each expert since the last take; counted only while switched on.
struct ExpertStats {
    on: AtomicBool,
    counts: Vec<AtomicU64>,
}

fn missing(name: String, detail: &str) -> RuntimeError {
    RuntimeError::Tensor {
        name,
        detail: detail.into(),
    }
}

impl MoeBlock {
    /// Loads layer `i`'s MoE block (see the module notes for the accepted layouts).
    pub fn load(src: &TensorSource, cfg: &ModelConfig, i: usize) -> Result<Self, RuntimeError> {
        let moe: &MoeConfig = cfg
            .moe
            .as_ref()
            .ok_or_else(|| RuntimeError::Config(format!("layer {i} is MoE in a dense config")))?;
        let (h, ff, n_exp) = (cfg.hidden_size, moe.moe_intermediate_size, moe.num_experts);
        let n = |s: &str| format!("blk.{i}.{s}");
        let gate_up = if let Some(ws) =
            src.stacked(&n("ffn_gate_up_exps.weight"), n_exp, 2 * ff, h)?
        {
            ws
        } else if let Some(gates) = src.stacked(&n("ffn_gate_exps.weight"), n_exp, ff, h)? {
            let ups = src
                .stacked(&n("ffn_up_exps.weight"), n_exp, ff, h)?
                .ok_or_else(|| missing(n("ffn_up_exps.weight"), "missing beside ffn_gate_exps"))?;
            gates
                .into_iter()
                .zip(ups)
                .map(|(g, u)| stack_rows(vec![g, u]))
                .collect::<Result<_, _>>()?
        } else if src.has(&n("ffn_gate.0.weight")) {
            (0..n_exp)
                .map(|e| {
                    stack_rows(vec![
                        src.req_matrix(&n(&format!("ffn_gate.{e}.weight")), ff, h)?,
                        src.req_matrix(&n(&format!("ffn_up.{e}.weight")), ff, h)?,
                    ])
                })
                .collect::<Result<_, _>>()?
        } else {
            return Err(missing(
                format!("layer {i} experts"),
                &format!(
                    "missing from the weights: looked for HF model.layers.{i}.mlp.experts.0.gate_proj.weight, \
                     model.layers.{i}.block_sparse_moe.experts.0.w1.weight and \
                     model.layers.{i}.mlp.experts.gate_up_proj, GGUF blk.{i}.ffn_gate_exps.weight and \
                     blk.{i}.ffn_gate.0.weight"
                ),
            ));
        };
        let downs = match src.stacked(&n("ffn_down_exps.weight"), n_exp, h, ff)? {
            Some(ws) => ws,
            None => (0..n_exp)
                .map(|e| src.req_matrix(&n(&format!("ffn_down.{e}.weight")), h, ff))
                .collect::<Result<_, _>>()?,
        };
        let experts = gate_up
            .into_iter()
            .zip(downs)
            .map(|(gate_up, down)| ExpertFfn { gate_up, down })
            .collect();
        let s = moe.shared_expert_intermediate_size;
        let shared = if s > 0 {
            let gate = src
                .flat_vector(&n("ffn_gate_inp_shexp.weight"), h)?
                .ok_or_else(|| {
                    missing(n("ffn_gate_inp_shexp.weight"), "missing from the weights")
                })?;
            Some(SharedExpert {
                ffn: ExpertFfn {
                    gate_up: stack_rows(vec![
                        src.req_matrix(&n("ffn_gate_shexp.weight"), s, h)?,
                        src.req_matrix(&n("ffn_up_shexp.weight"), s, h)?,
                    ])?,
                    down: src.req_matrix(&n("ffn_down_shexp.weight"), h, s)?,
                },
                gate,
            })
        } else {
            None
        };
        Ok(MoeBlock {
            router: src.req_matrix(&n("ffn_gate_inp.weight"), n_exp, h)?,
            experts,
            shared,
            top_k: moe.experts_per_token,
            renormalize: moe.norm_topk_prob,
            stats: ExpertStats {
                on: AtomicBool::new(false),
                counts: (0..n_exp).map(|_| AtomicU64::new(0)).collect(),
            },
        })
    }

    /// Bytes of weights held.
    pub fn nbytes(&self) -> usize {
        self.router.nbytes()
            + self.experts.iter().map(ExpertFfn::nbytes).sum::<usize>()
            + self
                .shared
                .as_ref()
                .map_or(0, |s| s.ffn.nbytes() + 4 * s.gate.len())
    }

    /// `out (t × hidden) = MoE(xn)` for the normed hidden states `xn` (`t × hidden`).
    pub fn forward(
        &self,
        p: Precision,
        xn: &[f32],
        t: usize,
        out: &mut [f32],
    ) -> Result<(), RuntimeError> {
        let (h, n_exp) = (self.router.cols, self.experts.len());
        let mut logits = vec![0.0f32; t * n_exp];
        linear(p, xn, t, &self.router, &mut logits)?;
        let routing = ops::route_softmax_topk(&logits, n_exp, self.top_k, self.renormalize)?;
        let groups = ops::group_by_expert(&routing, n_exp)?;
        self.stats.record(&groups);
        let matmul = |x: &[f32], m: usize, w: &Weight, o: &mut [f32]| -> Result<(), KernelError> {
            match p {
                Precision::Fast => ops::matmul(x, m, w, o),
                Precision::Exact => ops::matmul::matmul_dequantized(x, m, w, o),
            }
        };
        out.fill(0.0);
        ops::moe_experts(xn, h, &groups, &self.experts, &matmul, out)?;
        if let Some(s) = &self.shared {
            let mut y = vec![0.0f32; t * h];
            s.ffn.forward(xn, t, &matmul, &mut y)?;
            out.par_chunks_mut(h)
                .zip(y.par_chunks(h))
                .zip(xn.par_chunks(h))
                .for_each(|((o, y), x)| {
                    let z: f32 = x.iter().zip(&s.gate).map(|(a, b)| a * b).sum();
                    let g = 1.0 / (1.0 + (-z).exp());
                    o.iter_mut().zip(y).for_each(|(o, y)| *o += g * y);
                });
        }
        Ok(())
    }
}

impl ExpertStats {
    fn record(&self, groups: &ExpertGroups) {
        if self.on.load(Ordering::Relaxed) {
            for (e, c) in self.counts.iter().enumerate() {
                c.fetch_add(groups.count(e) as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Tokens routed to each expert of each MoE layer over some steps (a token routed to k
/// experts counts once for each).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExpertCounts {
    /// Index of each MoE layer in the model, ascending.
    pub layers: Vec<usize>,
    /// `counts[i][e]`: tokens routed to expert `e` of layer `layers[i]`.
    pub counts: Vec<Vec<u64>>,
}

/// A summary of [`ExpertCounts`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExpertLoad {
    /// Token-expert assignments over every layer.
    pub assignments: u64,
    /// Most tokens any expert of any layer got.
    pub max_tokens: u64,
    /// Mean tokens per expert (over every layer's experts).
    pub mean_tokens: f64,
    /// Max ÷ mean tokens per expert within a layer, averaged over the layers that saw tokens:
    /// 1 is perfect balance, `num_experts` all tokens on one expert.
    pub imbalance: f64,
    /// The largest per-layer max ÷ mean.
    pub max_layer_imbalance: f64,
}

impl ExpertCounts {
    /// Adds `other` (counts of the same model) into these counts.
    pub fn add(&mut self, other: &ExpertCounts) {
        if self.layers.is_empty() {
            *self = other.clone();
            return;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
    }

    /// Max ÷ mean tokens per expert of MoE layer `i` (0 when it saw no tokens).
    pub fn layer_imbalance(&self, i: usize) -> f64 {
        let c = &self.counts[i];
        let total: u64 = c.iter().sum();
        match total {
            0 => 0.0,
            _ => *c.iter().max().unwrap_or(&0) as f64 * c.len() as f64 / total as f64,
        }
    }

    /// Totals and imbalance ratios.
    pub fn load(&self) -> ExpertLoad {
        let assignments: u64 = self.counts.iter().flatten().sum();
        let slots: usize = self.counts.iter().map(Vec::len).sum();
        let ratios: Vec<f64> = (0..self.counts.len())
            .map(|i| self.layer_imbalance(i))
            .filter(|&r| r > 0.0)
            .collect();
        ExpertLoad {
            assignments,
            max_tokens: self.counts.iter().flatten().copied().max().unwrap_or(0),
            mean_tokens: assignments as f64 / slots.max(1) as f64,
            imbalance: ratios.iter().sum::<f64>() / ratios.len().max(1) as f64,
            max_layer_imbalance: ratios.iter().copied().fold(0.0, f64::max),
        }
    }
}

impl Model {
    /// Switches per-expert token counting on or off (off by default: then a MoE layer pays
    /// one relaxed atomic load per step for it).
    pub fn set_expert_stats(&self, on: bool) {
        for l in &self.layers {
            if let Some(m) = l.moe() {
                m.stats.on.store(on, Ordering::Relaxed);
            }
        }
    }

    /// Tokens routed to each expert since the last call (counted while
    /// [`Model::set_expert_stats`] is on), resetting the counters; `None` for a dense model.
    pub fn take_expert_counts(&self) -> Option<ExpertCounts> {
        let mut out = ExpertCounts::default();
        for (i, l) in self.layers.iter().enumerate() {
            if let Some(m) = l.moe() {
                out.layers.push(i);
                out.counts.push(
                    m.stats
                        .counts
                        .iter()
                        .map(|c| c.swap(0, Ordering::Relaxed))
                        .collect(),
                );
            }
        }
        (!out.layers.is_empty()).then_some(out)
    }
}
