//! The search tree: nodes are runs of generated tokens below a prompt. Node 0 is the search's
//! prompt; strategies that start fresh prompts from earlier results (tournament,
//! parallel-distill-refine) add further roots.

use serde::Serialize;

/// Index of a node in its tree.
pub type NodeId = usize;

/// Where a node stands.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NodeStatus {
    /// May be expanded (a prompt, or a branch that stopped at a step delimiter or its
    /// per-expansion token limit).
    Open,
    /// Being generated: tokens arrive each step.
    Running,
    /// A complete candidate: ended at EOS, a stop string or the context limit.
    Finished { reason: String },
    /// Cut by the strategy; `reason` says why (shown in the exported tree).
    Pruned { reason: String },
}

/// One node: the tokens it adds to its parent's path and what is known of them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Node {
    pub id: NodeId,
    pub parent: Option<NodeId>,
    pub children: Vec<NodeId>,
    pub tokens: Vec<u32>,
    /// The tokens' text (for a root: the prompt's text).
    pub text: String,
    /// Sum of the tokens' log-probabilities under the policy.
    pub logprob: f64,
    /// Log-probability of each generated token (empty for roots).
    #[serde(skip)]
    pub token_logprobs: Vec<f32>,
    /// Entropy (nats) of the policy's distribution at each generated token.
    #[serde(skip)]
    pub token_entropies: Vec<f32>,
    /// The policy's final-normed hidden state from which the latest token was sampled, when
    /// the strategy asks for it ([`crate::Strategy::wants_hidden`]); else empty.
    #[serde(skip)]
    pub hidden: Vec<f32>,
    /// Latest verifier score, once scored.
    pub score: Option<f64>,
    /// The behaviour group the latest verifier put it in, if it tells groups apart
    /// ([`crate::verifier::Verdict::group`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<u64>,
    /// Why generation of this node stopped, once it has.
    pub stop: Option<StopReason>,
    pub status: NodeStatus,
}

/// Why the generation of a node stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model's end-of-generation token.
    Eos,
    /// One of the expansion's stop strings (the node is a complete candidate).
    Stop,
    /// One of the expansion's step delimiters (the node stays open for more steps).
    Delimiter,
    /// The expansion's token limit (the node stays open).
    Length,
    /// The model's context is full.
    Context,
    /// The strategy cut it while it ran (see [`crate::Strategy::on_token`]).
    Cut,
}

impl Node {
    /// Mean token log-probability (0 for a node without generated tokens).
    pub fn mean_logprob(&self) -> f64 {
        if self.token_logprobs.is_empty() {
            0.0
        } else {
            self.logprob / self.token_logprobs.len() as f64
        }
    }
    pub fn is_open(&self) -> bool {
        self.status == NodeStatus::Open
    }
    pub fn is_finished(&self) -> bool {
        matches!(self.status, NodeStatus::Finished { .. })
    }
}

/// A tree rooted at the prompt (node 0).
#[derive(Clone, Debug, Serialize)]
pub struct SearchTree {
    nodes: Vec<Node>,
}

impl SearchTree {
    /// A tree whose root holds the prompt's tokens.
    pub fn new(prompt: Vec<u32>) -> Self {
        let mut t = SearchTree { nodes: vec![] };
        t.add_root(prompt, String::new());
        t
    }

    fn blank(id: NodeId, parent: Option<NodeId>, tokens: Vec<u32>, text: String) -> Node {
        Node {
            id,
            parent,
            children: vec![],
            tokens,
            text,
            logprob: 0.0,
            token_logprobs: vec![],
            token_entropies: vec![],
            hidden: vec![],
            score: None,
            group: None,
            stop: None,
            status: NodeStatus::Open,
        }
    }

    /// Adds a further root (a fresh prompt built from earlier results).
    pub fn add_root(&mut self, tokens: Vec<u32>, text: String) -> NodeId {
        let id = self.nodes.len();
        self.nodes.push(Self::blank(id, None, tokens, text));
        id
    }

    /// Mutable access for the runner (the scheduler or the simulator) that fills nodes in.
    pub fn node_mut(&mut self, id: NodeId) -> Option<&mut Node> {
        self.nodes.get_mut(id)
    }

    /// Every node, in creation order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The root above `id`.
    pub fn root_of(&self, id: NodeId) -> NodeId {
        self.path(id).first().copied().unwrap_or(0)
    }

    /// Depth of `id` (a root is 0).
    pub fn depth(&self, id: NodeId) -> usize {
        self.path(id).len().saturating_sub(1)
    }

    /// Text generated from the root down to `id` (the root's prompt text excluded).
    pub fn path_text(&self, id: NodeId) -> String {
        self.path(id)
            .iter()
            .skip(1)
            .map(|&n| self.nodes[n].text.as_str())
            .collect()
    }

    /// Finished nodes (complete candidates), in creation order.
    pub fn finished(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.is_finished())
            .map(|n| n.id)
            .collect()
    }

    /// Sets `id` running: generation into it has started.
    pub fn set_running(&mut self, id: NodeId) {
        if let Some(n) = self.nodes.get_mut(id) {
            n.status = NodeStatus::Running;
        }
    }

    pub fn root(&self) -> NodeId {
        0
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Adds a child of `parent` holding `tokens`; `None` if `parent` does not exist.
    pub fn add_child(&mut self, parent: NodeId, tokens: Vec<u32>, logprob: f64) -> Option<NodeId> {
        let id = self.nodes.len();
        self.nodes.get_mut(parent)?.children.push(id);
        let mut n = Self::blank(id, Some(parent), tokens, String::new());
        n.logprob = logprob;
        self.nodes.push(n);
        Some(id)
    }

    /// Appends one generated token (its text, logprob and the distribution's entropy).
    pub fn push_token(&mut self, id: NodeId, token: u32, text: &str, logprob: f32, entropy: f32) {
        if let Some(n) = self.nodes.get_mut(id) {
            n.tokens.push(token);
            n.text.push_str(text);
            n.logprob += logprob as f64;
            n.token_logprobs.push(logprob);
            n.token_entropies.push(entropy);
        }
    }

    /// Sets the hidden state behind `id`'s next token (see [`Node::hidden`]).
    pub fn set_hidden(&mut self, id: NodeId, hidden: Vec<f32>) {
        if let Some(n) = self.nodes.get_mut(id) {
            n.hidden = hidden;
        }
    }

    /// Records why generation of `id` stopped and sets its status: finished for EOS, a stop
    /// string or a full context; open (expandable) for a delimiter, a length limit or a cut.
    pub fn stop(&mut self, id: NodeId, reason: StopReason) {
        if let Some(n) = self.nodes.get_mut(id) {
            n.status = match reason {
                StopReason::Eos | StopReason::Stop | StopReason::Context => NodeStatus::Finished {
                    reason: format!("{reason:?}").to_lowercase(),
                },
                StopReason::Delimiter | StopReason::Length | StopReason::Cut => NodeStatus::Open,
            };
            n.stop = Some(reason);
        }
    }

    /// Nodes from the root down to `id`.
    pub fn path(&self, id: NodeId) -> Vec<NodeId> {
        let mut p = vec![];
        let mut cur = self.nodes.get(id).map(|n| n.id);
        while let Some(c) = cur {
            p.push(c);
            cur = self.nodes[c].parent;
        }
        p.reverse();
        p
    }

    /// Every token from the root (the prompt) down to `id`.
    pub fn path_tokens(&self, id: NodeId) -> Vec<u32> {
        self.path(id)
            .iter()
            .flat_map(|&n| self.nodes[n].tokens.iter().copied())
            .collect()
    }

    /// Sum of log-probabilities along the path (the root's prompt counts 0).
    pub fn path_logprob(&self, id: NodeId) -> f64 {
        self.path(id).iter().map(|&n| self.nodes[n].logprob).sum()
    }

    /// Sets a node's verifier score.
    pub fn set_score(&mut self, id: NodeId, score: f64) -> bool {
        self.nodes
            .get_mut(id)
            .map(|n| n.score = Some(score))
            .is_some()
    }

    /// Marks a node finished.
    pub fn finish(&mut self, id: NodeId, reason: &str) -> bool {
        self.nodes
            .get_mut(id)
            .map(|n| {
                n.status = NodeStatus::Finished {
                    reason: reason.into(),
                }
            })
            .is_some()
    }

    /// Prunes `id` and every open or running node below it; returns the nodes it pruned.
    pub fn prune(&mut self, id: NodeId, reason: &str) -> Vec<NodeId> {
        let mut stack = vec![id];
        let mut pruned = vec![];
        while let Some(n) = stack.pop() {
            let Some(node) = self.nodes.get_mut(n) else {
                continue;
            };
            if matches!(node.status, NodeStatus::Open | NodeStatus::Running) {
                node.status = NodeStatus::Pruned {
                    reason: reason.into(),
                };
                pruned.push(n);
            }
            stack.extend(node.children.iter().copied());
        }
        pruned
    }

    /// Open nodes with no children: what a strategy may expand next.
    pub fn frontier(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.children.is_empty() && n.status == NodeStatus::Open)
            .map(|n| n.id)
            .collect()
    }

    /// The tree as JSON (nodes with parents, tokens, scores and statuses).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (SearchTree, NodeId, NodeId, NodeId) {
        let mut t = SearchTree::new(vec![1, 2, 3]);
        let a = t.add_child(0, vec![4, 5], -1.0).unwrap();
        let b = t.add_child(0, vec![6], -0.5).unwrap();
        let c = t.add_child(a, vec![7], -0.25).unwrap();
        (t, a, b, c)
    }

    #[test]
    fn paths_concatenate_tokens_and_logprobs() {
        let (mut t, a, _, c) = sample();
        assert_eq!(t.path(c), vec![0, a, c]);
        assert_eq!(t.path_tokens(c), vec![1, 2, 3, 4, 5, 7]);
        assert_eq!(t.path_logprob(c), -1.25);
        assert_eq!(t.add_child(99, vec![], 0.0), None);
    }

    #[test]
    fn prune_marks_the_open_subtree_and_updates_the_frontier() {
        let (mut t, a, b, c) = sample();
        assert_eq!(t.frontier(), vec![b, c]);
        t.finish(c, "eos");
        assert_eq!(t.frontier(), vec![b]);
        assert_eq!(t.prune(a, "low score"), vec![a]);
        assert_eq!(
            t.node(c).unwrap().status,
            NodeStatus::Finished {
                reason: "eos".into()
            }
        );
        assert_eq!(t.prune(0, "done"), vec![0, b]);
        assert!(t.frontier().is_empty());
    }

    #[test]
    fn exports_json_with_reasons() {
        let (mut t, a, _, _) = sample();
        t.set_score(a, 0.75);
        t.prune(a, "beam cut");
        let j = t.to_json();
        let n = &j["nodes"][a];
        assert_eq!(n["score"], 0.75);
        assert_eq!(n["status"]["state"], "pruned");
        assert_eq!(n["status"]["reason"], "beam cut");
        assert_eq!(n["parent"], 0);
    }
}
