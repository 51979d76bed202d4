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
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// One layer's MoE block.
pub struct MoeBlock {
    /// `num_experts × hidden`.
    pub(crate) router: Weight,
    pub(crate) experts: Vec<ExpertFfn>,
    pub(crate) shared: Option<SharedExpert>,
    pub(crate) top_k: usize,
    pub(crate) renormalize: bool,
    stats: ExpertStats,
    replay: RoutingReplay,
}

/// Qwen2-MoE's shared expert: every token goes through it, scaled by `sigmoid(gate · x)`.
pub(crate) struct SharedExpert {
    pub(crate) ffn: ExpertFfn,
    pub(crate) gate: Vec<f32>,
}

/// Routing to use instead of the router's in the coming forward passes (see
/// [`Model::replay_routing`]), and how far it strayed from the router's own choice.
#[derive(Default)]
struct RoutingReplay {
    /// `rows × top_k` expert ids per forward pass, oldest first.
    queue: Mutex<VecDeque<Vec<u32>>>,
    /// Largest [`ops::routing_regret`] since the last take, as f32 bits (non-negative
    /// floats order as their bits do).
    regret: AtomicU32,
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
            replay: RoutingReplay::default(),
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
        let replayed = self
            .replay
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front();
        let routing = match replayed {
            Some(given) => {
                let r = ops::route_given(&logits, n_exp, self.top_k, &given, self.renormalize)?;
                let regret = ops::routing_regret(&logits, n_exp, &r);
                self.replay
                    .regret
                    .fetch_max(regret.to_bits(), Ordering::Relaxed);
                r
            }
            None => ops::route_softmax_topk(&logits, n_exp, self.top_k, self.renormalize)?,
        };
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

    /// Routing replay: the next forward pass of each MoE layer sends its tokens to the given
    /// experts instead of its router's top k, weighted by the router's own probabilities of
    /// them (as [`ops::route_given`]). `per_layer[i]` is for the i-th MoE layer in layer
    /// order: `rows × top_k` expert ids for the rows the pass computes, in order. Each call
    /// queues one forward pass; the queue is used up one entry per pass. For reproducing
    /// routing recorded elsewhere, e.g. on a GPU whose rounding broke a near-tie between two
    /// experts the other way (see [`Model::take_replay_regret`]). Errors, queueing nothing,
    /// on a dense model, a count of layers other than the model's MoE layers, or an expert id
    /// out of range; a pass whose row count does not match its entry fails with an error,
    /// leaving the later layers' entries queued ([`Model::drop_routing_replay`]).
    pub fn replay_routing(&self, per_layer: Vec<Vec<u32>>) -> Result<(), RuntimeError> {
        let blocks: Vec<&MoeBlock> = self.layers.iter().filter_map(|l| l.moe()).collect();
        if blocks.is_empty() || blocks.len() != per_layer.len() {
            return Err(RuntimeError::Request(format!(
                "routing replay: {} layers' routing given, the model has {} MoE layers",
                per_layer.len(),
                blocks.len()
            )));
        }
        for (i, (m, ids)) in blocks.iter().zip(&per_layer).enumerate() {
            let n_exp = m.experts.len();
            if !ids.len().is_multiple_of(m.top_k) {
                return Err(RuntimeError::Request(format!(
                    "routing replay: MoE layer {i} got {} expert ids, not a multiple of top_k {}",
                    ids.len(),
                    m.top_k
                )));
            }
            if let Some(bad) = ids.iter().find(|&&e| e as usize >= n_exp) {
                return Err(RuntimeError::Request(format!(
                    "routing replay: MoE layer {i} has no expert {bad} ({n_exp} experts)"
                )));
            }
        }
        for (m, ids) in blocks.into_iter().zip(per_layer) {
            let mut q = m
                .replay
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            q.push_back(ids);
        }
        Ok(())
    }

    /// Drops every queued routing replay (an engine does after a failed step, whose later
    /// layers never took theirs).
    pub fn drop_routing_replay(&self) {
        for m in self.layers.iter().filter_map(|l| l.moe()) {
            m.replay
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }

    /// The largest router-logit regret of the routing replayed since the last call: over the
    /// tokens of every MoE layer, how far the lowest replayed expert's router logit fell below
    /// the router's own k-th choice ([`ops::routing_regret`]); 0 when the replay matched
    /// the router's top k. Resets it.
    pub fn take_replay_regret(&self) -> f32 {
        self.layers
            .iter()
            .filter_map(|l| l.moe())
            .map(|m| f32::from_bits(m.replay.regret.swap(0, Ordering::Relaxed)))
            .fold(0.0, f32::max)
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
