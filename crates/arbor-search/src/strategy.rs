//! The interface of a search strategy: an event-driven state machine over a [`SearchTree`].
//! A runner (the [`crate::Scheduler`], or the [`crate::sim::Simulator`] in tests) carries
//! out the actions a strategy asks for, batched with every other search's, and reports back
//! with events; the strategy never runs a model itself.
//!
//! Runner contract, which both runners keep:
//! - `Expand { node, k }` adds `k` children of `node` at once (status Running) and fills them
//!   token by token; each child that stops produces one `Expanded` event. A child's status
//!   after it stops follows [`crate::tree::SearchTree::stop`].
//! - `ExpandTopK { node, k }` offers the `k` most likely next tokens of `node` in one `TopK`
//!   event, without making nodes of them: a token-level beam keeps `width` of `width²`.
//! - `Extend { node, picks }` makes one-token children of `node` from its offer (status Open
//!   with stop `Length`, or finished with `Eos`) and produces one `Extended` event at once,
//!   before any later model output. It uses the offer up; so does a `Prune` of `node`.
//! - `Score` produces one `Scored` event (the score is also stored in the node).
//! - `Prompt` adds a new root holding the rendered prompt and expands it like `Expand`.
//! - `Prune` marks the subtree pruned, stops its running children (no events for them) and
//!   frees their KV pages; `Finish` ends the search (further actions are ignored).
//! - Events are delivered one at a time in the order things happened; the actions returned
//!   for an event are carried out before later events are delivered.

use crate::tree::{NodeId, SearchTree};

/// When the generation of a new child stops.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Until {
    /// Most tokens the child may add (0: up to the context).
    pub max_tokens: usize,
    /// Texts that end a candidate (the node finishes; the text is kept).
    pub stop: Vec<String>,
    /// Texts that end a step (the node stays open for further expansion; the text is kept).
    pub delimiters: Vec<String>,
}

impl Until {
    /// At most `max_tokens` tokens, no stop text.
    pub fn tokens(max_tokens: usize) -> Self {
        Until {
            max_tokens,
            ..Default::default()
        }
    }
    /// One reasoning step: up to `delimiter` (e.g. "\n\n") or `max_tokens`.
    pub fn step(delimiter: &str, max_tokens: usize) -> Self {
        Until {
            max_tokens,
            delimiters: vec![delimiter.to_string()],
            ..Default::default()
        }
    }
}

/// What a strategy asks the runner to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Sample `k` continuations of `node`, each a new child, until `until`.
    Expand {
        node: NodeId,
        k: usize,
        until: Until,
    },
    /// Offer the `k` most likely next tokens of `node` (token-level beam): a `TopK` event.
    ExpandTopK { node: NodeId, k: usize },
    /// Make children of `node` from the options of its `TopK` offer numbered `picks`
    /// (indices into the event's list; no picks just gives the offer up).
    Extend { node: NodeId, picks: Vec<usize> },
    /// Score the candidate ending at `node` with the search's verifier number `verifier`.
    Score { node: NodeId, verifier: usize },
    /// Start a fresh prompt (a user message, formatted like the search's own prompt) built
    /// from earlier results, and sample `k` continuations of it.
    Prompt {
        text: String,
        k: usize,
        until: Until,
    },
    /// Prune `node` and the open or running nodes below it, freeing their KV pages.
    Prune { node: NodeId, reason: String },
    /// The search is over. `answer` is the chosen candidate; `text`, if given, is the answer
    /// itself when it is not one node's text (e.g. the majority answer of a vote).
    Finish {
        answer: Option<NodeId>,
        text: Option<String>,
    },
}

impl Action {
    /// `Finish` with a chosen node.
    pub fn finish(answer: NodeId) -> Self {
        Action::Finish {
            answer: Some(answer),
            text: None,
        }
    }
}

/// One of a node's most likely next tokens, offered by `ExpandTopK`. Its text is decoded
/// only for the options a strategy picks (a beam round offers width² of them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopToken {
    pub token: u32,
    /// Natural-log probability of the token after the node's path.
    pub logprob: f32,
    /// End of generation: a child made of it is finished.
    pub eos: bool,
}

/// What the runner reports back.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// `child` (a child of `node` started by an `Expand` or `Prompt`) stopped.
    Expanded { node: NodeId, child: NodeId },
    /// The most likely next tokens of `node`, most likely first (no nodes yet).
    TopK {
        node: NodeId,
        options: Vec<TopToken>,
    },
    /// The children an `Extend` of `node` made, in the order of its picks.
    Extended { node: NodeId, children: Vec<NodeId> },
    /// Verifier `verifier` scored `node`.
    Scored {
        node: NodeId,
        verifier: usize,
        score: f64,
    },
}

/// A search strategy: asked for its first actions, then told each event.
pub trait Strategy: Send {
    /// Short name, e.g. "best-of-n".
    fn name(&self) -> &str;
    /// The first actions on a tree holding only the prompt (node 0).
    fn start(&mut self, tree: &SearchTree) -> Vec<Action>;
    /// The actions that follow an event.
    fn on_event(&mut self, tree: &SearchTree, event: Event) -> Vec<Action>;
    /// Called after each token a running child receives; `false` stops that child now (it
    /// ends with [`crate::tree::StopReason::Cut`] and produces its `Expanded` event).
    fn on_token(&mut self, _tree: &SearchTree, _node: NodeId) -> bool {
        true
    }
    /// Whether the runner should set [`crate::tree::Node::hidden`] before each
    /// [`Strategy::on_token`] (it costs a copy of one hidden state per token).
    fn wants_hidden(&self) -> bool {
        false
    }
    /// How many sequences the strategy runs at once at most (admission reserves room for
    /// them).
    fn width(&self) -> usize;
}
