//! `POST /v1/completions` request.

use super::common::{self, Sampling, StopSpec, StreamOptions, MAX_TOP_LOGPROBS};
use crate::error::ApiError;
use crate::prompt::Input;
use crate::worker::GenJob;
use serde::Deserialize;

/// `prompt`: a string, a list of strings, token ids, or a list of token-id lists.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptSpec {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// A completion request (OpenAI's legacy completions; `top_k`, `min_p` and
/// `repetition_penalty` are extensions).
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<PromptSpec>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub n: Option<u32>,
    pub best_of: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<StopSpec>,
    pub seed: Option<i64>,
    /// Logprobs of each token and this many alternatives.
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub user: Option<String>,
    /// Sparse attention: KV pages per row (an extension; absent: dense).
    pub sparse_budget: Option<u64>,
}

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: usize = 16;

impl CompletionRequest {
    /// Checks every field; the job for the worker.
    pub fn job(&self, served: &str) -> Result<GenJob, ApiError> {
        common::check_model(self.model.as_deref(), served)?;
        let prompts = match &self.prompt {
            None => return Err(ApiError::invalid("prompt", "missing field 'prompt'")),
            Some(PromptSpec::Text(t)) => vec![Input::Text(t.clone())],
            Some(PromptSpec::Texts(v)) => v.iter().cloned().map(Input::Text).collect(),
            Some(PromptSpec::Tokens(v)) => vec![Input::Tokens(v.clone())],
            Some(PromptSpec::TokenLists(v)) => v.iter().cloned().map(Input::Tokens).collect(),
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt list is empty"));
        }
        if prompts.len() > 64 {
            return Err(ApiError::invalid(
                "prompt",
                "at most 64 prompts per request",
            ));
        }
        if self.echo {
            return Err(ApiError::invalid("echo", "echo is not supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix", "suffix is not supported"));
        }
        let n = common::choices(self.n)?;
        if self.best_of.is_some_and(|b| b as usize != n) {
            return Err(ApiError::invalid(
                "best_of",
                "best_of other than n is not supported: use /v1/search with strategy best-of-n",
            ));
        }
        if n * prompts.len() > common::MAX_N as usize {
            return Err(ApiError::invalid(
                "n",
                format!("n × prompts must be at most {}", common::MAX_N),
            ));
        }
        if let Some(k) = self.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be at most {MAX_TOP_LOGPROBS}, got {k}"),
            ));
        }
        let sampling = Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
        .params()?;
        Ok(GenJob {
            prompts,
            n,
            sampling,
            max_tokens: Some(
                common::max_tokens("max_tokens", self.max_tokens)?.unwrap_or(DEFAULT_MAX_TOKENS),
            ),
            stop: common::stops(self.stop.as_ref())?,
            logprobs: self.logprobs.map(|k| k as usize),
            prompt_param: "prompt",
            sparse_budget: common::sparse_budget(self.sparse_budget)?,
        })
    }

    /// Whether the usage chunk is streamed.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}
