//! The OpenAI response shapes of completions and chat completions, whole and as stream
//! chunks.

use crate::generation::{Logprob, Piece, Run};
use crate::worker::TokenLogprob;
use serde_json::{json, Map, Value};

/// Which endpoint's shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Completion,
    Chat,
}

impl Flavor {
    pub fn id_prefix(self) -> &'static str {
        match self {
            Flavor::Completion => "cmpl",
            Flavor::Chat => "chatcmpl",
        }
    }
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Flavor::Completion, _) => "text_completion",
            (Flavor::Chat, false) => "chat.completion",
            (Flavor::Chat, true) => "chat.completion.chunk",
        }
    }
}

/// What every body of one response repeats.
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub flavor: Flavor,
    /// Whether logprobs were asked for.
    pub logprobs: bool,
}

fn envelope(m: &Meta, chunk: bool, choices: Vec<Value>) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("id".into(), json!(m.id));
    o.insert("object".into(), json!(m.flavor.object(chunk)));
    o.insert("created".into(), json!(m.created));
    o.insert("model".into(), json!(m.model));
    o.insert("system_fingerprint".into(), Value::Null);
    o.insert("choices".into(), Value::Array(choices));
    o
}

fn chat_entry(t: &TokenLogprob) -> Value {
    json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes})
}

/// Logprobs in the endpoint's shape; `offset` is the text offset of the first token
/// (completions only).
fn logprobs(m: &Meta, lps: &[Logprob], offset: usize) -> Value {
    if !m.logprobs {
        return Value::Null;
    }
    match m.flavor {
        Flavor::Chat => json!({
            "content": lps.iter().map(|(t, top)| {
                let mut e = chat_entry(t);
                e["top_logprobs"] = top.iter().map(chat_entry).collect();
                e
            }).collect::<Vec<_>>(),
        }),
        Flavor::Completion => {
            let mut off = offset;
            let mut offsets = Vec::with_capacity(lps.len());
            for (t, _) in lps {
                offsets.push(off);
                off += t.bytes.len();
            }
            json!({
                "tokens": lps.iter().map(|(t, _)| &t.token).collect::<Vec<_>>(),
                "token_logprobs": lps.iter().map(|(t, _)| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": lps.iter().map(|(_, top)| {
                    top.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

fn usage(run: &Run) -> Value {
    let c = run.completion_tokens();
    json!({
        "prompt_tokens": run.prompt_tokens,
        "completion_tokens": c,
        "total_tokens": run.prompt_tokens + c,
    })
}

/// The whole (non-streamed) response.
pub fn full(m: &Meta, run: &Run) -> Value {
    let choices = run
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| match m.flavor {
            Flavor::Completion => json!({
                "index": i,
                "text": c.text,
                "logprobs": logprobs(m, &c.logprobs, 0),
                "finish_reason": c.finish,
            }),
            Flavor::Chat => json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": logprobs(m, &c.logprobs, 0),
                "finish_reason": c.finish,
            }),
        })
        .collect();
    let mut o = envelope(m, false, choices);
    o.insert("usage".into(), usage(run));
    Value::Object(o)
}

/// A chat stream's first chunk of a choice: the assistant role.
pub fn role_chunk(m: &Meta, index: usize, with_usage: bool) -> Value {
    let choice = json!({
        "index": index,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": Value::Null,
        "finish_reason": Value::Null,
    });
    let mut o = envelope(m, true, vec![choice]);
    if with_usage {
        o.insert("usage".into(), Value::Null);
    }
    Value::Object(o)
}

/// A stream chunk carrying `p`; `offset` is the choice's text sent so far.
pub fn chunk(m: &Meta, p: &Piece, offset: usize, with_usage: bool) -> Value {
    let lp = logprobs(m, &p.logprobs, offset);
    let choice = match m.flavor {
        Flavor::Completion => json!({
            "index": p.choice,
            "text": p.text,
            "logprobs": lp,
            "finish_reason": p.finish,
        }),
        Flavor::Chat => {
            let delta = if p.text.is_empty() && p.finish.is_some() {
                json!({})
            } else {
                json!({"content": p.text})
            };
            json!({
                "index": p.choice,
                "delta": delta,
                "logprobs": lp,
                "finish_reason": p.finish,
            })
        }
    };
    let mut o = envelope(m, true, vec![choice]);
    if with_usage {
        o.insert("usage".into(), Value::Null);
    }
    Value::Object(o)
}

/// The last chunk of a stream with `stream_options.include_usage`: no choices, the usage.
pub fn usage_chunk(m: &Meta, run: &Run) -> Value {
    let mut o = envelope(m, true, vec![]);
    o.insert("usage".into(), usage(run));
    Value::Object(o)
}
