//! What handlers and the worker say to each other: commands in, per-request updates out.

use crate::error::ApiError;
use crate::prompt::Input;
use arbor_kernels::kv::KvStats;
use arbor_kernels::ops::SamplingParams;
use arbor_search::scheduler::SearchProgress;
use arbor_search::verifier::Verifier;
use arbor_search::{GenerateResult, SearchResult, Strategy};
use std::time::Duration;
use tokio::sync::{mpsc::UnboundedSender, oneshot};

/// Identifies one HTTP request's work in the worker (it may span several scheduler ids).
pub type Ticket = u64;

/// A generation: `n` choices of each prompt.
pub struct GenJob {
    pub prompts: Vec<Input>,
    pub n: usize,
    pub sampling: SamplingParams,
    /// Most tokens per choice; `None`: up to the context.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    /// Report each token's logprob and this many alternatives.
    pub logprobs: Option<usize>,
    /// The request field holding the prompt, for errors ("prompt" or "messages").
    pub prompt_param: &'static str,
    /// Sparse attention budget in KV pages per row; `None`: dense.
    pub sparse_budget: Option<usize>,
}

/// A search.
pub struct SearchJob {
    pub input: Input,
    pub question: String,
    pub strategy: Box<dyn Strategy>,
    pub verifier: Verifier,
    pub sampling: SamplingParams,
    pub max_policy_tokens: Option<u64>,
    pub max_wall: Option<Duration>,
    pub prompt_param: &'static str,
    /// Sparse attention budget of every branch in KV pages per row; `None`: dense.
    pub sparse_budget: Option<usize>,
}

/// What handlers ask of the worker.
pub enum Command {
    Generate {
        ticket: Ticket,
        job: Box<GenJob>,
        tx: UnboundedSender<Update>,
    },
    Search {
        ticket: Ticket,
        job: Box<SearchJob>,
        tx: UnboundedSender<Update>,
    },
    /// Ends a ticket's work and frees its pages (client gone, timeout).
    Cancel(Ticket),
    /// Ends all work (shutdown grace period over).
    CancelAll,
    Stats(oneshot::Sender<EngineStats>),
}

/// A token with its logprob as clients see it.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// What the worker tells a handler, in order: `Accepted` or `Rejected` first, then progress,
/// then one `Done` per choice (or one `SearchDone`).
pub enum Update {
    /// Prompt token counts, one per prompt.
    Accepted {
        prompt_tokens: Vec<usize>,
    },
    Rejected(ApiError),
    Token {
        choice: usize,
        text: String,
        logprob: Option<(TokenLogprob, Vec<TokenLogprob>)>,
    },
    Done {
        choice: usize,
        result: Result<GenerateResult, String>,
    },
    Search(SearchProgress),
    SearchDone(Result<Box<SearchResult>, String>),
}

/// The engine's state for `/metrics` and tests.
#[derive(Clone, Debug)]
pub struct EngineStats {
    pub kv: KvStats,
    /// Requests and searches the scheduler holds.
    pub active: usize,
    pub ticks: u64,
    pub preemptions: u64,
}
