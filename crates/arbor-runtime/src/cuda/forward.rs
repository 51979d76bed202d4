//! One step of the model on the GPU (see the module documentation of [`super`]).
//!
//! Per step the host builds the layout ([`StepMeta`]), packs it with the tokens and wanted rows
//! into one buffer and uploads it into the [`super::workspace::Workspace`] with one copy; the
//! layers then run in workspace buffers, either eagerly or, for a decode step a graph serves,
//! through [`super::graph`].

use super::attend::{AttendBuffers, MetaViews, StepAttention};
use super::ffn::{self, FfnBuffers};
use super::graph;
use super::meta::{PackedLayout, StepMeta};
use super::workspace::Workspace;
use super::CudaModel;
use crate::config::ModelConfig;
use crate::model::{BatchLayout, Model};
use crate::RuntimeError;
use arbor_kernels::cuda::ops::{embedding, norm};
use arbor_kernels::cuda::Gpu;
use arbor_kernels::kv::KvCache;
use arbor_kernels::ops;

/// Which rows go through the output head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HeadRows {
    /// None.
    None,
    /// Every row, in order (no gather).
    All,
    /// The first `n` rows of the packed logit-row list.
    Gather(usize),
}

pub(super) fn run(
    m: &mut CudaModel,
    model: &Model,
    cache: &mut KvCache,
    tokens: &[u32],
    batch: &BatchLayout,
    logit_rows: &[usize],
    hidden_rows: &[usize],
) -> Result<Vec<f32>, RuntimeError> {
    let cfg = &model.cfg;
    let gpu = m.gpu.clone();
    let (t, h) = (batch.rows(), cfg.hidden_size);
    let ps = cache.layout().page_size;
    if let Some(&r) = logit_rows.iter().chain(hidden_rows).find(|&&r| r >= t) {
        return Err(RuntimeError::Request(format!(
            "row {r} is wanted from a step of {t} rows"
        )));
    }

    // Copy-on-write of shared partial pages that the host bookkeeping decided on (run before
    // the step, so a graph step needs no copy inside the graph).
    let copies = cache.pool.take_copies();
    m.copy_pages(&copies)?;
    let meta = StepMeta::build(batch, |s| cache.table(s), ps)?;
    let mode = m.graphs.mode();
    let bucket = graph::graph_bucket(mode, &meta, logit_rows);
    let packed = meta.pack(tokens, logit_rows, hidden_rows, bucket)?;
    let lay = packed.layout;
    let n_logits = logit_rows.len();
    let head = match bucket {
        Some(_) => HeadRows::All,
        None if n_logits == t && logit_rows.iter().enumerate().all(|(i, &r)| i == r) => {
            HeadRows::All
        }
        None if n_logits > 0 => HeadRows::Gather(n_logits),
        None => HeadRows::None,
    };
    let head_rows = match head {
        HeadRows::All => lay.rows,
        HeadRows::Gather(n) => n,
        HeadRows::None => 0,
    };
    let rows_needed = lay.rows.max(n_logits).max(hidden_rows.len());
    m.ws.ensure(&gpu, rows_needed, head_rows, packed.data.len())?;
    gpu.upload_into(&packed.data, &mut m.ws.meta, "the step's metadata")?;
    drop(packed);

    m.logits = None;
    let slot = usize::from(bucket.is_none());
    let reuse = &mut m.last_plan[slot];
    let opts = &model.attention;
    let step = StepAttention::prepare(&gpu, cfg, &meta, batch, cache, opts, lay.rows, reuse)?;
    let step = match bucket {
        Some(b) => graph::run(m, cfg, b, &lay, step)?,
        None => {
            layers(m, cfg, &step, &lay, head)?;
            step
        }
    };
    step.return_plans(&mut m.last_plan[slot]);
    m.logits = (n_logits > 0).then_some(n_logits);

    // Hidden states: gathered on the device, normed on the host exactly as the CPU path does.
    let nh = hidden_rows.len();
    if nh == 0 {
        return Ok(Vec::new());
    }
    let Workspace { meta, x, xs, .. } = &mut m.ws;
    let idx = meta.slice(lay.hidden_rows.range());
    norm::gather_rows(&gpu, x, h, &idx, nh, xs)?;
    let hs = gpu.download(&xs.slice(..nh * h), "hidden states")?;
    let mut out = vec![0.0f32; hs.len()];
    for (o, r) in out.chunks_exact_mut(h).zip(hs.chunks_exact(h)) {
        ops::rms_norm(r, &model.norm, cfg.rms_eps, o);
    }
    Ok(out)
}

/// The step from the embedding to the output head's GEMM, in workspace buffers, for the
/// `lay.rows` rows of the packed metadata already in the workspace. Enqueues launches only (no
/// allocation, copy or synchronisation), so that a CUDA graph can capture it; the logits land
/// in the workspace's logits buffer.
pub(super) fn layers(
    m: &mut CudaModel,
    cfg: &ModelConfig,
    attn: &StepAttention,
    lay: &PackedLayout,
    head: HeadRows,
) -> Result<(), RuntimeError> {
    let CudaModel {
        gpu,
        gemm,
        weights: w,
        pool,
        ws,
        ..
    } = m;
    let gpu: &Gpu = gpu;
    let Workspace {
        meta,
        x,
        xn,
        proj,
        q,
        o,
        xs,
        logits,
        ..
    } = ws;
    let (t, h) = (lay.rows, cfg.hidden_size);
    let tokens = meta.slice(lay.tokens.range());
    let views = MetaViews::new(meta, lay);
    embedding::embedding(gpu, &w.embed, h, &tokens, t, x)?;

    for (i, l) in w.layers.iter().enumerate() {
        if i == 0 {
            norm::rms_norm(gpu, x, &l.attn_norm, cfg.rms_eps, t, h, xn)?;
        } else {
            // The previous layer's FFN output joins the residual stream here.
            norm::add_rms_norm(gpu, x, o, &l.attn_norm, cfg.rms_eps, t, h, xn)?;
        }
        let bufs = AttendBuffers {
            xn: &mut *xn,
            proj: &mut *proj,
            q: &mut *q,
            o: &mut *o,
        };
        attn.run_layer(gpu, gemm, pool, l, &w.inv_freq, i, t, &views, bufs)?;
        norm::add_rms_norm(gpu, x, o, &l.ffn_norm, cfg.rms_eps, t, h, xn)?;
        let bufs = FfnBuffers {
            xn: &mut *xn,
            proj: &mut *proj,
            o: &mut *o,
            valid_rows: &views.real_rows,
        };
        ffn::run_layer(gpu, gemm, &mut m.moe, l, t, h, bufs)?;
    }
    // The last residual add; the output norm runs on the head's rows only.
    norm::add_inplace(gpu, x, o, t * h)?;

    let out_dim = cfg.out_dim();
    let head_w = w.head.as_ref().unwrap_or(&w.embed);
    match head {
        HeadRows::None => {}
        HeadRows::All => {
            norm::rms_norm(gpu, x, &w.norm, cfg.rms_eps, t, h, xn)?;
            gemm.matmul_bt(xn, t, head_w, out_dim, h, logits)?;
        }
        HeadRows::Gather(n) => {
            let idx = meta.slice(lay.logit_rows.range());
            norm::gather_rows(gpu, x, h, &idx, n, xs)?;
            norm::rms_norm(gpu, xs, &w.norm, cfg.rms_eps, n, h, xn)?;
            gemm.matmul_bt(xn, n, head_w, out_dim, h, logits)?;
        }
    }
    Ok(())
}
