//! One step of the model on the GPU (see the module documentation of [`super`]).

use super::attend::{AttendBuffers, StepAttention};
use super::ffn::{self, FfnBuffers};
use super::meta::StepMeta;
use super::CudaModel;
use crate::model::{BatchLayout, Model};
use crate::RuntimeError;
use arbor_kernels::cuda::cudarc::driver::CudaSlice;
use arbor_kernels::cuda::ops::{embedding, kv, norm};
use arbor_kernels::kv::KvCache;
use arbor_kernels::ops;
use half::bf16;

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
    let (t, h, hd) = (batch.rows(), cfg.hidden_size, cfg.head_dim);
    let (qd, kvd, inter) = (
        cfg.num_heads * hd,
        cfg.num_kv_heads * hd,
        cfg.intermediate_size,
    );
    let qkv_w = qd + 2 * kvd;
    let ps = cache.layout().page_size;

    // Copy-on-write of shared partial pages that the host bookkeeping decided on.
    let copies: Vec<(u32, u32, u32)> = cache
        .pool
        .take_copies()
        .into_iter()
        .map(|(s, d, n)| (s, d, n as u32))
        .collect();
    if !copies.is_empty() {
        kv::copy_pages(&gpu, &mut m.pool, &copies)?;
    }
    let meta = StepMeta::build(batch, |s| cache.table(s), ps)?;
    let step = StepAttention::prepare(&gpu, cfg, &meta)?;
    let d_tokens = gpu.upload(tokens, "the step's tokens")?;

    let w = &m.weights;
    let mut x = gpu.zeros::<f32>(t * h, "hidden states")?;
    let mut xn = gpu.zeros::<bf16>(t * h.max(qd).max(inter), "normed activations")?;
    let mut proj = gpu.zeros::<f32>(t * qkv_w.max(2 * inter).max(h), "projections")?;
    let mut q = gpu.zeros::<f32>(t * qd, "queries")?;
    let mut o = gpu.zeros::<f32>(t * h, "layer outputs")?;
    embedding::embedding(&gpu, &w.embed, h, &d_tokens, t, &mut x)?;

    for (i, l) in w.layers.iter().enumerate() {
        if i == 0 {
            norm::rms_norm(&gpu, &x, &l.attn_norm, cfg.rms_eps, t, h, &mut xn)?;
        } else {
            // The previous layer's FFN output joins the residual stream here.
            norm::add_rms_norm(&gpu, &mut x, &o, &l.attn_norm, cfg.rms_eps, t, h, &mut xn)?;
        }
        let bufs = AttendBuffers {
            xn: &mut xn,
            proj: &mut proj,
            q: &mut q,
            o: &mut o,
        };
        step.run_layer(&gpu, &mut m.gemm, &mut m.pool, l, &w.inv_freq, i, t, bufs)?;
        norm::add_rms_norm(&gpu, &mut x, &o, &l.ffn_norm, cfg.rms_eps, t, h, &mut xn)?;
        let bufs = FfnBuffers {
            xn: &mut xn,
            proj: &mut proj,
            o: &mut o,
        };
        ffn::run_layer(&gpu, &mut m.gemm, l, t, h, bufs)?;
    }
    // Last residual add (the norm written here is not used: the head reads only its rows).
    norm::add_rms_norm(&gpu, &mut x, &o, &w.norm, cfg.rms_eps, t, h, &mut xn)?;

    // Output head on the wanted rows: gather them, norm, GEMM.
    let n = logit_rows.len();
    m.logits = None;
    if n > 0 {
        let idx: Vec<u32> = logit_rows.iter().map(|&r| r as u32).collect();
        let d_idx = gpu.upload(&idx, "logit rows")?;
        let mut xs = gpu.zeros::<f32>(n * h, "logit-row states")?;
        norm::gather_rows(&gpu, &x, h, &d_idx, n, &mut xs)?;
        let mut xsn = gpu.zeros::<bf16>(n * h, "normed logit rows")?;
        norm::rms_norm(&gpu, &xs, &w.norm, cfg.rms_eps, n, h, &mut xsn)?;
        let out_dim = cfg.out_dim();
        let mut logits: CudaSlice<f32> = gpu.zeros::<f32>(n * out_dim, "logits")?;
        let head = w.head.as_ref().unwrap_or(&w.embed);
        m.gemm.matmul_bt(&xsn, n, head, out_dim, h, &mut logits)?;
        m.logits = Some((logits, n * out_dim));
    }

    // Hidden states: gathered on the device, normed on the host exactly as the CPU path does.
    if hidden_rows.is_empty() {
        return Ok(Vec::new());
    }
    let idx: Vec<u32> = hidden_rows.iter().map(|&r| r as u32).collect();
    let d_idx = gpu.upload(&idx, "hidden rows")?;
    let mut xs = gpu.zeros::<f32>(idx.len() * h, "hidden-row states")?;
    norm::gather_rows(&gpu, &x, h, &d_idx, idx.len(), &mut xs)?;
    let mut hs = gpu.download(&xs, "hidden states")?;
    hs.truncate(idx.len() * h);
    let mut out = vec![0.0f32; hs.len()];
    for (o, r) in out.chunks_exact_mut(h).zip(hs.chunks_exact(h)) {
        ops::rms_norm(r, &model.norm, cfg.rms_eps, o);
    }
    Ok(out)
}
