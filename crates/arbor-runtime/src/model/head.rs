//! The output head: what turns final-normed hidden states into a model's output rows —
//! vocabulary logits for a causal LM, label scores for a reward model.

use super::linear::{linear, Precision};
use super::source::TensorSource;
use crate::config::ModelConfig;
use crate::RuntimeError;
use arbor_kernels::Weight;

/// A model's output head.
pub enum Head {
    /// LM head tied to the token embedding (no `output.weight` / `lm_head.weight`).
    Tied,
    /// Untied LM head, `vocab × hidden`.
    Lm(Weight),
    /// A reward model's classifier `score`: `num_labels × hidden`, and `score.bias` when the
    /// model has one (HF token classifiers do by default, sequence classifiers never).
    Score {
        weight: Weight,
        bias: Option<Vec<f32>>,
    },
}

impl Head {
    /// Loads the head `cfg` calls for.
    pub fn load(src: &TensorSource, cfg: &ModelConfig) -> Result<Self, RuntimeError> {
        let h = cfg.hidden_size;
        if let Some(r) = &cfg.reward {
            return Ok(Head::Score {
                weight: src.req_matrix("score.weight", r.num_labels, h)?,
                bias: src.vector("score.bias", r.num_labels)?,
            });
        }
        if cfg.tie_embeddings {
            return Ok(Head::Tied);
        }
        // An untied config without the tensor falls back to the embedding, as before.
        Ok(src
            .matrix("output.weight", cfg.vocab_size, h)?
            .map_or(Head::Tied, Head::Lm))
    }

    /// `out (m × out_dim) = xn (m × hidden) · Wᵀ (+ bias)`; `embed` is the tied weight.
    pub fn apply(
        &self,
        p: Precision,
        embed: &Weight,
        xn: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), RuntimeError> {
        match self {
            Head::Tied => linear(p, xn, m, embed, out),
            Head::Lm(w) => linear(p, xn, m, w, out),
            Head::Score { weight, bias } => {
                linear(p, xn, m, weight, out)?;
                if let Some(b) = bias {
                    out.chunks_exact_mut(b.len())
                        .for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
                }
                Ok(())
            }
        }
    }

    /// Bytes of weights the head holds beyond the embedding.
    pub fn nbytes(&self) -> usize {
        match self {
            Head::Tied => 0,
            Head::Lm(w) => w.nbytes(),
            Head::Score { weight, bias } => {
                weight.nbytes() + bias.as_ref().map_or(0, |b| b.len() * 4)
            }
        }
    }
}
