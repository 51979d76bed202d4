//! One decoder layer, parameterised by the config: GQA attention (optional qkv bias, q/k
//! norm, sliding window) over the paged KV cache, and the feed-forward block.

use super::batch::BatchLayout;
use super::linear::{linear, Precision};
use super::moe::MoeBlock;
use super::scratch::{sized, with_scratch};
use super::source::TensorSource;
use crate::config::ModelConfig;
use crate::RuntimeError;
use arbor_kernels::kv::KvCache;
use arbor_kernels::ops::cascade::{self, CascadeMode, CascadePlan, SelectionStart, SparseParams};
use arbor_kernels::ops::{self, RopeTable};
use arbor_kernels::weight::WeightData;
use arbor_kernels::Weight;
use rayon::prelude::*;

/// What every layer of a model shares during a forward pass.
#[derive(Clone, Copy)]
pub struct LayerCtx<'a> {
    pub cfg: &'a ModelConfig,
    pub rope: &'a RopeTable,
    pub precision: Precision,
    /// The batch's cascade plan, and how to run it, when attention goes through it (shared
    /// pages or sparse rows).
    pub tree: Option<TreeCtx<'a>>,
}

/// A forward pass's cascade attention: the plan every layer runs, and for sparse rows what
/// their page selection starts from (the same in every layer; only the ranking is per layer).
#[derive(Clone, Copy)]
pub struct TreeCtx<'a> {
    pub plan: &'a CascadePlan,
    pub mode: CascadeMode,
    pub sparse: SparseParams,
    /// `Some` when a row has a sparse budget.
    pub start: Option<&'a SelectionStart>,
}

/// The feed-forward block.
pub enum Ffn {
    /// SwiGLU: gate and up fused into one `2·intermediate × hidden` matrix (gate rows first).
    Dense { gate_up: Weight, down: Weight },
    /// Mixture of experts (see [`MoeBlock`]); layer by layer as the config's
    /// [`crate::config::MoeConfig::is_moe_layer`] says.
    Moe(Box<MoeBlock>),
}

impl Ffn {
    /// Bytes of weights held.
    pub fn nbytes(&self) -> usize {
        match self {
            Ffn::Dense { gate_up, down } => gate_up.nbytes() + down.nbytes(),
            Ffn::Moe(m) => m.nbytes(),
        }
    }
}

/// Weights of one layer.
pub struct DecoderLayer {
    pub(crate) attn_norm: Vec<f32>,
    /// q, k and v projections stacked by rows.
    pub(crate) qkv: Weight,
    pub(crate) qkv_bias: Option<Vec<f32>>,
    pub(crate) q_norm: Option<Vec<f32>>,
    pub(crate) k_norm: Option<Vec<f32>>,
    pub(crate) wo: Weight,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) ffn: Ffn,
}

/// Stacks matrices with equal columns by rows (one matmul instead of several, so activations
/// are read and quantised once). Parts of one storage type become one matrix; mixed types (a
/// Q4_K_M file's q/k/v mix Q4_K and Q6_K) stay parts of a stacked weight, each multiplied in
/// its own type (widening them to f32 would read several times the bytes).
pub fn stack_rows(parts: Vec<Weight>) -> Result<Weight, RuntimeError> {
    let cols = parts[0].cols;
    let rows = parts.iter().map(|w| w.rows).sum();
    let ty = parts[0].ty();
    let mut out = parts[0].data.clone();
    let uniform = parts.iter().all(|w| w.cols == cols && w.ty() == ty);
    for w in &parts[1..] {
        match (&mut out, &w.data) {
            (WeightData::F32(a), WeightData::F32(b)) if uniform => a.extend_from_slice(b),
            (WeightData::Raw { bytes: a, .. }, WeightData::Raw { bytes: b, .. }) if uniform => {
                a.extend_from_slice(b)
            }
            _ => return Ok(Weight::stacked(parts)?),
        }
    }
    Ok(Weight {
        rows,
        cols,
        data: out,
    })
}

impl DecoderLayer {
    /// Loads layer `i` from `src`.
    pub fn load(src: &TensorSource, cfg: &ModelConfig, i: usize) -> Result<Self, RuntimeError> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let n = |s: &str| format!("blk.{i}.{s}");
        let qkv = stack_rows(vec![
            src.req_matrix(&n("attn_q.weight"), qd, h)?,
            src.req_matrix(&n("attn_k.weight"), kvd, h)?,
            src.req_matrix(&n("attn_v.weight"), kvd, h)?,
        ])?;
        let qkv_bias = match src.vector(&n("attn_q.bias"), qd)? {
            None => None,
            Some(mut b) => {
                b.extend(src.req_vector(&n("attn_k.bias"), kvd)?);
                b.extend(src.req_vector(&n("attn_v.bias"), kvd)?);
                Some(b)
            }
        };
        let ffn = if cfg.is_moe_layer(i) {
            Ffn::Moe(Box::new(MoeBlock::load(src, cfg, i)?))
        } else {
            Ffn::Dense {
                gate_up: stack_rows(vec![
                    src.req_matrix(&n("ffn_gate.weight"), cfg.intermediate_size, h)?,
                    src.req_matrix(&n("ffn_up.weight"), cfg.intermediate_size, h)?,
                ])?,
                down: src.req_matrix(&n("ffn_down.weight"), h, cfg.intermediate_size)?,
            }
        };
        Ok(DecoderLayer {
            attn_norm: src.req_vector(&n("attn_norm.weight"), h)?,
            qkv,
            qkv_bias,
            q_norm: src.vector(&n("attn_q_norm.weight"), hd)?,
            k_norm: src.vector(&n("attn_k_norm.weight"), hd)?,
            wo: src.req_matrix(&n("attn_output.weight"), h, qd)?,
            ffn_norm: src.req_vector(&n("ffn_norm.weight"), h)?,
            ffn,
        })
    }

    /// Bytes of weights held.
    pub fn nbytes(&self) -> usize {
        self.qkv.nbytes() + self.wo.nbytes() + self.ffn.nbytes()
    }

    /// The layer's matrices: projections, FFN or experts (shared expert included) and router.
    pub(crate) fn weights(&self) -> impl Iterator<Item = &Weight> {
        let ffn: Vec<&Weight> = match &self.ffn {
            Ffn::Dense { gate_up, down } => vec![gate_up, down],
            Ffn::Moe(m) => {
                let experts = m.experts.iter().chain(m.shared.as_ref().map(|s| &s.ffn));
                std::iter::once(&m.router)
                    .chain(experts.flat_map(|e| [&e.gate_up, &e.down]))
                    .collect()
            }
        };
        [&self.qkv, &self.wo].into_iter().chain(ffn)
    }

    /// [`DecoderLayer::weights`], mutably.
    pub(crate) fn weights_mut(&mut self) -> impl Iterator<Item = &mut Weight> {
        let ffn: Vec<&mut Weight> = match &mut self.ffn {
            Ffn::Dense { gate_up, down } => vec![gate_up, down],
            Ffn::Moe(m) => {
                let m = &mut **m;
                let experts = m
                    .experts
                    .iter_mut()
                    .chain(m.shared.as_mut().map(|s| &mut s.ffn));
                std::iter::once(&mut m.router)
                    .chain(experts.flat_map(|e| [&mut e.gate_up, &mut e.down]))
                    .collect()
            }
        };
        [&mut self.qkv, &mut self.wo].into_iter().chain(ffn)
    }

    /// The layer's MoE block, if its FFN is one.
    pub fn moe(&self) -> Option<&MoeBlock> {
        match &self.ffn {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense { .. } => None,
        }
    }

    /// Runs the layer on the batch's hidden states `x` (`rows × hidden`, updated in place),
    /// writing this layer's K/V of every row into `cache`.
    pub fn forward(
        &self,
        layer: usize,
        ctx: &LayerCtx,
        batch: &BatchLayout,
        cache: &mut KvCache,
        x: &mut [f32],
    ) -> Result<(), RuntimeError> {
        let LayerCtx {
            cfg,
            rope,
            precision,
            ..
        } = *ctx;
        let (h, hd, t) = (cfg.hidden_size, cfg.head_dim, batch.rows());
        let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let qkv_w = qd + 2 * kvd;

        with_scratch(|sc| {
            // Attention block.
            let xn = sized(&mut sc.xn, t * h);
            xn.par_chunks_mut(h)
                .zip(x.par_chunks(h))
                .for_each(|(o, xi)| ops::rms_norm(xi, &self.attn_norm, cfg.rms_eps, o));
            let qkv = sized(&mut sc.qkv, t * qkv_w);
            linear(precision, xn, t, &self.qkv, qkv)?;
            let q = sized(&mut sc.q, t * qd);
            let k = sized(&mut sc.k, t * kvd);
            let v = sized(&mut sc.v, t * kvd);
            for r in 0..t {
                let row = &mut qkv[r * qkv_w..(r + 1) * qkv_w];
                if let Some(b) = &self.qkv_bias {
                    row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                }
                q[r * qd..(r + 1) * qd].copy_from_slice(&row[..qd]);
                k[r * kvd..(r + 1) * kvd].copy_from_slice(&row[qd..qd + kvd]);
                v[r * kvd..(r + 1) * kvd].copy_from_slice(&row[qd + kvd..]);
            }
            if let Some(w) = &self.q_norm {
                ops::rms_norm_rows(q, w, cfg.rms_eps);
            }
            if let Some(w) = &self.k_norm {
                ops::rms_norm_rows(k, w, cfg.rms_eps);
            }
            rope.apply(q, &batch.positions, cfg.num_heads, hd);
            rope.apply(k, &batch.positions, cfg.num_kv_heads, hd);
            for s in &batch.seqs {
                for r in s.rows() {
                    let kr = &k[r * kvd..(r + 1) * kvd];
                    let vr = &v[r * kvd..(r + 1) * kvd];
                    cache.write(layer, s.seq, batch.positions[r], kr, vr);
                }
            }
            let params = cfg.attention_params();
            let attn = sized(&mut sc.attn, t * qd);
            if let Some(tc) = ctx.tree {
                // Pages shared by several sequences are read once for all of their rows.
                let pool = &cache.pool;
                let sel = (tc.start).and_then(|st| {
                    cascade::select_pages_from(q, tc.plan, st, pool, layer, &params, &tc.sparse)
                });
                tc.mode
                    .attend(q, tc.plan, pool, layer, &params, sel.as_ref(), attn);
            } else {
                for s in &batch.seqs {
                    let rows = s.rows();
                    let table = cache.table(s.seq).ok_or_else(|| {
                        RuntimeError::Request(format!("sequence {} has no KV cache", s.seq))
                    })?;
                    ops::paged_attention(
                        &q[rows.start * qd..rows.end * qd],
                        &batch.positions[rows.clone()],
                        &cache.pool,
                        layer,
                        table,
                        &params,
                        &mut attn[rows.start * qd..rows.end * qd],
                    );
                }
            }
            let o = sized(&mut sc.o, t * h);
            linear(precision, attn, t, &self.wo, o)?;

            // Feed-forward block.
            x.par_chunks_mut(h)
                .zip(o.par_chunks(h))
                .zip(xn.par_chunks_mut(h))
                .for_each(|((xi, oi), ni)| {
                    ops::add_rms_norm(xi, oi, &self.ffn_norm, cfg.rms_eps, ni)
                });
            match &self.ffn {
                Ffn::Dense { gate_up, down } => {
                    let inter = cfg.intermediate_size;
                    let gu = sized(&mut sc.gu, t * 2 * inter);
                    linear(precision, xn, t, gate_up, gu)?;
                    let act = sized(&mut sc.act, t * inter);
                    act.par_chunks_mut(inter)
                        .zip(gu.par_chunks(2 * inter))
                        .for_each(|(a, g)| ops::swiglu(&g[..inter], &g[inter..], a));
                    linear(precision, act, t, down, o)?;
                }
                Ffn::Moe(m) => m.forward(precision, xn, t, o)?,
            }
            x.iter_mut().zip(&*o).for_each(|(a, b)| *a += b);
            Ok(())
        })
    }
}
