//! Weights to the GPU: every matrix dequantised to bf16 on upload (DESIGN.md), vectors kept
//! f32. One matrix is widened on the host at a time, so the host peak is one f32 matrix; a MoE
//! layer's experts are stacked on the device one expert at a time.

use super::moe::{self, GpuMoe};
use crate::model::{DecoderLayer, Ffn, Head, Model};
use crate::RuntimeError;
use arbor_kernels::cuda::cudarc::driver::CudaSlice;
use arbor_kernels::cuda::{Gpu, GpuError};
use arbor_kernels::Weight;
use half::bf16;
use rayon::prelude::*;

/// One decoder layer's weights on the GPU.
pub struct GpuLayer {
    pub attn_norm: CudaSlice<f32>,
    pub qkv: CudaSlice<bf16>,
    pub qkv_bias: Option<CudaSlice<f32>>,
    pub q_norm: Option<CudaSlice<f32>>,
    pub k_norm: Option<CudaSlice<f32>>,
    pub wo: CudaSlice<bf16>,
    pub ffn_norm: CudaSlice<f32>,
    pub ffn: GpuFfn,
}

/// A layer's feed-forward block on the GPU (as [`Ffn`]).
pub enum GpuFfn {
    /// SwiGLU: gate and up stacked by rows (gate first), `2·inter × hidden`; down
    /// `hidden × inter`.
    Dense {
        gate_up: CudaSlice<bf16>,
        down: CudaSlice<bf16>,
        /// The FFN's intermediate size.
        inter: usize,
    },
    /// Mixture of experts.
    Moe(Box<GpuMoe>),
}

/// The whole model's weights on the GPU.
pub struct GpuWeights {
    pub embed: CudaSlice<bf16>,
    /// `None` when the head is tied to the embedding.
    pub head: Option<CudaSlice<bf16>>,
    /// A reward head's bias, added on the host after the head's GEMM.
    pub head_bias: Option<Vec<f32>>,
    pub norm: CudaSlice<f32>,
    pub layers: Vec<GpuLayer>,
    pub inv_freq: CudaSlice<f32>,
    /// Bytes of device memory the weights take.
    pub bytes: usize,
}

/// Uploads weights to one GPU, counting the bytes of the bf16 matrices.
pub(super) struct Uploader<'a> {
    pub gpu: &'a Gpu,
    pub bytes: usize,
}

impl Uploader<'_> {
    /// `w` dequantised to bf16 (round to nearest even).
    pub fn matrix(&mut self, w: &Weight, what: &str) -> Result<CudaSlice<bf16>, RuntimeError> {
        self.bytes += w.rows * w.cols * 2;
        let b = to_bf16(w)?;
        Ok(self.gpu.upload(&b, what)?)
    }

    /// Matrices of one shape stacked into one buffer (`ws.len() × rows × cols`), uploaded one
    /// at a time. Errors if the shapes differ.
    pub fn stacked(&mut self, ws: &[&Weight], what: &str) -> Result<CudaSlice<bf16>, RuntimeError> {
        let Some(first) = ws.first() else {
            return Ok(self.gpu.zeros(0, what)?);
        };
        let (rows, cols) = (first.rows, first.cols);
        if let Some(w) = ws.iter().find(|w| (w.rows, w.cols) != (rows, cols)) {
            return Err(RuntimeError::Config(format!(
                "{what}: matrices of {rows}×{cols} and {}×{} cannot be stacked",
                w.rows, w.cols
            )));
        }
        let each = rows * cols;
        let mut dev = self.gpu.zeros::<bf16>(ws.len() * each, what)?;
        for (i, w) in ws.iter().enumerate() {
            let b = to_bf16(w)?;
            let mut dst = dev.slice_mut(i * each..(i + 1) * each);
            self.gpu
                .stream()
                .memcpy_htod(&b, &mut dst)
                .map_err(|e| GpuError::driver(format!("copying {what} to the GPU"), e))?;
        }
        self.bytes += ws.len() * each * 2;
        Ok(dev)
    }

    /// An f32 vector.
    pub fn vector(&self, v: &[f32], what: &str) -> Result<CudaSlice<f32>, RuntimeError> {
        Ok(self.gpu.upload(v, what)?)
    }
}

impl GpuWeights {
    /// Uploads `model`, MoE layers with their experts stacked (see [`GpuMoe`]).
    pub fn upload(gpu: &Gpu, model: &Model) -> Result<Self, RuntimeError> {
        let mut up = Uploader { gpu, bytes: 0 };
        let embed = up.matrix(&model.embed, "the token embedding")?;
        let (head, head_bias) = match &model.head {
            Head::Tied => (None, None),
            Head::Lm(w) => (Some(up.matrix(w, "the LM head")?), None),
            Head::Score { weight, bias } => {
                (Some(up.matrix(weight, "the reward head")?), bias.clone())
            }
        };
        let mut layers = Vec::with_capacity(model.layers.len());
        let mut moe_slot = 0;
        for (i, l) in model.layers.iter().enumerate() {
            layers.push(upload_layer(&mut up, l, i, &mut moe_slot)?);
        }
        Ok(GpuWeights {
            embed,
            head,
            head_bias,
            norm: up.vector(&model.norm, "the output norm")?,
            layers,
            inv_freq: up.vector(model.rope.inv_freq(), "the RoPE frequencies")?,
            bytes: up.bytes,
        })
    }
}

/// Uploads layer `i`; `moe_slot` counts the MoE layers uploaded so far (each one's row of the
/// expert statistics).
fn upload_layer(
    up: &mut Uploader,
    l: &DecoderLayer,
    i: usize,
    moe_slot: &mut usize,
) -> Result<GpuLayer, RuntimeError> {
    let opt = |up: &Uploader, v: &Option<Vec<f32>>, what: &str| {
        v.as_deref().map(|v| up.vector(v, what)).transpose()
    };
    let ffn = match &l.ffn {
        Ffn::Dense { gate_up, down } => GpuFfn::Dense {
            gate_up: up.matrix(gate_up, "a gate/up projection")?,
            down: up.matrix(down, "a down projection")?,
            inter: down.cols,
        },
        Ffn::Moe(block) => {
            let m = moe::upload(up, block, i, *moe_slot)?;
            *moe_slot += 1;
            GpuFfn::Moe(Box::new(m))
        }
    };
    Ok(GpuLayer {
        attn_norm: up.vector(&l.attn_norm, "an attention norm")?,
        qkv: up.matrix(&l.qkv, "a QKV projection")?,
        qkv_bias: opt(up, &l.qkv_bias, "a QKV bias")?,
        q_norm: opt(up, &l.q_norm, "a q-norm")?,
        k_norm: opt(up, &l.k_norm, "a k-norm")?,
        wo: up.matrix(&l.wo, "an output projection")?,
        ffn_norm: up.vector(&l.ffn_norm, "an FFN norm")?,
        ffn,
    })
}

/// `w` dequantised to bf16 (round to nearest even).
fn to_bf16(w: &Weight) -> Result<Vec<bf16>, RuntimeError> {
    let f = w.to_f32()?;
    Ok(f.par_iter().map(|&x| bf16::from_f32(x)).collect())
}
