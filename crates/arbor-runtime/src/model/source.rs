//! Where weights come from: a GGUF file or HF safetensors. Tensors are asked for by their
//! GGUF name (`blk.3.attn_q.weight`); HF names are mapped to it.

use crate::gguf::GgufFile;
use crate::safetensors::SafeTensors;
use crate::RuntimeError;
use arbor_kernels::quant::{dequantize, GgmlType};
use arbor_kernels::Weight;

/// An opened weight file set.
pub enum TensorSource {
    Gguf(GgufFile),
    Safetensors(SafeTensors),
    /// Tensors built in memory (e.g. [`crate::dummy`]), keyed by GGUF name.
    Memory(std::collections::HashMap<String, MemTensor>),
}

/// One in-memory tensor: shape as [rows, cols] (outer first), type and raw bytes.
pub struct MemTensor {
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub bytes: Vec<u8>,
}

/// The HF safetensors name of a GGUF-named tensor.
pub fn hf_name(gguf: &str) -> String {
    if let Some(rest) = gguf.strip_prefix("blk.") {
        let (layer, what) = rest.split_once('.').unwrap_or((rest, ""));
        let (part, suffix) = what.rsplit_once('.').unwrap_or((what, "weight"));
        let hf = match part {
            "attn_norm" => "input_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            "ffn_norm" => "post_attention_layernorm",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            other => other,
        };
        return format!("model.layers.{layer}.{hf}.{suffix}");
    }
    match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        other => other.into(),
    }
}

fn tensor_err(name: &str, detail: impl Into<String>) -> RuntimeError {
    RuntimeError::Tensor {
        name: name.to_string(),
        detail: detail.into(),
    }
}

impl TensorSource {
    /// Shape as [rows, cols] (outer first), and the raw bytes and type, if the tensor exists.
    fn raw(&self, name: &str) -> Option<(Vec<usize>, GgmlType, &[u8])> {
        match self {
            TensorSource::Gguf(f) => {
                let t = f.tensor(name)?;
                let shape = t.dims.iter().rev().map(|&d| d as usize).collect();
                Some((shape, t.ty, f.tensor_data(t)))
            }
            TensorSource::Safetensors(st) => {
                let t = st.get(&hf_name(name))?;
                Some((t.shape.clone(), t.dtype, st.data(t)))
            }
            TensorSource::Memory(m) => m
                .get(name)
                .map(|t| (t.shape.clone(), t.ty, t.bytes.as_slice())),
        }
    }

    /// True if the tensor exists.
    pub fn has(&self, name: &str) -> bool {
        self.raw(name).is_some()
    }

    /// A `rows × cols` matrix kept in its stored type; `None` if absent, an error if its shape
    /// differs from the config's.
    pub fn matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Weight>, RuntimeError> {
        let Some((shape, ty, bytes)) = self.raw(name) else {
            return Ok(None);
        };
        if shape != [rows, cols] {
            return Err(tensor_err(
                name,
                format!("shape {shape:?}, but the model config implies [{rows}, {cols}]"),
            ));
        }
        Weight::from_raw(rows, cols, ty, bytes.to_vec())
            .map(Some)
            .map_err(|e| tensor_err(name, e.to_string()))
    }

    /// A required matrix.
    pub fn req_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight, RuntimeError> {
        self.matrix(name, rows, cols)?
            .ok_or_else(|| tensor_err(name, "missing from the weights"))
    }

    /// A vector of `len` values as f32; `None` if absent.
    pub fn vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, RuntimeError> {
        let Some((shape, ty, bytes)) = self.raw(name) else {
            return Ok(None);
        };
        if shape.iter().product::<usize>() != len || shape.len() != 1 {
            return Err(tensor_err(
                name,
                format!("shape {shape:?}, but the model config implies [{len}]"),
            ));
        }
        let mut out = vec![0.0; len];
        dequantize(ty, bytes, &mut out).map_err(|e| tensor_err(name, e.to_string()))?;
        Ok(Some(out))
    }

    /// A required vector.
    pub fn req_vector(&self, name: &str, len: usize) -> Result<Vec<f32>, RuntimeError> {
        self.vector(name, len)?
            .ok_or_else(|| tensor_err(name, "missing from the weights"))
    }

    /// Short description of the storage types used, e.g. "Q4_1 (210), Q8_0 (1), F32 (61)".
    pub fn type_summary(&self) -> String {
        let mut counts: Vec<(GgmlType, usize)> = Vec::new();
        let mut add = |ty| match counts.iter_mut().find(|(t, _)| *t == ty) {
            Some((_, n)) => *n += 1,
            None => counts.push((ty, 1)),
        };
        match self {
            TensorSource::Gguf(f) => f.header.tensors.iter().for_each(|t| add(t.ty)),
            TensorSource::Safetensors(st) => st
                .names()
                .filter_map(|n| st.get(n))
                .for_each(|t| add(t.dtype)),
            TensorSource::Memory(m) => m.values().for_each(|t| add(t.ty)),
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts
            .iter()
            .map(|(t, n)| format!("{t} ({n})"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
