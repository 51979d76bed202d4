//! Models of published shapes with random weights (`--dummy-weights SHAPE`), for benchmarks of
//! models that cannot be downloaded here.
//!
//! Weights are deterministic (seeded per tensor and row) uniform block-quantised values with
//! a standard deviation of 0.02 (the usual initialiser range), norms are 1 and biases 0, so
//! activations stay finite at any depth. They are stored as Q4_0 (default), Q8_0 or Q4_K blocks,
//! the formats the CPU matmul reads directly; generation runs in parallel (rayon).
//!
//! The tokenizer is synthetic: byte-level BPE without merges (one token per UTF-8 byte),
//! `<|endoftext|>` as EOS, and filler tokens (`" t123"`) up to the shape's vocabulary size.
//! Benchmarks feed token ids directly; only prompts built from text (e.g. LM-as-judge
//! prompts) come out longer than with the model's real tokenizer.

use crate::config::{Arch, ModelConfig};
use crate::gguf::{GgufHeader, MetaValue};
use crate::model::{MemTensor, Model, TensorSource};
use crate::tokenizer::Tokenizer;
use crate::RuntimeError;
use arbor_kernels::quant::GgmlType;
use rayon::prelude::*;
use std::collections::HashMap;

/// A published model shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub name: &'static str,
    pub arch: Arch,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_context: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    pub tied: bool,
    /// Llama 3.1-style RoPE scaling factor (0: none).
    pub llama3_rope_factor: f32,
    /// Parameters as published (model card / safetensors index), biases included.
    pub published_params: u64,
    /// Mixture-of-experts settings; `None` for a dense model.
    pub moe: Option<MoeShape>,
}

/// The mixture-of-experts part of a published shape. Every layer is MoE (as in the three
/// published MoE shapes); `intermediate` is then unused except by Mixtral, whose experts
/// have that width.
#[derive(Clone, Copy, Debug)]
pub struct MoeShape {
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// FFN width of one routed expert.
    pub expert_ff: usize,
    /// FFN width of the shared expert (0: none).
    pub shared_ff: usize,
    pub norm_topk_prob: bool,
    /// Parameters one token uses (top-k experts), biases included, from config.json.
    pub active_params: u64,
}

/// Every shape `--dummy-weights` knows (from the models' HF `config.json`).
#[rustfmt::skip]
pub const SHAPES: &[Shape] = &[
    Shape { name: "smollm2-135m", arch: Arch::Llama, hidden: 576, layers: 30, heads: 9,
        kv_heads: 3, head_dim: 64, intermediate: 1536, vocab: 49152, max_context: 8192,
        rope_base: 100000.0, rms_eps: 1e-5, tied: true, llama3_rope_factor: 0.0,
        published_params: 134_515_008, moe: None },
    Shape { name: "qwen2.5-0.5b", arch: Arch::Qwen2, hidden: 896, layers: 24, heads: 14,
        kv_heads: 2, head_dim: 64, intermediate: 4864, vocab: 151936, max_context: 32768,
        rope_base: 1e6, rms_eps: 1e-6, tied: true, llama3_rope_factor: 0.0,
        published_params: 494_032_768, moe: None },
    Shape { name: "qwen2.5-1.5b", arch: Arch::Qwen2, hidden: 1536, layers: 28, heads: 12,
        kv_heads: 2, head_dim: 128, intermediate: 8960, vocab: 151936, max_context: 32768,
        rope_base: 1e6, rms_eps: 1e-6, tied: true, llama3_rope_factor: 0.0,
        published_params: 1_543_714_304, moe: None },
    Shape { name: "qwen2.5-7b", arch: Arch::Qwen2, hidden: 3584, layers: 28, heads: 28,
        kv_heads: 4, head_dim: 128, intermediate: 18944, vocab: 152064, max_context: 32768,
        rope_base: 1e6, rms_eps: 1e-6, tied: false, llama3_rope_factor: 0.0,
        published_params: 7_615_616_512, moe: None },
    Shape { name: "llama-3.2-1b", arch: Arch::Llama, hidden: 2048, layers: 16, heads: 32,
        kv_heads: 8, head_dim: 64, intermediate: 8192, vocab: 128256, max_context: 131072,
        rope_base: 500000.0, rms_eps: 1e-5, tied: true, llama3_rope_factor: 32.0,
        published_params: 1_235_814_400, moe: None },
    Shape { name: "llama-3-8b", arch: Arch::Llama, hidden: 4096, layers: 32, heads: 32,
        kv_heads: 8, head_dim: 128, intermediate: 14336, vocab: 128256, max_context: 8192,
        rope_base: 500000.0, rms_eps: 1e-5, tied: false, llama3_rope_factor: 0.0,
        published_params: 8_030_261_248, moe: None },
    // MoE shapes. Parameter counts are computed from each config.json (and agree with the
    // published 30.5B/3.3B, 14.3B/2.7B and 46.7B/12.9B). Qwen3-30B-A3B: head_dim 128 (not
    // 2048/32), q/k norm, norm_topk_prob true, max_position_embeddings 40960, dense
    // intermediate_size 6144 unused (no mlp_only layers). Qwen1.5-MoE-A2.7B: 16 KV heads (no
    // GQA), q/k/v bias, norm_topk_prob false. Mixtral-8x7B-v0.1: experts of
    // intermediate_size 14336, rope_theta 1e6, no sliding window.
    Shape { name: "qwen3-30b-a3b", arch: Arch::Qwen3Moe, hidden: 2048, layers: 48, heads: 32,
        kv_heads: 4, head_dim: 128, intermediate: 6144, vocab: 151936, max_context: 40960,
        rope_base: 1e6, rms_eps: 1e-6, tied: false, llama3_rope_factor: 0.0,
        published_params: 30_532_122_624,
        moe: Some(MoeShape { experts: 128, top_k: 8, expert_ff: 768, shared_ff: 0,
            norm_topk_prob: true, active_params: 3_353_032_704 }) },
    Shape { name: "qwen1.5-moe-a2.7b", arch: Arch::Qwen2Moe, hidden: 2048, layers: 24,
        heads: 16, kv_heads: 16, head_dim: 128, intermediate: 5632, vocab: 151936,
        max_context: 8192, rope_base: 1e6, rms_eps: 1e-6, tied: false, llama3_rope_factor: 0.0,
        published_params: 14_315_784_192,
        moe: Some(MoeShape { experts: 60, top_k: 4, expert_ff: 1408, shared_ff: 5632,
            norm_topk_prob: false, active_params: 2_689_173_504 }) },
    Shape { name: "mixtral-8x7b", arch: Arch::Mixtral, hidden: 4096, layers: 32, heads: 32,
        kv_heads: 8, head_dim: 128, intermediate: 14336, vocab: 32000, max_context: 32768,
        rope_base: 1e6, rms_eps: 1e-5, tied: false, llama3_rope_factor: 0.0,
        published_params: 46_702_792_704,
        moe: Some(MoeShape { experts: 8, top_k: 2, expert_ff: 14336, shared_ff: 0,
            norm_topk_prob: true, active_params: 12_879_925_248 }) },
];

/// Weight storage of a dummy model.
pub const TYPES: &[(&str, GgmlType)] = &[
    ("q4_0", GgmlType::Q4_0),
    ("q8_0", GgmlType::Q8_0),
    ("q4_k", GgmlType::Q4K),
];

/// Standard deviation of every weight matrix.
const SIGMA: f32 = 0.02;

impl Shape {
    /// The shape called `name`; the error lists the known ones.
    pub fn find(name: &str) -> Result<&'static Shape, RuntimeError> {
        SHAPES.iter().find(|s| s.name == name).ok_or_else(|| {
            let known: Vec<_> = SHAPES.iter().map(|s| s.name).collect();
            RuntimeError::Config(format!(
                "unknown dummy shape '{name}': known shapes are {}",
                known.join(", ")
            ))
        })
    }

    /// True for families with q/k/v biases (Qwen2, Qwen2-MoE).
    pub fn qkv_bias(&self) -> bool {
        matches!(self.arch, Arch::Qwen2 | Arch::Qwen2Moe)
    }

    /// True for families with per-head q/k RMSNorm (Qwen3, Qwen3-MoE).
    pub fn qk_norm(&self) -> bool {
        matches!(self.arch, Arch::Qwen3 | Arch::Qwen3Moe)
    }

    /// The model config of this shape, read from the HF `config.json` it publishes.
    pub fn config(&self) -> Result<ModelConfig, RuntimeError> {
        let mut v = serde_json::json!({
            "model_type": self.arch.name(),
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_context,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_base,
            "tie_word_embeddings": self.tied,
        });
        if let Some(m) = &self.moe {
            v["num_experts_per_tok"] = m.top_k.into();
            if self.arch == Arch::Mixtral {
                v["num_local_experts"] = m.experts.into();
            } else {
                v["num_experts"] = m.experts.into();
                v["moe_intermediate_size"] = m.expert_ff.into();
                v["shared_expert_intermediate_size"] = m.shared_ff.into();
                v["norm_topk_prob"] = m.norm_topk_prob.into();
                v["decoder_sparse_step"] = 1.into();
            }
        }
        if self.llama3_rope_factor > 0.0 {
            v["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": self.llama3_rope_factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            });
        }
        ModelConfig::from_hf_json(&v.to_string())
    }
}

/// Parses `SHAPE` or `SHAPE:TYPE` (TYPE: q4_0, q8_0 or q4_k).
pub fn parse_spec(spec: &str) -> Result<(&'static Shape, GgmlType), RuntimeError> {
    let (name, ty) = spec.split_once(':').unwrap_or((spec, "q4_0"));
    let ty = TYPES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(ty))
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            RuntimeError::Config(format!(
                "unknown dummy weight type '{ty}': use q4_0, q8_0 or q4_k"
            ))
        })?;
    Ok((Shape::find(name)?, ty))
}

/// splitmix64: a fast, well-mixed stream for seeding and filling.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn name_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(mix(seed), |h, b| mix(h ^ u64::from(b)))
}

/// A `rows × cols` matrix of `ty` blocks with values of mean 0 and deviation [`SIGMA`].
fn random_matrix(rows: usize, cols: usize, ty: GgmlType, seed: u64) -> MemTensor {
    // Rows that are not whole Q4_K super-blocks fall back to Q4_0, as llama.cpp's Q4_K files
    // store such tensors in a 32-element type.
    let ty = match cols % ty.block_size() {
        0 => ty,
        _ => GgmlType::Q4_0,
    };
    let row_bytes = ty.type_size() * cols / ty.block_size();
    let mut bytes = vec![0u8; rows * row_bytes];
    // Q4_0: nibbles 1..=15 → −7..7 (sd 4.32); Q8_0: −127..127 (sd 73.6); Q4_K: the same
    // nibbles with every sub-block scale and min 1 and dmin = 8·d, so again d·q − 8d.
    let scale = match ty {
        GgmlType::Q8_0 => SIGMA / 73.6,
        _ => SIGMA / 4.32,
    };
    let d = half::f16::from_f32(scale).to_le_bytes();
    let mut header = d.to_vec();
    if ty == GgmlType::Q4K {
        header.extend(half::f16::from_f32(8.0 * scale).to_le_bytes());
        // Six-bit scales and mins all 1, packed as ggml packs them.
        header.extend([1, 1, 1, 1, 1, 1, 1, 1, 0x11, 0x11, 0x11, 0x11]);
    }
    let block = ty.type_size();
    bytes
        .par_chunks_mut(row_bytes.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let mut state = mix(seed ^ (r as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
            let mut next = move || {
                state = mix(state);
                state
            };
            for b in row.chunks_exact_mut(block) {
                b[..header.len()].copy_from_slice(&header);
                for q in b[header.len()..].chunks_mut(8) {
                    let v = next().to_le_bytes();
                    for (o, x) in q.iter_mut().zip(v) {
                        *o = if ty == GgmlType::Q8_0 {
                            ((x % 255) as i16 - 127) as i8 as u8
                        } else {
                            (x % 15 + 1) | ((x / 15 % 15 + 1) << 4)
                        };
                    }
                }
            }
        });
    MemTensor {
        shape: vec![rows, cols],
        ty,
        bytes,
    }
}

fn vector(values: Vec<f32>) -> MemTensor {
    MemTensor {
        shape: vec![values.len()],
        ty: GgmlType::F32,
        bytes: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Every tensor of `shape` by GGUF name.
pub fn tensors(shape: &Shape, ty: GgmlType, seed: u64) -> HashMap<String, MemTensor> {
    let (h, hd, i) = (shape.hidden, shape.head_dim, shape.intermediate);
    let (qd, kvd) = (shape.heads * hd, shape.kv_heads * hd);
    let mut mats: Vec<(String, usize, usize)> = vec![("token_embd.weight".into(), shape.vocab, h)];
    if !shape.tied {
        mats.push(("output.weight".into(), shape.vocab, h));
    }
    let mut vecs: Vec<(String, Vec<f32>)> = vec![("output_norm.weight".into(), vec![1.0; h])];
    let mut stacked: Vec<(String, usize, usize, usize)> = Vec::new();
    for l in 0..shape.layers {
        let n = |s: &str| format!("blk.{l}.{s}");
        for (name, r, c) in [
            ("attn_q.weight", qd, h),
            ("attn_k.weight", kvd, h),
            ("attn_v.weight", kvd, h),
            ("attn_output.weight", h, qd),
        ] {
            mats.push((n(name), r, c));
        }
        match &shape.moe {
            None => {
                for (name, r, c) in [
                    ("ffn_gate.weight", i, h),
                    ("ffn_up.weight", i, h),
                    ("ffn_down.weight", h, i),
                ] {
                    mats.push((n(name), r, c));
                }
            }
            Some(m) => {
                // Experts stacked as in GGUF files: [experts, rows, cols].
                let (e, f) = (m.experts, m.expert_ff);
                stacked.push((n("ffn_gate_exps.weight"), e, f, h));
                stacked.push((n("ffn_up_exps.weight"), e, f, h));
                stacked.push((n("ffn_down_exps.weight"), e, h, f));
                mats.push((n("ffn_gate_inp.weight"), e, h));
                if m.shared_ff > 0 {
                    let s = m.shared_ff;
                    mats.push((n("ffn_gate_shexp.weight"), s, h));
                    mats.push((n("ffn_up_shexp.weight"), s, h));
                    mats.push((n("ffn_down_shexp.weight"), h, s));
                    vecs.push((n("ffn_gate_inp_shexp.weight"), vec![0.0; h]));
                }
            }
        }
        if shape.qk_norm() {
            vecs.push((n("attn_q_norm.weight"), vec![1.0; hd]));
            vecs.push((n("attn_k_norm.weight"), vec![1.0; hd]));
        }
        vecs.push((n("attn_norm.weight"), vec![1.0; h]));
        vecs.push((n("ffn_norm.weight"), vec![1.0; h]));
        if shape.qkv_bias() {
            for (b, len) in [
                ("attn_q.bias", qd),
                ("attn_k.bias", kvd),
                ("attn_v.bias", kvd),
            ] {
                vecs.push((n(b), vec![0.0; len]));
            }
        }
    }
    let mut out: HashMap<String, MemTensor> = mats
        .into_iter()
        .map(|(name, r, c)| {
            let t = random_matrix(r, c, ty, name_seed(seed, &name));
            (name, t)
        })
        .collect();
    out.extend(stacked.into_iter().map(|(name, e, r, c)| {
        let mut t = random_matrix(e * r, c, ty, name_seed(seed, &name));
        t.shape = vec![e, r, c];
        (name, t)
    }));
    out.extend(vecs.into_iter().map(|(n, v)| (n, vector(v))));
    out
}

/// The model of `spec` (`SHAPE[:TYPE]`) with weights drawn from `seed`.
pub fn model(spec: &str, seed: u64) -> Result<Model, RuntimeError> {
    let (shape, ty) = parse_spec(spec)?;
    let cfg = shape.config()?;
    let src = TensorSource::Memory(tensors(shape, ty, seed));
    let mut m = Model::from_source(cfg, &src)?;
    m.quantization = format!("{ty} (random weights, dummy shape {})", shape.name);
    Ok(m)
}

/// GPT-2's byte → printable character map (the byte-level BPE alphabet).
fn byte_char(b: u8) -> char {
    let direct = |x: u8| (33..=126).contains(&x) || (161..=172).contains(&x) || x >= 174;
    if direct(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !direct(x)).count() as u32;
    char::from_u32(256 + n).unwrap_or('\u{FFFD}')
}

/// A byte-level tokenizer of `vocab` tokens: 256 bytes, `<|endoftext|>` (EOS, id 256), then
/// filler tokens. No merges, no chat template.
pub fn tokenizer(vocab: usize) -> Result<Tokenizer, RuntimeError> {
    if vocab < 257 {
        return Err(RuntimeError::Config(format!(
            "a dummy tokenizer needs at least 257 tokens, not {vocab}"
        )));
    }
    let mut tokens: Vec<MetaValue> = (0..=255u8)
        .map(|b| MetaValue::String(byte_char(b).to_string()))
        .collect();
    tokens.push(MetaValue::String("<|endoftext|>".into()));
    tokens.extend((257..vocab).map(|i| MetaValue::String(format!("\u{120}t{i}"))));
    let mut kinds = vec![MetaValue::I32(1); vocab];
    kinds[256] = MetaValue::I32(3);
    let s = |x: &str| MetaValue::String(x.into());
    let header = GgufHeader {
        version: 3,
        metadata: vec![
            ("tokenizer.ggml.model".into(), s("gpt2")),
            ("tokenizer.ggml.pre".into(), s("default")),
            ("tokenizer.ggml.tokens".into(), MetaValue::Array(tokens)),
            ("tokenizer.ggml.token_type".into(), MetaValue::Array(kinds)),
            ("tokenizer.ggml.merges".into(), MetaValue::Array(vec![])),
            ("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(256)),
            ("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(256)),
            (
                "tokenizer.ggml.add_bos_token".into(),
                MetaValue::Bool(false),
            ),
        ],
        tensors: vec![],
        alignment: 32,
        data_offset: 0,
    };
    Tokenizer::from_gguf_header(&header)
}

#[cfg(test)]
#[path = "dummy_tests.rs"]
mod tests;
