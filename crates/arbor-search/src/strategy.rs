//! The interface of a search strategy: an event-driven state machine over a [`SearchTree`].
//! The scheduler carries out the actions a strategy asks for (batched with every other
//! search's) and reports back with events; the strategy never runs a model itself.

use crate::tree::{NodeId, SearchTree};

/// What a strategy asks the scheduler to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Sample `k` continuations of `node`, each until EOS, `stop` text or `max_tokens`.
    Expand {
        node: NodeId,
        k: usize,
        stop: Vec<String>,
        max_tokens: usize,
    },
    /// Add the `k` most likely next tokens of `node` as children (token-level beam).
    ExpandTopK { node: NodeId, k: usize },
    /// Score the path to `node` with verifier number `verifier`.
    Score { node: NodeId, verifier: usize },
    /// Prune `node` and the open nodes below it, freeing their KV pages.
    Prune { node: NodeId, reason: String },
    /// The search is over; `answer` is the chosen node.
    Finish { answer: NodeId },
}

/// What the scheduler reports back.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// `node` was expanded into `children` (already in the tree).
    Expanded { node: NodeId, children: Vec<NodeId> },
    /// The verifier scored `node` (the score is in the tree too).
    Scored { node: NodeId, score: f64 },
    /// The search was cancelled (client gone, budget spent).
    Cancelled,
}

/// A search strategy: asked for its first actions, then told each event.
pub trait Strategy: Send {
    /// Short name, e.g. "best_of_n".
    fn name(&self) -> &str;
    /// The first actions on a tree holding only the prompt.
    fn start(&mut self, tree: &mut SearchTree) -> Vec<Action>;
    /// The actions that follow an event.
    fn on_event(&mut self, tree: &mut SearchTree, event: Event) -> Vec<Action>;
}
