//! Progress reports for streaming frontends: each token a plain request samples and each event
//! a search's strategy is told, in the order they happened, drained with
//! [`Scheduler::take_progress`]. Off by default (nothing is recorded), so callers that only
//! read outcomes pay nothing; [`Scheduler::set_progress`] turns it on.

use super::job::TokenNews;
use super::search::SearchState;
use super::{RequestId, Scheduler};
use crate::strategy::Event;
use crate::tree::{NodeId, NodeStatus, StopReason};

/// One thing that happened to a request or search.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// A plain request sampled a token (end-of-generation tokens are not reported; the
    /// outcome says how the request ended).
    Token(TokenProgress),
    /// A search advanced.
    Search(SearchProgress),
}

/// A sampled token of a plain request.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenProgress {
    pub token: u32,
    /// Text this token completed (possibly empty: part of a multi-byte character). The
    /// concatenation of every token's text, then the rest of [`super::GenerateResult::text`],
    /// is the whole generation; stop strings are not cut here.
    pub text: String,
    /// Natural-log probability of `token` under the model's raw distribution.
    pub logprob: f32,
    /// The most likely tokens with their logprobs, when the request's
    /// `SamplingParams::top_logprobs` asked for them.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A search event, as its strategy was told it (plus prunings).
#[derive(Clone, Debug, PartialEq)]
pub enum SearchProgress {
    /// `node` (a child of `parent`) stopped generating.
    Expanded {
        parent: NodeId,
        node: NodeId,
        /// The node's own text (not its whole path).
        text: String,
        tokens: usize,
        logprob: f64,
        stop: Option<StopReason>,
    },
    /// The `children` of `node` were added from its most likely next tokens (those a
    /// strategy kept of the offer).
    ExpandedTopK { node: NodeId, children: Vec<NodeId> },
    /// Verifier `verifier` scored `node`.
    Scored {
        node: NodeId,
        verifier: usize,
        score: f64,
    },
    /// `node` was pruned.
    Pruned { node: NodeId, reason: String },
}

/// The scheduler's record of progress not yet taken.
#[derive(Debug, Default)]
pub(crate) struct ProgressLog {
    enabled: bool,
    items: Vec<(RequestId, Progress)>,
}

impl ProgressLog {
    /// Records a token of plain request `id`.
    pub fn token(&mut self, id: RequestId, news: &TokenNews, top: &[(u32, f32)]) {
        if self.enabled {
            self.items.push((
                id,
                Progress::Token(TokenProgress {
                    token: news.token,
                    text: news.text.clone(),
                    logprob: news.logprob,
                    top_logprobs: top.to_vec(),
                }),
            ));
        }
    }

    /// Records the events search `id` delivered to its strategy since the last call, and the
    /// nodes it pruned; empties the search's list of delivered events either way.
    pub fn search(&mut self, id: RequestId, s: &mut SearchState) {
        let delivered = std::mem::take(&mut s.delivered);
        if !self.enabled {
            return;
        }
        for e in delivered {
            let p = match e {
                Event::Expanded { node, child } => {
                    let Some(n) = s.tree.node(child) else {
                        continue;
                    };
                    SearchProgress::Expanded {
                        parent: node,
                        node: child,
                        text: n.text.clone(),
                        tokens: n.tokens.len(),
                        logprob: n.logprob,
                        stop: n.stop,
                    }
                }
                // The options a beam keeps become nodes: those are reported.
                Event::TopK { .. } => continue,
                Event::Extended { node, children } => {
                    SearchProgress::ExpandedTopK { node, children }
                }
                Event::Scored {
                    node,
                    verifier,
                    score,
                } => SearchProgress::Scored {
                    node,
                    verifier,
                    score,
                },
            };
            self.items.push((id, Progress::Search(p)));
        }
        for &node in &s.killed {
            let reason = match s.tree.node(node).map(|n| &n.status) {
                Some(NodeStatus::Pruned { reason }) => reason.clone(),
                _ => String::new(),
            };
            self.items.push((
                id,
                Progress::Search(SearchProgress::Pruned { node, reason }),
            ));
        }
    }
}

impl Scheduler {
    /// Turns progress recording on or off (off drops what was not taken).
    pub fn set_progress(&mut self, on: bool) {
        self.progress.enabled = on;
        if !on {
            self.progress.items.clear();
        }
    }

    /// Takes the progress recorded since the last call, oldest first. Progress of a request
    /// always comes before its outcome in [`Scheduler::take_finished`] is taken, provided both
    /// are taken after the same tick.
    pub fn take_progress(&mut self) -> Vec<(RequestId, Progress)> {
        std::mem::take(&mut self.progress.items)
    }
}
