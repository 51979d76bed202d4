//! Fields the completion and chat endpoints share, and their range checks.

use crate::error::ApiError;
use arbor_kernels::ops::SamplingParams;
use serde::Deserialize;

/// Most choices one request may ask for.
pub const MAX_N: u32 = 64;
/// Most alternatives per token with logprobs.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most stop strings.
pub const MAX_STOPS: usize = 16;
/// Longest stop string in bytes (matching across tokens costs its length squared per token).
pub const MAX_STOP_BYTES: usize = 256;

/// `stop`: one string or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields of a request, as sent.
#[derive(Clone, Debug, Default)]
pub struct Sampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<i64>,
}

fn range(param: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::invalid(
            param,
            format!("{param} must be between {lo} and {hi}, got {x}"),
        )),
        _ => Ok(()),
    }
}

impl Sampling {
    /// Checks the ranges (each error names its field) and makes the engine's parameters.
    /// OpenAI's default temperature is 1.
    pub fn params(&self) -> Result<SamplingParams, ApiError> {
        range("temperature", self.temperature, 0.0, 2.0)?;
        range("top_p", self.top_p, 0.0, 1.0)?;
        if self.top_p == Some(0.0) {
            return Err(ApiError::invalid("top_p", "top_p must be above 0"));
        }
        range("min_p", self.min_p, 0.0, 1.0)?;
        range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        range("repetition_penalty", self.repetition_penalty, 0.01, 10.0)?;
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if (1..=1_000_000).contains(&k) => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be -1 or 0 (off) or a positive count, got {k}"),
                ))
            }
        };
        Ok(SamplingParams {
            temperature: self.temperature.unwrap_or(1.0) as f32,
            top_k,
            top_p: self.top_p.unwrap_or(1.0) as f32,
            min_p: self.min_p.unwrap_or(0.0) as f32,
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0) as f32,
            presence_penalty: self.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0) as f32,
            // Without a seed each request draws its own.
            seed: self.seed.map_or_else(fresh_seed, |s| s as u64),
            top_logprobs: 0,
        })
    }
}

/// A seed for a request that gave none.
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// `n`, checked: 1 by default, at most [`MAX_N`].
pub fn choices(n: Option<u32>) -> Result<usize, ApiError> {
    match n.unwrap_or(1) {
        0 => Err(ApiError::invalid("n", "n must be at least 1")),
        n if n > MAX_N => Err(ApiError::invalid(
            "n",
            format!("n must be at most {MAX_N}, got {n}"),
        )),
        n => Ok(n as usize),
    }
}

/// `max_tokens` (or its chat alias), checked: at least 1.
pub fn max_tokens(param: &str, v: Option<u32>) -> Result<Option<usize>, ApiError> {
    match v {
        Some(0) => Err(ApiError::invalid(
            param,
            format!("{param} must be at least 1"),
        )),
        v => Ok(v.map(|v| v as usize)),
    }
}

/// The stop strings, checked: non-empty, at most [`MAX_STOPS`].
pub fn stops(s: Option<&StopSpec>) -> Result<Vec<String>, ApiError> {
    let v = match s {
        None => vec![],
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    if v.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOPS} stop strings, got {}", v.len()),
        ));
    }
    if v.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    if v.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            "stop",
            format!("stop strings must be at most {MAX_STOP_BYTES} bytes"),
        ));
    }
    Ok(v)
}

/// `sparse_budget` (an extension), checked: KV pages each row reads beside its sink and
/// local pages, at least 1; absent: every page (dense attention). Whether the engine's
/// device runs sparse attention is the worker's check.
pub fn sparse_budget(v: Option<u64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(0) => Err(ApiError::invalid(
            "sparse_budget",
            "sparse_budget must be at least 1 (KV pages per row); leave it out for dense attention",
        )),
        // Past the address space means every page anyway.
        Some(b) => Ok(Some(usize::try_from(b).unwrap_or(usize::MAX))),
    }
}

/// A `model` field: the served model, or absent.
pub fn check_model(asked: Option<&str>, served: &str) -> Result<(), ApiError> {
    match asked {
        Some(m) if !m.is_empty() && m != served => Err(ApiError::unknown_model(m, served)),
        _ => Ok(()),
    }
}
