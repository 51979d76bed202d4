//! Mixture-of-experts settings of a [`ModelConfig`](crate::ModelConfig), read from an HF
//! `config.json` or GGUF metadata.
//!
//! Defaults follow transformers 5 (the oracle of the fixtures) where a config.json leaves a
//! key out, and llama.cpp for GGUF files:
//! - `norm_topk_prob`: Mixtral always renormalises its top-k weights. Qwen2-MoE and
//!   Qwen3-MoE read `norm_topk_prob`, default false in both transformers config classes
//!   (published Qwen3-MoE configs set it true explicitly). GGUF: `{arch}.expert_weights_norm`
//!   when present, else what llama.cpp hard-codes: llama (Mixtral) and qwen3moe true,
//!   qwen2moe false.
//! - Which layers are MoE: HF `decoder_sparse_step` (default 1) and `mlp_only_layers`
//!   (default none). GGUF has no such keys: a layer is MoE iff its router
//!   `blk.N.ffn_gate_inp.weight` exists; the others are listed as `mlp_only_layers`.

use crate::config::Arch;
use crate::gguf::GgufFile;
use crate::RuntimeError;
use serde_json::Value;

/// Shape and routing of a mixture-of-experts model.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts each token is routed to (top-k).
    pub experts_per_token: usize,
    /// FFN width of one routed expert.
    pub moe_intermediate_size: usize,
    /// FFN width of the shared expert (Qwen2-MoE); 0 when there is none.
    pub shared_expert_intermediate_size: usize,
    /// Renormalise the top-k routing weights to sum to 1.
    pub norm_topk_prob: bool,
    /// Every `decoder_sparse_step`-th layer is MoE (layer `i` when `(i + 1) % step == 0`).
    pub decoder_sparse_step: usize,
    /// Layers that stay dense (FFN of `intermediate_size`) whatever the step says.
    pub mlp_only_layers: Vec<usize>,
}

impl MoeConfig {
    /// True if layer `i` has a MoE block rather than a dense FFN (transformers' rule).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i)
            && self.num_experts > 0
            && self.decoder_sparse_step > 0
            && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// Checks the numbers fit together.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |m: String| Err(RuntimeError::Config(m));
        if self.num_experts == 0 || self.num_experts > 1 << 16 {
            return bad(format!("expert count is {}", self.num_experts));
        }
        if self.experts_per_token == 0 || self.experts_per_token > self.num_experts {
            return bad(format!(
                "{} experts per token (top-k) do not fit {} experts",
                self.experts_per_token, self.num_experts
            ));
        }
        if self.moe_intermediate_size == 0 || self.moe_intermediate_size > 1 << 24 {
            return bad(format!(
                "expert intermediate size is {}",
                self.moe_intermediate_size
            ));
        }
        if self.shared_expert_intermediate_size > 1 << 24 {
            return bad(format!(
                "shared expert intermediate size is {}",
                self.shared_expert_intermediate_size
            ));
        }
        if self.decoder_sparse_step == 0 {
            return bad("decoder_sparse_step is 0: it must be at least 1".into());
        }
        Ok(())
    }

    /// Parameters of layer `i`'s MoE block: router, routed experts (all, or only the top-k
    /// a token uses when `active`) and the shared expert with its gate.
    pub fn block_params(&self, hidden: usize, active: bool) -> u64 {
        let h = hidden as u64;
        let experts = if active {
            self.experts_per_token
        } else {
            self.num_experts
        } as u64;
        let shared = match self.shared_expert_intermediate_size as u64 {
            0 => 0,
            s => 3 * h * s + h,
        };
        self.num_experts as u64 * h + experts * 3 * h * self.moe_intermediate_size as u64 + shared
    }

    /// The MoE settings of an HF `config.json` of `arch`; `None` for dense architectures.
    /// `intermediate_size` is the dense width (Mixtral's experts use it).
    pub(crate) fn from_hf(
        arch: Arch,
        v: &Value,
        intermediate_size: usize,
    ) -> Result<Option<Self>, RuntimeError> {
        let get = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let req = |k: &str| {
            get(k).ok_or_else(|| RuntimeError::Config(format!("config.json lacks integer '{k}'")))
        };
        // transformers 5 writes `num_local_experts` for every family; Hub Qwen configs say
        // `num_experts`.
        let experts = || {
            get("num_local_experts")
                .or_else(|| get("num_experts"))
                .ok_or_else(|| {
                    RuntimeError::Config(
                        "config.json lacks integer 'num_local_experts' / 'num_experts'".into(),
                    )
                })
        };
        let cfg = match arch {
            Arch::Mixtral => MoeConfig {
                num_experts: experts()?,
                experts_per_token: req("num_experts_per_tok")?,
                moe_intermediate_size: intermediate_size,
                shared_expert_intermediate_size: 0,
                norm_topk_prob: true,
                decoder_sparse_step: 1,
                mlp_only_layers: vec![],
            },
            Arch::Qwen2Moe | Arch::Qwen3Moe => {
                let num_experts = experts()?;
                let mlp_only_layers = match v.get("mlp_only_layers") {
                    None | Some(Value::Null) => vec![],
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|x| x.as_u64().map(|x| x as usize))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            RuntimeError::Config(
                                "config.json: mlp_only_layers must be a list of layer numbers"
                                    .into(),
                            )
                        })?,
                    Some(_) => {
                        return Err(RuntimeError::Config(
                            "config.json: mlp_only_layers must be a list".into(),
                        ))
                    }
                };
                MoeConfig {
                    num_experts,
                    experts_per_token: req("num_experts_per_tok")?,
                    moe_intermediate_size: req("moe_intermediate_size")?,
                    shared_expert_intermediate_size: match arch {
                        Arch::Qwen2Moe => req("shared_expert_intermediate_size")?,
                        _ => 0,
                    },
                    norm_topk_prob: v
                        .get("norm_topk_prob")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    decoder_sparse_step: get("decoder_sparse_step").unwrap_or(1),
                    mlp_only_layers,
                }
            }
            _ => return Ok(None),
        };
        cfg.validate()?;
        Ok(Some(cfg))
    }

    /// The MoE settings of a GGUF file whose `general.architecture` is `arch_name` (parsed
    /// as `arch`, Mixtral for `llama` with experts); `None` for a dense model.
    /// `feed_forward_length` is the file's dense FFN width, if it gives one.
    pub(crate) fn from_gguf(
        arch: Arch,
        arch_name: &str,
        f: &GgufFile,
        num_layers: usize,
        feed_forward_length: Option<usize>,
    ) -> Result<Option<Self>, RuntimeError> {
        let key = |k: &str| format!("{arch_name}.{k}");
        let opt = |k: &str| f.get(&key(k)).and_then(|v| v.as_u64()).map(|v| v as usize);
        let num_experts = opt("expert_count").unwrap_or(0);
        if !arch.is_moe() {
            return Ok(None);
        }
        let missing = |k: &str| RuntimeError::Config(format!("GGUF lacks integer {}", key(k)));
        let experts_per_token =
            opt("expert_used_count").ok_or_else(|| missing("expert_used_count"))?;
        let moe_intermediate_size = opt("expert_feed_forward_length")
            .or(feed_forward_length)
            .ok_or_else(|| missing("expert_feed_forward_length"))?;
        let norm_topk_prob = match f.get(&key("expert_weights_norm")) {
            Some(crate::gguf::MetaValue::Bool(b)) => *b,
            _ => arch != Arch::Qwen2Moe,
        };
        let mlp_only_layers: Vec<usize> = (0..num_layers)
            .filter(|i| f.tensor(&format!("blk.{i}.ffn_gate_inp.weight")).is_none())
            .collect();
        let cfg = MoeConfig {
            num_experts,
            experts_per_token,
            moe_intermediate_size,
            // Older qwen2moe files lack the key: the shared expert's width is its tensor's.
            shared_expert_intermediate_size: opt("expert_shared_feed_forward_length")
                .or_else(|| {
                    let first = (0..num_layers).find(|i| !mlp_only_layers.contains(i))?;
                    let t = f.tensor(&format!("blk.{first}.ffn_up_shexp.weight"))?;
                    t.dims.get(1).map(|&d| d as usize)
                })
                .unwrap_or(0),
            norm_topk_prob,
            decoder_sparse_step: 1,
            mlp_only_layers,
        };
        cfg.validate()?;
        Ok(Some(cfg))
    }
}
