//! The dense transformer: embeddings → N × [`DecoderLayer`] → norm → logits.

mod batch;
mod head;
mod layer;
mod linear;
mod moe;
mod scratch;
mod source;

pub use batch::{AttentionOptions, BatchLayout, SeqRows};
pub use head::Head;
pub use layer::{stack_rows, DecoderLayer, Ffn, LayerCtx, TreeCtx};
pub use linear::{linear, Precision};
pub use moe::{ExpertCounts, ExpertLoad, MoeBlock};
pub use source::{hf_name, hf_names, MemTensor, TensorSource};

use crate::config::ModelConfig;
use crate::gguf::GgufFile;
use crate::safetensors::SafeTensors;
use crate::RuntimeError;
use arbor_kernels::kv::KvCache;
use arbor_kernels::ops::{self, cascade, RopeTable};
use arbor_kernels::{Weight, WeightData};
use rayon::prelude::*;
use std::path::Path;

/// A loaded model's weights and shape.
pub struct Model {
    pub cfg: ModelConfig,
    pub(crate) embed: Weight,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: Vec<f32>,
    /// LM head (tied or not) or a reward model's classifier.
    pub(crate) head: Head,
    pub(crate) rope: RopeTable,
    /// Storage types of the source tensors, for `arbor info`.
    pub quantization: String,
    /// How matmuls over quantised weights are computed.
    pub precision: Precision,
    /// Cascade (tree) and sparse attention settings.
    pub attention: AttentionOptions,
}

impl Model {
    /// Opens a GGUF file or an HF model directory (config.json + safetensors).
    pub fn open_source(path: &Path) -> Result<(ModelConfig, TensorSource), RuntimeError> {
        if path.is_dir() {
            let cfg_path = path.join("config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(|source| RuntimeError::Io {
                path: cfg_path,
                source,
            })?;
            let cfg = ModelConfig::from_hf_json(&text)?;
            Ok((cfg, TensorSource::Safetensors(SafeTensors::open_dir(path)?)))
        } else {
            let f = GgufFile::open(path)?;
            let cfg = ModelConfig::from_gguf(&f)?;
            Ok((cfg, TensorSource::Gguf(f)))
        }
    }

    /// Loads every weight of `cfg` from `src`.
    pub fn from_source(cfg: ModelConfig, src: &TensorSource) -> Result<Self, RuntimeError> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = src.req_matrix("token_embd.weight", v, h)?;
        let head = Head::load(src, &cfg)?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(src, &cfg, i))
            .collect::<Result<Vec<_>, _>>()?;
        let rope = RopeTable::new(
            cfg.rope_layout,
            cfg.rope_dim,
            cfg.rope_base,
            &cfg.rope_scaling,
        );
        Ok(Model {
            norm: src.req_vector("output_norm.weight", h)?,
            embed,
            layers,
            head,
            rope,
            quantization: src.type_summary(),
            precision: Precision::default(),
            attention: AttentionOptions::default(),
            cfg,
        })
    }

    /// Opens and loads `path`.
    pub fn load(path: &Path) -> Result<Self, RuntimeError> {
        let (cfg, src) = Self::open_source(path)?;
        Self::from_source(cfg, &src)
    }

    /// A key naming these weights and this precision, for the prefix cache: K/V computed by
    /// one model (or one precision) must never be reused by another. Hashes the config, the
    /// precision, the final norm and the first embedding row.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let layout = self
            .weights()
            .any(|w| matches!(w.data, WeightData::Interleaved { .. }));
        format!("{:?} {:?} {layout}", self.cfg, self.precision).hash(&mut h);
        let mut row = vec![0.0f32; self.cfg.hidden_size];
        if self.embed.row_to_f32(0, &mut row).is_ok() {
            row.iter().for_each(|x| x.to_bits().hash(&mut h));
        }
        self.norm.iter().for_each(|x| x.to_bits().hash(&mut h));
        h.finish()
    }

    /// Every matrix of the model (embedding, head, each layer's projections and experts).
    fn weights(&self) -> impl Iterator<Item = &Weight> {
        let head = match &self.head {
            Head::Tied => None,
            Head::Lm(w) | Head::Score { weight: w, .. } => Some(w),
        };
        std::iter::once(&self.embed)
            .chain(head)
            .chain(self.layers.iter().flat_map(DecoderLayer::weights))
    }

    /// Puts every Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K matrix (`interleave::preferred`)
    /// into the CPU matmul's interleaved layout (see `arbor_kernels::quant::interleave`):
    /// about twice the matmul speed, the same values; the sums round in another order, so
    /// logits change at the level of f32 rounding (and through it the 8-bit activation
    /// rounding). For the CPU backend with [`Precision::Fast`] (the GPU uploads dequantised weights, and exact
    /// mode dequantises rows, which this layout would only slow).
    pub(crate) fn interleave_weights(&mut self) {
        let take = |w: &mut Weight| {
            let placeholder = Weight {
                rows: 0,
                cols: 0,
                data: WeightData::F32(Vec::new()),
            };
            *w = std::mem::replace(w, placeholder)
                .interleaved_where(arbor_kernels::quant::interleave::preferred);
        };
        take(&mut self.embed);
        if let Head::Lm(w) | Head::Score { weight: w, .. } = &mut self.head {
            take(w);
        }
        for l in &mut self.layers {
            l.weights_mut().for_each(take);
        }
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        self.embed.nbytes()
            + self.head.nbytes()
            + self.layers.iter().map(DecoderLayer::nbytes).sum::<usize>()
    }

    /// Runs `tokens` (laid out by `batch`) through the model, writing K/V into `cache`, and
    /// returns the output rows (`logit_rows.len() × cfg.out_dim()`: logits, or a reward
    /// model's label scores) of the rows in `logit_rows`.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        batch: &BatchLayout,
        logit_rows: &[usize],
    ) -> Result<Vec<f32>, RuntimeError> {
        Ok(self
            .forward_hidden(cache, tokens, batch, logit_rows, &[])?
            .0)
    }

    /// [`Model::forward`], also returning the final-normed hidden states (what the head
    /// reads; `hidden_rows.len() × hidden_size`) of the rows in `hidden_rows`.
    pub fn forward_hidden(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        batch: &BatchLayout,
        logit_rows: &[usize],
        hidden_rows: &[usize],
    ) -> Result<(Vec<f32>, Vec<f32>), RuntimeError> {
        let h = self.cfg.hidden_size;
        let mut x = vec![0.0f32; tokens.len() * h];
        ops::embedding(&self.embed, tokens, &mut x)?;
        // Once per forward: every layer shares the block tables.
        let (mode, tree) = (self.attention.mode(), self.attention.tree.is_some());
        let plan = batch.cascade_plan(cache, tree, &mode.plan_options())?;
        let sparse = self.attention.sparse;
        let start = plan
            .as_ref()
            .filter(|p| p.has_sparse())
            .map(|p| cascade::selection_start(p, &self.cfg.attention_params(), &sparse));
        let ctx = LayerCtx {
            cfg: &self.cfg,
            rope: &self.rope,
            precision: self.precision,
            tree: plan.as_ref().map(|plan| TreeCtx {
                plan,
                mode,
                sparse,
                start: start.as_ref(),
            }),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            layer.forward(i, &ctx, batch, cache, &mut x)?;
        }
        let normed = |rows: &[usize]| {
            let mut xn = vec![0.0f32; rows.len() * h];
            xn.par_chunks_mut(h)
                .zip(rows.par_iter())
                .for_each(|(o, &r)| {
                    ops::rms_norm(&x[r * h..(r + 1) * h], &self.norm, self.cfg.rms_eps, o)
                });
            xn
        };
        let xn = normed(logit_rows);
        let mut logits = vec![0.0f32; logit_rows.len() * self.cfg.out_dim()];
        self.head.apply(
            self.precision,
            &self.embed,
            &xn,
            logit_rows.len(),
            &mut logits,
        )?;
        // Normed again rather than picked out of `xn`: a hidden row need not be a logit row,
        // and the norm of one row costs nothing next to the head.
        Ok((logits, normed(hidden_rows)))
    }
}
