//! The search tree: nodes are runs of generated tokens below a shared prompt.

use serde::Serialize;

/// Index of a node in its tree.
pub type NodeId = usize;

/// Where a node stands.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NodeStatus {
    /// May still be expanded.
    Open,
    /// Ended (EOS, a stop string or the token limit).
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
    /// Sum of the tokens' log-probabilities under the policy.
    pub logprob: f64,
    /// Verifier score, once scored.
    pub score: Option<f64>,
    pub status: NodeStatus,
}

/// A tree rooted at the prompt (node 0).
#[derive(Clone, Debug, Serialize)]
pub struct SearchTree {
    nodes: Vec<Node>,
}

impl SearchTree {
    /// A tree whose root holds the prompt's tokens.
    pub fn new(prompt: Vec<u32>) -> Self {
        let root = Node {
            id: 0,
            parent: None,
            children: vec![],
            tokens: prompt,
            logprob: 0.0,
            score: None,
            status: NodeStatus::Open,
        };
        SearchTree { nodes: vec![root] }
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
        self.nodes.push(Node {
            id,
            parent: Some(parent),
            children: vec![],
            tokens,
            logprob,
            score: None,
            status: NodeStatus::Open,
        });
        Some(id)
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

    /// Prunes `id` and every open node below it; returns the nodes it pruned.
    pub fn prune(&mut self, id: NodeId, reason: &str) -> Vec<NodeId> {
        let mut stack = vec![id];
        let mut pruned = vec![];
        while let Some(n) = stack.pop() {
            let Some(node) = self.nodes.get_mut(n) else {
                continue;
            };
            if node.status == NodeStatus::Open {
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
