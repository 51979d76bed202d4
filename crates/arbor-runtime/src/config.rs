//! Model configuration, read from GGUF metadata or an HF `config.json`.

use crate::gguf::GgufFile;
pub use crate::moe_config::MoeConfig;
use crate::reward::RewardHead;
use crate::RuntimeError;
use arbor_kernels::ops::{AttentionParams, RopeLayout, RopeScaling};
use serde_json::Value;

/// Decoder families arbor runs; they differ only in the options of one DecoderLayer
/// (attention options, and a dense or mixture-of-experts FFN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Mixtral: Mistral attention, every layer MoE, top-k weights renormalised. In GGUF it is
    /// `llama` with `llama.expert_count` > 0.
    Mixtral,
    /// Qwen2-MoE (Qwen1.5-MoE): Qwen2 attention, routed experts plus a gated shared expert.
    Qwen2Moe,
    /// Qwen3-MoE: Qwen3 attention (q/k norm), routed experts.
    Qwen3Moe,
}

impl Arch {
    /// Parses an architecture name as GGUF (`general.architecture`) or HF (`model_type`) spell it.
    pub fn parse(name: &str) -> Result<Self, RuntimeError> {
        match name {
            "llama" => Ok(Arch::Llama),
            "mistral" => Ok(Arch::Mistral),
            "qwen2" => Ok(Arch::Qwen2),
            "qwen3" => Ok(Arch::Qwen3),
            "mixtral" => Ok(Arch::Mixtral),
            "qwen2_moe" | "qwen2moe" => Ok(Arch::Qwen2Moe),
            "qwen3_moe" | "qwen3moe" => Ok(Arch::Qwen3Moe),
            other => Err(RuntimeError::UnknownArchitecture(other.to_string())),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
        }
    }
    /// True for the mixture-of-experts families.
    pub fn is_moe(self) -> bool {
        matches!(self, Arch::Mixtral | Arch::Qwen2Moe | Arch::Qwen3Moe)
    }
}

/// Everything the transformer needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// Longest sequence the model supports.
    pub max_context: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub rope_scaling: RopeScaling,
    /// Follows the weights' source: GGUF llama weights are permuted for the interleaved layout.
    pub rope_layout: RopeLayout,
    pub rope_dim: usize,
    pub sliding_window: Option<usize>,
    pub tie_embeddings: bool,
    /// `Some` for a reward model: the output head is a classifier (`score`) with
    /// `num_labels` outputs instead of the LM head. GGUF models are always causal LMs.
    pub reward: Option<RewardHead>,
    /// Mixture-of-experts settings; `None` for a dense model.
    pub moe: Option<MoeConfig>,
}

impl ModelConfig {
    /// The attention shape every layer shares.
    pub fn attention_params(&self) -> AttentionParams {
        AttentionParams {
            n_heads: self.num_heads,
            n_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            sliding_window: self.sliding_window,
        }
    }

    /// Checks the numbers fit together (they come from user files).
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |m: String| Err(RuntimeError::Config(m));
        let dims = [
            ("hidden size", self.hidden_size),
            ("layer count", self.num_layers),
            ("head count", self.num_heads),
            ("KV head count", self.num_kv_heads),
            ("head dim", self.head_dim),
            ("intermediate size", self.intermediate_size),
            ("vocab size", self.vocab_size),
            ("context length", self.max_context),
        ];
        for (name, v) in dims {
            if v == 0 || v > 1 << 24 {
                return bad(format!("{name} is {v}"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} heads cannot be grouped over {} KV heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.rope_dim == 0 || self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return bad(format!(
                "rotary dims {} do not fit head dim {}",
                self.rope_dim, self.head_dim
            ));
        }
        if !(self.rms_eps > 0.0 && self.rope_base > 0.0) {
            return bad(format!(
                "rms eps {} and rope base {} must be positive",
                self.rms_eps, self.rope_base
            ));
        }
        match &self.moe {
            Some(m) => m.validate()?,
            None if self.arch.is_moe() => {
                return bad(format!("{} model without experts", self.arch.name()))
            }
            None => {}
        }
        Ok(())
    }

    /// Reads `<arch>.*` keys of a GGUF file, and the `rope_freqs.weight` tensor (Llama 3's
    /// frequency factors) when present.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, RuntimeError> {
        let arch_name = f
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| RuntimeError::Config("GGUF has no general.architecture".into()))?;
        let mut arch = Arch::parse(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        if arch == Arch::Llama && f.get(&key("expert_count")).and_then(|v| v.as_u64()) > Some(0) {
            arch = Arch::Mixtral;
        }
        let req = |k: &str| -> Result<usize, RuntimeError> {
            f.get(&key(k))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| RuntimeError::Config(format!("GGUF lacks integer {}", key(k))))
        };
        let opt = |k: &str| f.get(&key(k)).and_then(|v| v.as_u64()).map(|v| v as usize);
        let hidden_size = req("embedding_length")?;
        let num_heads = req("attention.head_count")?;
        let head_dim = opt("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match opt("vocab_size") {
            Some(v) => v,
            None => f
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .unwrap_or(0),
        };
        let rope_dim = opt("rope.dimension_count").unwrap_or(head_dim);
        let num_layers = req("block_count")?;
        // MoE files may give only the experts' width.
        let feed_forward = opt("feed_forward_length");
        let moe = MoeConfig::from_gguf(arch, arch_name, f, num_layers, feed_forward)?;
        let intermediate_size = match (&moe, feed_forward) {
            (_, Some(n)) => n,
            (Some(m), None) => m.moe_intermediate_size,
            (None, None) => req("feed_forward_length")?,
        };
        let rope_freqs = match f.tensor("rope_freqs.weight") {
            None => None,
            Some(t) => {
                let mut v = vec![0.0; rope_dim / 2];
                if t.numel() != v.len() as u64 {
                    return Err(RuntimeError::Tensor {
                        name: t.name.clone(),
                        detail: format!("{} factors for {} rotary dims", t.numel(), rope_dim),
                    });
                }
                arbor_kernels::quant::dequantize(t.ty, f.tensor_data(t), &mut v)?;
                Some(v)
            }
        };
        let rope_scaling = match (
            rope_freqs,
            f.get(&key("rope.scaling.type")).and_then(|v| v.as_str()),
        ) {
            (Some(factors), _) => RopeScaling::Factors(factors),
            (None, Some("linear")) => RopeScaling::Linear {
                factor: f
                    .get(&key("rope.scaling.factor"))
                    .and_then(|v| v.as_f64())
                    .unwrap_or(1.0) as f32,
            },
            (None, Some("none") | None) => RopeScaling::None,
            (None, Some(other)) => {
                return Err(RuntimeError::Config(format!(
                    "rope scaling '{other}' is not supported yet"
                )))
            }
        };
        let cfg = ModelConfig {
            arch,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads: opt("attention.head_count_kv").unwrap_or(num_heads),
            head_dim,
            intermediate_size,
            vocab_size,
            max_context: req("context_length")?,
            rms_eps: f
                .get(&key("attention.layer_norm_rms_epsilon"))
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-5) as f32,
            rope_base: f
                .get(&key("rope.freq_base"))
                .and_then(|v| v.as_f64())
                .unwrap_or(10000.0) as f32,
            rope_scaling,
            rope_layout: match arch {
                Arch::Llama | Arch::Mistral | Arch::Mixtral => RopeLayout::Interleaved,
                Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen2Moe | Arch::Qwen3Moe => RopeLayout::Neox,
            },
            rope_dim,
            sliding_window: opt("attention.sliding_window").filter(|&w| w > 0),
            tie_embeddings: f.tensor("output.weight").is_none(),
            reward: None,
            moe,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads an HF `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self, RuntimeError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| RuntimeError::Config(format!("config.json: {e}")))?;
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| RuntimeError::Config("config.json has no model_type".into()))?;
        let arch = Arch::parse(model_type)?;
        let reward = RewardHead::from_hf_config(&v)?;
        let get = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let req = |k: &str| {
            get(k).ok_or_else(|| RuntimeError::Config(format!("config.json lacks integer '{k}'")))
        };
        let hidden_size = req("hidden_size")?;
        let num_heads = req("num_attention_heads")?;
        let head_dim = get("head_dim").unwrap_or(hidden_size / num_heads.max(1));
        // transformers ≥ 5 nests rope settings in `rope_parameters`; older configs use
        // `rope_theta` + `rope_scaling`.
        let rope = v
            .get("rope_parameters")
            .or_else(|| v.get("rope_scaling"))
            .filter(|r| r.is_object());
        let f = |obj: Option<&Value>, k: &str| obj.and_then(|o| o.get(k)).and_then(Value::as_f64);
        let rope_base = f(Some(&v), "rope_theta")
            .or_else(|| f(rope, "rope_theta"))
            .unwrap_or(10000.0) as f32;
        let rope_type = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let rope_scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: f(rope, "factor").unwrap_or(1.0) as f32,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: f(rope, "factor").unwrap_or(8.0) as f32,
                low_freq_factor: f(rope, "low_freq_factor").unwrap_or(1.0) as f32,
                high_freq_factor: f(rope, "high_freq_factor").unwrap_or(4.0) as f32,
                original_max_position: f(rope, "original_max_position_embeddings").unwrap_or(8192.0)
                    as usize,
            },
            other => {
                return Err(RuntimeError::Config(format!(
                    "rope type '{other}' is not supported yet"
                )))
            }
        };
        let partial = f(Some(&v), "partial_rotary_factor").unwrap_or(1.0);
        let sliding_window = match arch {
            Arch::Mistral | Arch::Mixtral => get("sliding_window"),
            Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen2Moe | Arch::Qwen3Moe
                if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) =>
            {
                get("sliding_window")
            }
            _ => None,
        };
        let intermediate_size = req("intermediate_size")?;
        let moe = MoeConfig::from_hf(arch, &v, intermediate_size)?;
        let cfg = ModelConfig {
            arch,
            hidden_size,
            num_layers: req("num_hidden_layers")?,
            num_heads,
            num_kv_heads: get("num_key_value_heads").unwrap_or(num_heads),
            head_dim,
            intermediate_size,
            vocab_size: req("vocab_size")?,
            max_context: get("max_position_embeddings").unwrap_or(4096),
            rms_eps: f(Some(&v), "rms_norm_eps").unwrap_or(1e-6) as f32,
            rope_base,
            rope_scaling,
            rope_layout: RopeLayout::Neox,
            rope_dim: ((head_dim as f64 * partial) as usize) & !1,
            sliding_window,
            tie_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            reward,
            moe,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Width of an output row: the vocabulary for a causal LM, `num_labels` for a reward model.
    pub fn out_dim(&self) -> usize {
        self.reward
            .as_ref()
            .map_or(self.vocab_size, |r| r.num_labels)
    }

    /// True if layer `i` has a mixture-of-experts FFN.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| m.is_moe_layer(i))
    }

    /// Parameters in the weight matrices and norms (embedding counted once when tied; q/k/v
    /// biases left out). For a MoE model: every expert.
    pub fn param_count(&self) -> u64 {
        self.params(false)
    }

    /// Parameters one token uses: [`ModelConfig::param_count`] with only the top-k routed
    /// experts of each MoE layer (routers and shared experts included). Equal to
    /// `param_count` for a dense model.
    pub fn active_param_count(&self) -> u64 {
        self.params(true)
    }

    fn params(&self, active: bool) -> u64 {
        let (h, q, kv, i) = (
            self.hidden_size as u64,
            (self.num_heads * self.head_dim) as u64,
            (self.num_kv_heads * self.head_dim) as u64,
            self.intermediate_size as u64,
        );
        let qk_norm = match self.arch {
            Arch::Qwen3 | Arch::Qwen3Moe => 2 * self.head_dim as u64,
            _ => 0,
        };
        let attn = h * q + 2 * h * kv + q * h + 2 * h + qk_norm;
        let ffn: u64 = (0..self.num_layers)
            .map(|l| match &self.moe {
                Some(m) if m.is_moe_layer(l) => m.block_params(self.hidden_size, active),
                _ => 3 * h * i,
            })
            .sum();
        let embed = self.vocab_size as u64 * h;
        let head = match &self.reward {
            Some(r) => r.num_labels as u64 * h,
            None if self.tie_embeddings => 0,
            None => embed,
        };
        embed + head + self.num_layers as u64 * attn + ffn + h
    }
}
