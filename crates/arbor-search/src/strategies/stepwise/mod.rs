//! Strategies that search over steps: token-level and step-level beam search, DVTS,
//! lookahead, MCTS, REBASE, dynamic backtracking, and the prompt-composing tournament and
//! parallel-distill-refine.
//!
//! Conventions shared by the step-level strategies (step-beam, dvts, lookahead, mcts,
//! rebase, backtrack):
//! - a step is one expansion with [`Until::step`]: up to `delimiter` (default "\n\n") or
//!   `step_tokens` tokens (default 128); a search goes at most `max_steps` steps deep
//!   (default 12);
//! - a node is a complete candidate when its status is Finished (EOS, a stop text, a full
//!   context), otherwise an open partial solution;
//! - verifier 0 is the search's verifier (a PRM, ORM or judge; higher is better). The
//!   strategies score a step's own node and read that score (the PRM's "last step"
//!   aggregation);
//! - when no candidate completes, the answer falls back to the best open partial solution,
//!   and to none when there is nothing at all;
//! - nodes a strategy gives up are pruned with a reason; an ancestor whose children are then
//!   all given up is pruned in their place so that its KV pages go too.

mod backtrack;
mod beam;
mod dvts;
mod lookahead;
mod mcts;
mod pdr;
mod rebase;
mod step_beam;
mod tournament;

#[cfg(test)]
mod testing;

pub use backtrack::Backtrack;
pub use beam::Beam;
pub use dvts::Dvts;
pub use lookahead::Lookahead;
pub use mcts::Mcts;
pub use pdr::Pdr;
pub use rebase::Rebase;
pub use step_beam::StepBeam;
pub use tournament::Tournament;

pub(crate) use super::num;
use crate::params::Params;
use crate::strategy::{Action, Strategy, Until};
use crate::tree::{NodeId, NodeStatus, SearchTree};
use std::collections::HashSet;

/// The strategies [`build`] makes.
pub const NAMES: &[&str] = &[
    "beam",
    "step-beam",
    "dvts",
    "lookahead",
    "mcts",
    "rebase",
    "backtrack",
    "tournament",
    "pdr",
];

/// Makes the strategy called `name` from `p`.
pub fn build(name: &str, p: &Params) -> Result<Box<dyn Strategy>, String> {
    Ok(match name {
        "beam" => Box::new(Beam::from_params(p)?),
        "step-beam" => Box::new(StepBeam::from_params(p)?),
        "dvts" => Box::new(Dvts::from_params(p)?),
        "lookahead" => Box::new(Lookahead::from_params(p)?),
        "mcts" => Box::new(Mcts::from_params(p)?),
        "rebase" => Box::new(Rebase::from_params(p)?),
        "backtrack" => Box::new(Backtrack::from_params(p)?),
        "tournament" => Box::new(Tournament::from_params(p)?),
        "pdr" => Box::new(Pdr::from_params(p)?),
        _ => return Err(format!("unknown strategy '{name}'")),
    })
}

/// The step parameters: `delimiter`, `step_tokens`, `max_steps`.
#[derive(Clone, Debug, PartialEq)]
pub struct Steps {
    pub delimiter: String,
    pub step_tokens: usize,
    pub max_steps: usize,
}

impl Steps {
    pub const PARAMS: [&'static str; 3] = ["delimiter", "step_tokens", "max_steps"];

    pub fn from_params(p: &Params) -> Result<Self, String> {
        let s = Steps {
            delimiter: p.string("delimiter", "\n\n"),
            step_tokens: p.usize("step_tokens", 128)?,
            max_steps: p.usize("max_steps", 12)?,
        };
        if s.delimiter.is_empty() {
            return Err("parameter delimiter must not be empty".into());
        }
        if s.step_tokens == 0 || s.max_steps == 0 {
            return Err("parameters step_tokens and max_steps must be at least 1".into());
        }
        Ok(s)
    }

    /// One step.
    pub fn until(&self) -> Until {
        Until::step(&self.delimiter, self.step_tokens)
    }
}

/// Rejects names outside `own` (plus the step parameters when `steps`) and a zero width;
/// returns the width.
pub(crate) fn check(p: &Params, own: &[&str], steps: bool) -> Result<usize, String> {
    let mut known = own.to_vec();
    if steps {
        known.extend(Steps::PARAMS);
    }
    super::check_width(p, &known)
}

/// The node of `nodes` with the highest `key`; ties go to the earlier one.
pub(crate) fn best(
    nodes: impl IntoIterator<Item = NodeId>,
    key: impl Fn(NodeId) -> f64,
) -> Option<NodeId> {
    let mut out: Option<(NodeId, f64)> = None;
    for n in nodes {
        let k = num(key(n));
        if out.is_none_or(|(_, b)| k > b) {
            out = Some((n, k));
        }
    }
    out.map(|(n, _)| n)
}

/// Sorts `nodes` by `key`, highest first; ties keep their order.
pub(crate) fn rank(nodes: &mut [NodeId], key: impl Fn(NodeId) -> f64) {
    // Each key once: a key may walk the node's path, and a beam ranks width² candidates.
    let mut keyed: Vec<(f64, NodeId)> = nodes.iter().map(|&n| (num(key(n)), n)).collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (slot, (_, n)) in nodes.iter_mut().zip(keyed) {
        *slot = n;
    }
}

/// Tokens generated from the root down to `id` (the root's prompt excluded).
pub(crate) fn generated(tree: &SearchTree, id: NodeId) -> usize {
    tree.path(id)
        .iter()
        .skip(1)
        .filter_map(|&n| tree.node(n))
        .map(|n| n.tokens.len())
        .sum()
}

/// Mean token log-probability from the root down to `id`.
pub(crate) fn path_mean_logprob(tree: &SearchTree, id: NodeId) -> f64 {
    match generated(tree, id) {
        0 => 0.0,
        n => tree.path_logprob(id) / n as f64,
    }
}

/// The latest verifier score of `id` (minus infinity when unscored).
pub(crate) fn score(tree: &SearchTree, id: NodeId) -> f64 {
    tree.node(id)
        .and_then(|n| n.score)
        .unwrap_or(f64::NEG_INFINITY)
}

/// The prune actions that give up `drop`: each dropped node is pruned, and so is every
/// ancestor below a root none of whose children is still wanted, in place of its children
/// (one action for the highest such node). A child is still wanted when it is open or
/// running and not dropped, or finished and `keep_finished` says so.
pub(crate) fn prune_dead(
    tree: &SearchTree,
    drop: &[NodeId],
    keep_finished: impl Fn(NodeId) -> bool,
    reason: &str,
) -> Vec<Action> {
    let mut dead: HashSet<NodeId> = drop.iter().copied().collect();
    // Parents found to keep a wanted child: siblings dropped later need not look again.
    let mut kept: HashSet<NodeId> = HashSet::new();
    for &d in drop {
        let mut cur = d;
        while let Some(p) = tree.node(cur).and_then(|n| n.parent) {
            let Some(pn) = tree.node(p) else { break };
            if pn.parent.is_none() || dead.contains(&p) || kept.contains(&p) {
                break;
            }
            let wanted = pn.children.iter().any(|&c| {
                !dead.contains(&c)
                    && tree.node(c).is_some_and(|cn| match cn.status {
                        NodeStatus::Open | NodeStatus::Running => true,
                        NodeStatus::Finished { .. } => keep_finished(c),
                        NodeStatus::Pruned { .. } => false,
                    })
            });
            if wanted {
                kept.insert(p);
                break;
            }
            dead.insert(p);
            // p's parent may have been kept for p's sake: look again when the climb gets there.
            if let Some(pp) = pn.parent {
                kept.remove(&pp);
            }
            cur = p;
        }
    }
    let mut top: Vec<NodeId> = dead
        .iter()
        .copied()
        .filter(|&n| {
            tree.node(n)
                .and_then(|x| x.parent)
                .is_none_or(|p| !dead.contains(&p))
        })
        .collect();
    top.sort_unstable();
    top.into_iter()
        .map(|node| Action::Prune {
            node,
            reason: reason.to_string(),
        })
        .collect()
}

/// Implements [`Strategy`] for a newtype over [`StepBeam`].
macro_rules! delegate_strategy {
    ($t:ty) => {
        impl $crate::strategy::Strategy for $t {
            fn name(&self) -> &str {
                self.0.name()
            }
            fn start(&mut self, tree: &$crate::tree::SearchTree) -> Vec<$crate::strategy::Action> {
                self.0.start(tree)
            }
            fn on_event(
                &mut self,
                tree: &$crate::tree::SearchTree,
                event: $crate::strategy::Event,
            ) -> Vec<$crate::strategy::Action> {
                self.0.on_event(tree, event)
            }
            fn width(&self) -> usize {
                self.0.width()
            }
        }
    };
}
pub(crate) use delegate_strategy;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_each_name_and_rejects_others() {
        for name in NAMES {
            let s = build(name, &Params::new(4)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(s.name(), *name);
        }
        match build("nope", &Params::new(4)) {
            Err(e) => assert_eq!(e, "unknown strategy 'nope'"),
            Ok(_) => panic!("built an unknown strategy"),
        }
        for name in NAMES {
            assert!(build(name, &Params::new(0)).is_err(), "{name} took width 0");
            let typo = Params::new(4).set("widht", 2);
            assert!(build(name, &typo).is_err(), "{name} took an unknown name");
        }
    }

    #[test]
    fn step_params_are_checked() {
        let s = Steps::from_params(&Params::new(1)).unwrap();
        assert_eq!(
            (s.delimiter.as_str(), s.step_tokens, s.max_steps),
            ("\n\n", 128, 12)
        );
        assert_eq!(s.until(), Until::step("\n\n", 128));
        assert!(Steps::from_params(&Params::new(1).set("delimiter", "")).is_err());
        assert!(Steps::from_params(&Params::new(1).set("max_steps", 0)).is_err());
        assert!(Steps::from_params(&Params::new(1).set("step_tokens", "x")).is_err());
    }

    #[test]
    fn prune_dead_climbs_to_the_highest_ancestor_left_without_children() {
        let mut t = SearchTree::new(vec![]);
        let a = t.add_child(0, vec![1], 0.0).unwrap();
        let b = t.add_child(0, vec![1], 0.0).unwrap();
        let aa = t.add_child(a, vec![1], 0.0).unwrap();
        let ab = t.add_child(a, vec![1], 0.0).unwrap();
        let ba = t.add_child(b, vec![1], 0.0).unwrap();
        let bb = t.add_child(b, vec![1], 0.0).unwrap();
        t.finish(bb, "eos");
        let cut = |drop: &[NodeId], keep: bool| prune_dead(&t, drop, |_| keep, "cut");
        let p = |node| Action::Prune {
            node,
            reason: "cut".into(),
        };
        assert_eq!(cut(&[aa], false), vec![p(aa)]);
        assert_eq!(cut(&[ab, aa], false), vec![p(a)]);
        assert_eq!(cut(&[ba], true), vec![p(ba)]);
        assert_eq!(cut(&[ba], false), vec![p(b)]);
        // The root is never pruned.
        assert_eq!(cut(&[aa, ab, ba], false), vec![p(a), p(b)]);
    }

    #[test]
    fn best_and_rank_break_ties_by_order_and_never_pick_nan() {
        let key = |n: NodeId| [0.5, f64::NAN, 0.9, 0.9][n];
        assert_eq!(best([0, 1, 2, 3], key), Some(2));
        assert_eq!(best([1], key), Some(1));
        assert_eq!(best([], key), None);
        let mut v = vec![1, 0, 3, 2];
        rank(&mut v, key);
        assert_eq!(v, vec![3, 2, 0, 1]);
    }
}
