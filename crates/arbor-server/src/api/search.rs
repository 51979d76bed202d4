//! `POST /v1/search` request: a strategy over the prompt, as `arbor search` runs it.

use super::chat::{messages, Message};
use super::common::{check_model, sparse_budget, Sampling};
use crate::error::ApiError;
use crate::prompt::Input;
use crate::worker::SearchJob;
use arbor_search::spec::{self, VerifierOptions};
use arbor_search::{strategies, Params};
use serde::Deserialize;
use std::time::Duration;

/// Widest search one request may ask for.
pub const MAX_WIDTH: u32 = 64;

/// A search request.
#[derive(Clone, Debug, Deserialize)]
pub struct SearchApiRequest {
    pub model: Option<String>,
    /// The question, sent as one user turn (or as plain text with `raw`).
    pub prompt: Option<String>,
    /// A conversation instead of `prompt`; its last user message is the question verifiers see.
    pub messages: Option<Vec<Message>>,
    #[serde(default)]
    pub raw: bool,
    pub strategy: Option<String>,
    pub width: Option<u32>,
    /// Strategy parameters: name → number, text or boolean.
    pub params: Option<serde_json::Map<String, serde_json::Value>>,
    /// `judge` (default), `rule` (needs `answer`), `regex:PATTERN`, or `command:CMD` and
    /// `code[:PYTHON]` when the server allows them.
    pub verifier: Option<String>,
    /// The expected answer, for the `rule` verifier.
    pub answer: Option<String>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    /// Stop after this many policy tokens, answering with the best candidate so far.
    pub max_policy_tokens: Option<u64>,
    /// Stop after this many seconds, likewise.
    pub max_seconds: Option<f64>,
    #[serde(default)]
    pub include_tree: bool,
    #[serde(default)]
    pub stream: bool,
    /// Sparse attention for every branch: KV pages per row (absent: dense).
    pub sparse_budget: Option<u64>,
}

impl SearchApiRequest {
    /// Checks every field; the job for the worker.
    pub fn job(&self, served: &str, verifiers: &VerifierOptions) -> Result<SearchJob, ApiError> {
        check_model(self.model.as_deref(), served)?;
        let (input, question, param) = match (&self.prompt, &self.messages) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "messages",
                    "give prompt or messages, not both",
                ))
            }
            (None, None) => {
                return Err(ApiError::invalid(
                    "prompt",
                    "missing field 'prompt' (or 'messages')",
                ))
            }
            (Some(p), None) => (
                if self.raw {
                    Input::Text(p.clone())
                } else {
                    Input::UserTurn(p.clone())
                },
                p.clone(),
                "prompt",
            ),
            (None, Some(m)) => {
                let msgs = messages(Some(m))?;
                let q = msgs
                    .iter()
                    .rev()
                    .find(|m| m.role == "user")
                    .map_or_else(String::new, |m| m.content.clone());
                (Input::Chat(msgs), q, "messages")
            }
        };
        let name = self
            .strategy
            .as_deref()
            .ok_or_else(|| ApiError::invalid("strategy", "missing field 'strategy'"))?;
        if !strategies::NAMES.contains(&name) {
            return Err(ApiError::invalid(
                "strategy",
                format!(
                    "unknown strategy '{name}'; one of: {}",
                    strategies::NAMES.join(", ")
                ),
            ));
        }
        let width = self.width.unwrap_or(4);
        if width == 0 || width > MAX_WIDTH {
            return Err(ApiError::invalid(
                "width",
                format!("width must be between 1 and {MAX_WIDTH}, got {width}"),
            ));
        }
        let mut params = Params::new(width as usize);
        for (k, v) in self.params.iter().flatten() {
            let v = match v {
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(ApiError::invalid(
                        format!("params.{k}"),
                        "a parameter must be a number, a string or a boolean",
                    ))
                }
            };
            params = params.set(k, v);
        }
        let strategy =
            strategies::build(name, &params).map_err(|e| ApiError::invalid("params", e))?;
        let spec_text = self.verifier.as_deref().unwrap_or("judge");
        let verifier =
            spec::verifier(spec_text, self.answer.as_deref(), verifiers).map_err(|e| {
                let hint = if spec_text.starts_with("command:") || spec_text.starts_with("code") {
                    " (start arbor serve with --allow-command-verifier to allow them)"
                } else {
                    ""
                };
                ApiError::invalid("verifier", format!("{e}{hint}"))
            })?;
        let max_wall = match self.max_seconds {
            Some(s) if !(s > 0.0 && s <= 86_400.0) => {
                return Err(ApiError::invalid(
                    "max_seconds",
                    "max_seconds must be above 0 and at most 86400",
                ))
            }
            s => s.map(Duration::from_secs_f64),
        };
        if self.max_policy_tokens == Some(0) {
            return Err(ApiError::invalid(
                "max_policy_tokens",
                "max_policy_tokens must be at least 1",
            ));
        }
        let sampling = Sampling {
            temperature: Some(self.temperature.unwrap_or(0.8)),
            top_p: Some(self.top_p.unwrap_or(0.95)),
            top_k: self.top_k,
            min_p: self.min_p,
            seed: Some(self.seed.unwrap_or(0)),
            ..Default::default()
        }
        .params()?;
        Ok(SearchJob {
            input,
            question,
            strategy,
            verifier,
            sampling,
            max_policy_tokens: self.max_policy_tokens,
            max_wall,
            prompt_param: param,
            sparse_budget: sparse_budget(self.sparse_budget)?,
        })
    }
}
