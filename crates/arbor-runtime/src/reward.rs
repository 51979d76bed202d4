//! Trained reward models: a decoder backbone whose output head is a small classifier
//! (`score`, `num_labels` outputs) instead of the LM head.
//!
//! Such a model loads through [`crate::load`] / [`crate::Model::load`] like any HF directory;
//! its [`crate::ModelConfig::reward`] says what the head is, and [`crate::Engine::step`] then
//! returns head outputs where it would return logits (`num_labels` per row instead of
//! `vocab_size`): [`crate::LogitsMode::Last`] gives an outcome reward model's sequence score,
//! [`crate::LogitsMode::All`] a process reward model's per-position scores (read them at the
//! step-separator tokens, see [`separator_positions`]). Sampling from such a model is refused.
//!
//! # Turning a row of head outputs into a score
//!
//! [`RewardHead::raw`] is the log-odds that the sequence (or step) is good:
//! - `num_labels == 1`: the output itself (a Bradley–Terry reward, as in Skywork-Reward and
//!   most outcome RMs);
//! - `num_labels >= 2`: `log p(good) − log(1 − p(good))` under a softmax over the labels,
//!   which for two labels is `out[good] − out[other]`.
//!
//! [`RewardHead::prob`] is `sigmoid(raw)`: `p(good)` for classifiers, a squashed reward in
//! (0, 1) for single-output heads. The "good" label is [`RewardHead::positive`]: the label
//! named `positive`, `good`, `correct`, `yes`, `true` or `+` (any case) if there is one, else
//! label 1 (HF's default `LABEL_1`); callers may set it to another index.

use crate::RuntimeError;
use serde_json::Value;

/// What a reward model scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewardKind {
    /// Outcome reward (`*ForSequenceClassification`): one score per sequence, the head's
    /// output at the sequence's last token. (transformers pools the last token that is not
    /// `pad_token_id`; for models whose pad token is their EOS, do not end the scored
    /// sequence with it, or score the row before it.)
    Outcome,
    /// Process reward (`*ForTokenClassification`): the head's output at every position; a
    /// step is scored at its step-separator token.
    Process,
}

/// HF class-name prefixes of the backbones a reward head may sit on.
const BACKBONES: [&str; 4] = ["Llama", "Mistral", "Qwen2", "Qwen3"];

/// The reward-head architectures arbor loads (`config.json` `architectures[0]`).
pub fn supported_architectures() -> Vec<String> {
    let kinds = ["ForSequenceClassification", "ForTokenClassification"];
    kinds
        .iter()
        .flat_map(|k| BACKBONES.iter().map(move |b| format!("{b}{k}")))
        .collect()
}

/// Names that mark the "good" label of a classifier head.
const POSITIVE_NAMES: [&str; 6] = ["positive", "good", "correct", "yes", "true", "+"];

/// A reward head: what it scores and what its outputs mean.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RewardHead {
    pub kind: RewardKind,
    /// HF architecture name, e.g. `Qwen2ForSequenceClassification`.
    pub architecture: String,
    /// Outputs per position (the width of the rows `Engine::step` returns).
    pub num_labels: usize,
    /// Label names by index (`id2label`, or `LABEL_<i>`).
    pub labels: Vec<String>,
    /// Index of the label meaning "good" (ignored when `num_labels == 1`).
    pub positive: usize,
}

impl RewardHead {
    /// Reads the head from an HF `config.json`: `None` for a causal LM (an architecture
    /// ending in `ForCausalLM`, or none given), an error for any other architecture than
    /// the supported classifiers.
    pub fn from_hf_config(v: &Value) -> Result<Option<Self>, RuntimeError> {
        let Some(arch) = v
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
        else {
            return Ok(None);
        };
        if arch.ends_with("ForCausalLM") {
            return Ok(None);
        }
        let kind = match arch {
            a if a.ends_with("ForSequenceClassification") => RewardKind::Outcome,
            a if a.ends_with("ForTokenClassification") => RewardKind::Process,
            _ => return Err(unsupported(arch)),
        };
        let prefix = arch
            .trim_end_matches("ForSequenceClassification")
            .trim_end_matches("ForTokenClassification");
        if !BACKBONES.contains(&prefix) {
            return Err(unsupported(arch));
        }
        // transformers writes `id2label` only when it differs from the default, and never
        // `num_labels`: absent both, a classifier has HF's default of 2 labels.
        let id2label = v.get("id2label").and_then(Value::as_object);
        let num_labels = match (v.get("num_labels").and_then(Value::as_u64), id2label) {
            (Some(n), _) => n as usize,
            (None, Some(m)) => m.len(),
            (None, None) => 2,
        };
        if num_labels == 0 || num_labels > 1 << 16 {
            return Err(RuntimeError::Config(format!(
                "{arch} with {num_labels} labels"
            )));
        }
        let labels: Vec<String> = (0..num_labels)
            .map(|i| {
                id2label
                    .and_then(|m| m.get(&i.to_string()))
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("LABEL_{i}"), str::to_string)
            })
            .collect();
        let positive = labels
            .iter()
            .position(|l| POSITIVE_NAMES.contains(&l.to_ascii_lowercase().as_str()))
            .unwrap_or(if num_labels > 1 { 1 } else { 0 });
        Ok(Some(RewardHead {
            kind,
            architecture: arch.to_string(),
            num_labels,
            labels,
            positive,
        }))
    }

    /// The log-odds that the row's sequence/step is good (see the module docs); `row` is one
    /// row of head outputs (`num_labels` values).
    pub fn raw(&self, row: &[f32]) -> f32 {
        if self.num_labels == 1 || row.len() < 2 {
            return row.first().copied().unwrap_or(f32::NAN);
        }
        let pos = self.positive.min(row.len() - 1);
        // log(1 − p) − log Z = logsumexp of the other labels.
        let m = row
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != pos)
            .map(|(_, &x)| x)
            .fold(f32::NEG_INFINITY, f32::max);
        let others: f32 = row
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != pos)
            .map(|(_, &x)| (x - m).exp())
            .sum();
        row[pos] - (m + others.ln())
    }

    /// `sigmoid(raw(row))`, in (0, 1): `p(good)` for classifier heads.
    pub fn prob(&self, row: &[f32]) -> f32 {
        sigmoid(self.raw(row))
    }
}

fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn unsupported(arch: &str) -> RuntimeError {
    RuntimeError::Config(format!(
        "architecture '{arch}' is not supported: arbor loads *ForCausalLM models and the \
         reward heads {}",
        supported_architectures().join(", ")
    ))
}

/// Indices of the last token of every occurrence of `sep` in `tokens` (non-overlapping, left
/// to right): where a process reward model's per-position output scores each step.
pub fn separator_positions(tokens: &[u32], sep: &[u32]) -> Vec<usize> {
    let mut out = Vec::new();
    if sep.is_empty() {
        return out;
    }
    let mut i = 0;
    while i + sep.len() <= tokens.len() {
        if tokens[i..i + sep.len()] == *sep {
            out.push(i + sep.len() - 1);
            i += sep.len();
        } else {
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(json: &str) -> Result<Option<RewardHead>, RuntimeError> {
        RewardHead::from_hf_config(&serde_json::from_str(json).expect("json"))
    }

    #[test]
    fn detects_kind_labels_and_positive() {
        assert_eq!(
            head(r#"{"architectures":["LlamaForCausalLM"]}"#).unwrap(),
            None
        );
        assert_eq!(head("{}").unwrap(), None);
        let h = head(r#"{"architectures":["Qwen2ForTokenClassification"]}"#)
            .unwrap()
            .unwrap();
        assert_eq!(h.kind, RewardKind::Process);
        assert_eq!((h.num_labels, h.positive), (2, 1));
        assert_eq!(h.labels, ["LABEL_0", "LABEL_1"]);
        let h = head(
            r#"{"architectures":["MistralForSequenceClassification"],
                "id2label":{"0":"Good","1":"bad","2":"neutral"}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (h.kind, h.num_labels, h.positive),
            (RewardKind::Outcome, 3, 0)
        );
    }

    #[test]
    fn unsupported_heads_name_the_supported_ones() {
        for arch in [
            "Qwen2ForProcessRewardModel",
            "GPT2ForSequenceClassification",
        ] {
            let e = head(&format!(r#"{{"architectures":["{arch}"]}}"#)).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(arch) && msg.contains("LlamaForTokenClassification"),
                "{msg}"
            );
        }
    }

    #[test]
    fn scores_follow_the_convention() {
        let one = head(r#"{"architectures":["LlamaForSequenceClassification"],"num_labels":1}"#)
            .unwrap()
            .unwrap();
        assert_eq!(one.raw(&[2.5]), 2.5);
        assert!((one.prob(&[0.0]) - 0.5).abs() < 1e-7);
        let two = head(r#"{"architectures":["LlamaForTokenClassification"]}"#)
            .unwrap()
            .unwrap();
        assert!((two.raw(&[1.0, 3.0]) - 2.0).abs() < 1e-6);
        let p = 3f32.exp() / (1f32.exp() + 3f32.exp());
        assert!((two.prob(&[1.0, 3.0]) - p).abs() < 1e-6);
        let mut three = two.clone();
        three.num_labels = 3;
        let row = [0.5f32, 2.0, -1.0];
        let z: f32 = row.iter().map(|x| x.exp()).sum();
        assert!((three.prob(&row) - 2f32.exp() / z).abs() < 1e-6);
        assert!(three.prob(&[0.0, -1e4, 0.0]) >= 0.0);
    }

    #[test]
    fn separators_are_found_left_to_right() {
        assert_eq!(separator_positions(&[1, 9, 9, 2, 9, 9, 9], &[9, 9]), [2, 5]);
        assert_eq!(separator_positions(&[1, 2], &[]), Vec::<usize>::new());
        assert_eq!(separator_positions(&[7], &[7]), [0]);
    }
}
