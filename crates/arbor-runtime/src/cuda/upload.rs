//! Weights to the GPU: every matrix dequantised to bf16 on upload (DESIGN.md), vectors kept
//! f32. One matrix is widened on the host at a time, so the host peak is one f32 matrix.

use crate::model::{DecoderLayer, Ffn, Head, Model};
use crate::RuntimeError;
use arbor_kernels::cuda::cudarc::driver::CudaSlice;
use arbor_kernels::cuda::Gpu;
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
    /// Gate and up stacked by rows (gate first), `2·inter × hidden`.
    pub gate_up: CudaSlice<bf16>,
    pub down: CudaSlice<bf16>,
    /// The FFN's intermediate size.
    pub inter: usize,
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

impl GpuWeights {
    /// Uploads `model`. MoE layers are not on the GPU yet: a clear error.
    pub fn upload(gpu: &Gpu, model: &Model) -> Result<Self, RuntimeError> {
        let mut bytes = 0usize;
        let mut matrix = |w: &Weight, what: &str| -> Result<CudaSlice<bf16>, RuntimeError> {
            bytes += w.rows * w.cols * 2;
            upload_bf16(gpu, w, what)
        };
        let embed = matrix(&model.embed, "the token embedding")?;
        let (head, head_bias) = match &model.head {
            Head::Tied => (None, None),
            Head::Lm(w) => (Some(matrix(w, "the LM head")?), None),
            Head::Score { weight, bias } => {
                (Some(matrix(weight, "the reward head")?), bias.clone())
            }
        };
        let mut layers = Vec::with_capacity(model.layers.len());
        for (i, l) in model.layers.iter().enumerate() {
            layers.push(upload_layer(gpu, l, i, &mut matrix)?);
        }
        let vec = |v: &[f32], what: &str| gpu.upload(v, what).map_err(RuntimeError::from);
        Ok(GpuWeights {
            embed,
            head,
            head_bias,
            norm: vec(&model.norm, "the output norm")?,
            layers,
            inv_freq: vec(model.rope.inv_freq(), "the RoPE frequencies")?,
            bytes,
        })
    }
}

fn upload_layer(
    gpu: &Gpu,
    l: &DecoderLayer,
    i: usize,
    matrix: &mut impl FnMut(&Weight, &str) -> Result<CudaSlice<bf16>, RuntimeError>,
) -> Result<GpuLayer, RuntimeError> {
    let Ffn::Dense { gate_up, down } = &l.ffn else {
        return Err(RuntimeError::Config(format!(
            "layer {i} is a mixture-of-experts layer, which the CUDA backend does not run yet: use --device cpu"
        )));
    };
    let vec = |v: &[f32], what: &str| gpu.upload(v, what).map_err(RuntimeError::from);
    let opt = |v: &Option<Vec<f32>>, what: &str| v.as_deref().map(|v| vec(v, what)).transpose();
    Ok(GpuLayer {
        attn_norm: vec(&l.attn_norm, "an attention norm")?,
        qkv: matrix(&l.qkv, "a QKV projection")?,
        qkv_bias: opt(&l.qkv_bias, "a QKV bias")?,
        q_norm: opt(&l.q_norm, "a q-norm")?,
        k_norm: opt(&l.k_norm, "a k-norm")?,
        wo: matrix(&l.wo, "an output projection")?,
        ffn_norm: vec(&l.ffn_norm, "an FFN norm")?,
        gate_up: matrix(gate_up, "a gate/up projection")?,
        down: matrix(down, "a down projection")?,
        inter: down.cols,
    })
}

/// Dequantises `w` to bf16 (round to nearest even) and uploads it.
fn upload_bf16(gpu: &Gpu, w: &Weight, what: &str) -> Result<CudaSlice<bf16>, RuntimeError> {
    let f = w.to_f32()?;
    let b: Vec<bf16> = f.par_iter().map(|&x| bf16::from_f32(x)).collect();
    drop(f);
    Ok(gpu.upload(&b, what)?)
}
