//! `POST /v1/chat/completions` request.

use super::common::{self, Sampling, StopSpec, StreamOptions, MAX_TOP_LOGPROBS};
use crate::error::ApiError;
use crate::prompt::Input;
use crate::worker::GenJob;
use arbor_runtime::ChatMessage;
use serde::Deserialize;

/// A message's content: text, or a list of parts of which only text parts are supported.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One content part.
#[derive(Clone, Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// One message as sent.
#[derive(Clone, Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

/// A chat completion request (`top_k`, `min_p` and `repetition_penalty` are extensions).
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<Message>>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<StopSpec>,
    pub seed: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub user: Option<String>,
    /// Sparse attention: KV pages per row (an extension; absent: dense).
    pub sparse_budget: Option<u64>,
}

/// The conversation as the chat template takes it; errors name the message at fault.
pub fn messages(msgs: Option<&[Message]>) -> Result<Vec<ChatMessage>, ApiError> {
    let msgs = msgs.ok_or_else(|| ApiError::invalid("messages", "missing field 'messages'"))?;
    if msgs.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let role = match m.role.as_str() {
            "developer" => "system",
            r @ ("system" | "user" | "assistant") => r,
            r => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!(
                        "role '{r}' is not supported: use system, developer, user or assistant"
                    ),
                ))
            }
        };
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content[{j}]"),
                                "only text content parts are supported",
                            ))
                        }
                    }
                }
                s
            }
        };
        out.push(ChatMessage::new(role, content));
    }
    Ok(out)
}

impl ChatRequest {
    /// Checks every field; the job for the worker.
    pub fn job(&self, served: &str) -> Result<GenJob, ApiError> {
        common::check_model(self.model.as_deref(), served)?;
        let msgs = messages(self.messages.as_deref())?;
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid("tools", "tools are not supported"));
        }
        let n = common::choices(self.n)?;
        let top = self.top_logprobs.unwrap_or(0);
        if top > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {top}"),
            ));
        }
        if self.top_logprobs.is_some() && !self.logprobs {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs set to true",
            ));
        }
        let max_tokens = match self.max_completion_tokens {
            Some(_) => common::max_tokens("max_completion_tokens", self.max_completion_tokens)?,
            None => common::max_tokens("max_tokens", self.max_tokens)?,
        };
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
            prompts: vec![Input::Chat(msgs)],
            n,
            sampling,
            max_tokens,
            stop: common::stops(self.stop.as_ref())?,
            logprobs: self.logprobs.then_some(top as usize),
            prompt_param: "messages",
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
