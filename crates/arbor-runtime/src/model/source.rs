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

/// The HF safetensors name of a GGUF-named tensor (the first of [`hf_names`]).
pub fn hf_name(gguf: &str) -> String {
    hf_names(gguf).swap_remove(0)
}

/// Every HF safetensors name a GGUF-named tensor may have, most common first (MoE tensors
/// are named differently by Mixtral and the Qwen MoE families; see `moe_hf_names`).
pub fn hf_names(gguf: &str) -> Vec<String> {
    if let Some(rest) = gguf.strip_prefix("blk.") {
        let (layer, what) = rest.split_once('.').unwrap_or((rest, ""));
        if let Some(names) = moe_hf_names(layer, what) {
            return names;
        }
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
        return vec![format!("model.layers.{layer}.{hf}.{suffix}")];
    }
    vec![match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        other => other.into(),
    }]
}

/// HF names of layer `layer`'s MoE tensor `what` (GGUF naming after `blk.N.`), or `None` if
/// `what` is not a MoE tensor:
/// - `ffn_gate_inp.weight` (router): Qwen and transformers-5 Mixtral `mlp.gate.weight`,
///   classic Mixtral `block_sparse_moe.gate.weight`;
/// - `ffn_{gate,up,down}.E.weight` (expert E, the per-expert names of old llama.cpp Mixtral
///   files): Qwen `mlp.experts.E.{gate,up,down}_proj.weight`, Mixtral
///   `block_sparse_moe.experts.E.{w1,w3,w2}.weight`;
/// - `ffn_gate_up_exps.weight` / `ffn_down_exps.weight`: all experts stacked as
///   transformers 5 keeps them (`save_original_format=False`): `mlp.experts.gate_up_proj`
///   `[E, 2·ff, hidden]` (gate rows first) and `mlp.experts.down_proj` `[E, hidden, ff]`;
/// - `ffn_{gate,up,down}_shexp.weight`, `ffn_gate_inp_shexp.weight`: Qwen2-MoE's
///   `mlp.shared_expert.{gate,up,down}_proj.weight` and `mlp.shared_expert_gate.weight`.
fn moe_hf_names(layer: &str, what: &str) -> Option<Vec<String>> {
    let l = |s: &str| format!("model.layers.{layer}.{s}");
    let one = |s: &str| Some(vec![l(s)]);
    match what {
        "ffn_gate_inp.weight" => {
            return Some(vec![
                l("mlp.gate.weight"),
                l("block_sparse_moe.gate.weight"),
            ])
        }
        "ffn_gate_up_exps.weight" => return one("mlp.experts.gate_up_proj"),
        "ffn_down_exps.weight" => return one("mlp.experts.down_proj"),
        "ffn_gate_shexp.weight" => return one("mlp.shared_expert.gate_proj.weight"),
        "ffn_up_shexp.weight" => return one("mlp.shared_expert.up_proj.weight"),
        "ffn_down_shexp.weight" => return one("mlp.shared_expert.down_proj.weight"),
        "ffn_gate_inp_shexp.weight" => return one("mlp.shared_expert_gate.weight"),
        _ => {}
    }
    let (part, rest) = what.split_once('.')?;
    let (expert, suffix) = rest.split_once('.')?;
    expert.parse::<usize>().ok()?;
    let (qwen, mixtral) = match part {
        "ffn_gate" => ("gate_proj", "w1"),
        "ffn_up" => ("up_proj", "w3"),
        "ffn_down" => ("down_proj", "w2"),
        _ => return None,
    };
    Some(vec![
        l(&format!("mlp.experts.{expert}.{qwen}.{suffix}")),
        l(&format!(
            "block_sparse_moe.experts.{expert}.{mixtral}.{suffix}"
        )),
    ])
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
                let t = hf_names(name).iter().find_map(|n| st.get(n))?;
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

    /// The tensor's shape (outer first), if it exists.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.raw(name).map(|(shape, _, _)| shape)
    }

    /// A 3-D tensor `[n, rows, cols]` (e.g. stacked experts) as `n` matrices of
    /// `rows × cols` in its stored type, sliced apart at load; `None` if absent.
    pub fn stacked(
        &self,
        name: &str,
        n: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Vec<Weight>>, RuntimeError> {
        let Some((shape, ty, bytes)) = self.raw(name) else {
            return Ok(None);
        };
        if shape != [n, rows, cols] {
            return Err(tensor_err(
                name,
                format!("shape {shape:?}, but the model config implies [{n}, {rows}, {cols}]"),
            ));
        }
        let each = ty
            .bytes_for(cols)
            .ok()
            .and_then(|rb| rb.checked_mul(rows))
            .filter(|&b| b.checked_mul(n) == Some(bytes.len()))
            .ok_or_else(|| {
                tensor_err(
                    name,
                    format!("{} bytes do not hold {shape:?} {ty}", bytes.len()),
                )
            })?;
        (0..n)
            .map(|e| {
                Weight::from_raw(rows, cols, ty, bytes[e * each..(e + 1) * each].to_vec())
                    .map_err(|err| tensor_err(name, format!("expert {e}: {err}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// `len` values as f32 from a tensor of any shape holding exactly `len` (e.g. a `[1, h]`
    /// or `[h]` gate vector); `None` if absent.
    pub fn flat_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, RuntimeError> {
        let Some((shape, ty, bytes)) = self.raw(name) else {
            return Ok(None);
        };
        if shape.iter().product::<usize>() != len {
            return Err(tensor_err(
                name,
                format!("shape {shape:?}, but the model config implies {len} values"),
            ));
        }
        let mut out = vec![0.0; len];
        dequantize(ty, bytes, &mut out).map_err(|e| tensor_err(name, e.to_string()))?;
        Ok(Some(out))
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
