//! A job: one engine sequence the scheduler is running for a request or a search, and what
//! to do with each token it yields.

use crate::strategy::Until;
use crate::tree::{NodeId, StopReason};
use arbor_kernels::kv::SeqId;
use arbor_kernels::ops::SamplingParams;
use arbor_runtime::{DetachedDecoder, Engine, Tokenizer};

use super::RequestId;

/// What a job is for.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum JobKind {
    /// Computes a prompt's K/V (all but its last token) so that children can fork it.
    Prefill { node: NodeId },
    /// Samples tokens until a stop: a plain request (node `None`) or a search child.
    Generate { node: Option<NodeId> },
    /// Feeds a node's last token and reports its `k` most likely successors.
    TopK { node: NodeId, k: usize },
    /// Runs a judging prompt and reads p(yes) against p(no).
    Judge {
        node: NodeId,
        verifier: usize,
        yes: u32,
        no: u32,
    },
}

/// One running sequence.
pub(crate) struct Job {
    pub owner: RequestId,
    pub seq: SeqId,
    pub kind: JobKind,
    /// Tokens to feed in the next step (a prompt, or the token sampled last).
    pub feed: Vec<u32>,
    pub sampling: SamplingParams,
    pub until: Until,
    /// Tokens of the sequence before this job's generation (prompt and path).
    pub context: usize,
    pub generated: Vec<u32>,
    pub text: String,
    pub decoder: DetachedDecoder,
    /// Set when the job has finished and waits to be reaped.
    pub done: Option<StopReason>,
}

/// One token's news for a generating job.
pub(crate) struct TokenNews {
    pub token: u32,
    pub text: String,
    pub logprob: f32,
    pub entropy: f32,
}

impl Job {
    pub fn new(owner: RequestId, seq: SeqId, kind: JobKind, feed: Vec<u32>) -> Self {
        Job {
            owner,
            seq,
            kind,
            feed,
            sampling: SamplingParams::default(),
            until: Until::default(),
            context: 0,
            generated: Vec::new(),
            text: String::new(),
            decoder: DetachedDecoder::new(true),
            done: None,
        }
    }

    /// The job that computes the anchor of `node` (a fresh sequence holding all of the node's
    /// path `path` but its last token, which each child feeds itself).
    pub fn prefill(engine: &mut Engine, owner: RequestId, node: NodeId, path: &[u32]) -> Self {
        let seq = engine.new_seq();
        let feed = path[..path.len().saturating_sub(1)].to_vec();
        Job::new(owner, seq, JobKind::Prefill { node }, feed)
    }

    /// Takes a sampled token: EOS ends the job (unless `ignore_eos`); otherwise the token is recorded, its text
    /// decoded, and the job's limits checked. Returns the news (None for EOS) and the stop.
    pub fn take_token(
        &mut self,
        tok: &Tokenizer,
        token: u32,
        logprob: f32,
        entropy: f32,
        max_context: usize,
        ignore_eos: bool,
    ) -> (Option<TokenNews>, Option<StopReason>) {
        if !ignore_eos && tok.is_eog(token) {
            return (None, Some(StopReason::Eos));
        }
        let text = self.decoder.push(tok, token);
        self.generated.push(token);
        let before = self.text.len();
        self.text.push_str(&text);
        let news = TokenNews {
            token,
            text,
            logprob,
            entropy,
        };
        // Search only the new text plus a stop string's length of what came before.
        let longest = self
            .until
            .stop
            .iter()
            .chain(&self.until.delimiters)
            .map(String::len)
            .max()
            .unwrap_or(0);
        let mut from = before.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let tail = &self.text[from..];
        let hit = |v: &[String]| v.iter().any(|s| !s.is_empty() && tail.contains(s.as_str()));
        let stop = if hit(&self.until.stop) {
            Some(StopReason::Stop)
        } else if hit(&self.until.delimiters) {
            Some(StopReason::Delimiter)
        } else if self.context + self.generated.len() + 1 >= max_context {
            Some(StopReason::Context)
        } else if self.until.max_tokens > 0 && self.generated.len() >= self.until.max_tokens {
            Some(StopReason::Length)
        } else {
            None
        };
        (Some(news), stop)
    }
}
