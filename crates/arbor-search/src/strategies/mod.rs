//! Every search strategy, and [`build`] to make one by name.
//!
//! Strategies over whole samples of the prompt, one family per file:
//! - [`sampling`]: `sampling` (the most likely of n samples);
//! - [`best_of_n`]: `best-of-n` (the best of n samples by the verifier);
//! - [`vote`]: `vote` (self-consistency) and `weighted-vote` (verifier-weighted);
//! - [`st_bon`]: `st-bon` (self-truncating best-of-n);
//! - [`early_stop`]: `early-stop` (confidence-filtered sampling, DeepConf-style);
//! - [`adaptive`]: `adaptive` (compute-optimal sample counts, and [`adaptive::allocate`]).
//!
//! All of them take `max_tokens` (most tokens a sample may add, default 512; 0: up to the
//! context) and `stop` (a text that ends a sample, default none), sample the prompt (node 0)
//! with one `Expand`, and use verifier 0 as the search's verifier. [`stepwise`] holds the
//! strategies that search over steps.

pub mod adaptive;
pub mod best_of_n;
pub mod early_stop;
pub mod sampling;
pub mod st_bon;
pub mod stepwise;
pub mod vote;

use crate::params::Params;
use crate::strategy::{Action, Strategy, Until};
use crate::tree::{NodeId, SearchTree};
use std::collections::HashMap;

/// Every strategy name the CLI accepts.
pub const NAMES: &[&str] = &[
    "sampling",
    "best-of-n",
    "vote",
    "weighted-vote",
    "beam",
    "step-beam",
    "dvts",
    "lookahead",
    "mcts",
    "rebase",
    "st-bon",
    "early-stop",
    "backtrack",
    "tournament",
    "pdr",
    "adaptive",
];

/// Makes the strategy called `name` from `p` (names of step searches go to
/// [`stepwise::build`]).
pub fn build(name: &str, p: &Params) -> Result<Box<dyn Strategy>, String> {
    Ok(match name {
        "sampling" => Box::new(sampling::Sampling::from_params(p)?),
        "best-of-n" => Box::new(best_of_n::BestOfN::from_params(p)?),
        "vote" => Box::new(vote::Vote::from_params(p)?),
        "weighted-vote" => Box::new(vote::Vote::weighted_from_params(p)?),
        "st-bon" => Box::new(st_bon::StBon::from_params(p)?),
        "early-stop" => Box::new(early_stop::EarlyStop::from_params(p)?),
        "adaptive" => Box::new(adaptive::Adaptive::from_params(p)?),
        _ => return stepwise::build(name, p),
    })
}

/// The parameters every sampling strategy takes.
const COMMON: [&str; 2] = ["max_tokens", "stop"];

/// Rejects names outside `own` and the common ones, and a zero width; returns the width.
pub(crate) fn sample_width(p: &Params, own: &[&str]) -> Result<usize, String> {
    let mut known = COMMON.to_vec();
    known.extend(own);
    check_width(p, &known)
}

/// Rejects names outside `known` and a zero width; returns the width. Every strategy's
/// constructor goes through it.
pub(crate) fn check_width(p: &Params, known: &[&str]) -> Result<usize, String> {
    p.check_known(known)?;
    if p.width == 0 {
        return Err("width must be at least 1".into());
    }
    Ok(p.width)
}

/// One sample: `max_tokens` tokens (default 512) or up to the `stop` text.
pub(crate) fn sample_until(p: &Params) -> Result<Until, String> {
    let stop = p.string("stop", "");
    Ok(Until {
        max_tokens: p.usize("max_tokens", 512)?,
        stop: if stop.is_empty() { vec![] } else { vec![stop] },
        delimiters: vec![],
    })
}

/// The node with the highest key; ties go to the lower node id; NaN never wins over a
/// number.
pub(crate) fn argmax(items: impl IntoIterator<Item = (NodeId, f64)>) -> Option<NodeId> {
    let mut best: Option<(NodeId, f64)> = None;
    for (n, k) in items {
        let k = num(k);
        if best.is_none_or(|(bn, bk)| k > bk || (k == bk && n < bn)) {
            best = Some((n, k));
        }
    }
    best.map(|(n, _)| n)
}

/// `x`, with NaN read as minus infinity so that it never wins.
pub(crate) fn num(x: f64) -> f64 {
    if x.is_nan() {
        f64::NEG_INFINITY
    } else {
        x
    }
}

/// Bookkeeping of strategies that sample the root and score each sample with verifier 0 as
/// it stops: which samples are ours and their first scores.
#[derive(Debug, Default)]
pub(crate) struct ScoreEach {
    pub expanded: Vec<NodeId>,
    pub scores: Vec<(NodeId, f64)>,
}

impl ScoreEach {
    /// The `Score` action for a newly stopped sample of the root; nothing for other events.
    pub fn on_expanded(&mut self, tree: &SearchTree, node: NodeId, child: NodeId) -> Vec<Action> {
        if node != tree.root() || self.expanded.contains(&child) {
            return vec![];
        }
        self.expanded.push(child);
        vec![Action::Score {
            node: child,
            verifier: 0,
        }]
    }

    /// Records the first verifier-0 score of one of our samples; false for any other score.
    pub fn on_scored(&mut self, node: NodeId, verifier: usize, score: f64) -> bool {
        let ours = verifier == 0
            && self.expanded.contains(&node)
            && !self.scores.iter().any(|s| s.0 == node);
        if ours {
            self.scores.push((node, score));
        }
        ours
    }

    /// The best-scored sample. Among equal scores: a member of the largest behaviour group
    /// ([`crate::verifier::Verdict::group`]; a sample without one is a group of its own),
    /// then the highest mean token log-probability, then the lower node id.
    pub fn best(&self, tree: &SearchTree) -> Option<NodeId> {
        let top = self
            .scores
            .iter()
            .map(|s| num(s.1))
            .fold(f64::NEG_INFINITY, f64::max);
        let tied: Vec<NodeId> = self
            .scores
            .iter()
            .filter(|s| num(s.1) == top)
            .map(|s| s.0)
            .collect();
        let group = |id: NodeId| tree.node(id).and_then(|n| n.group);
        let mut sizes: HashMap<u64, usize> = HashMap::new();
        for g in tied.iter().filter_map(|&id| group(id)) {
            *sizes.entry(g).or_insert(0) += 1;
        }
        let size = |id: NodeId| group(id).map_or(1, |g| sizes[&g]);
        let largest = tied.iter().map(|&id| size(id)).max()?;
        let members: Vec<NodeId> = tied
            .iter()
            .copied()
            .filter(|&id| size(id) == largest)
            .collect();
        most_likely(tree, &members)
    }
}

/// The most likely sample among `ids`: highest mean token log-probability; samples without
/// tokens (which would read as certain) rank below every other; ties go to the lower id.
pub(crate) fn most_likely(tree: &SearchTree, ids: &[NodeId]) -> Option<NodeId> {
    argmax(ids.iter().filter_map(|&id| {
        let n = tree.node(id)?;
        let lp = if n.token_logprobs.is_empty() {
            f64::MIN
        } else {
            n.mean_logprob()
        };
        Some((id, lp))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_each_name_and_rejects_bad_params() {
        for name in NAMES {
            let s = build(name, &Params::new(4)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(s.name(), *name);
        }
        assert!(build("nope", &Params::new(4)).is_err());
        for name in [
            "sampling",
            "best-of-n",
            "vote",
            "weighted-vote",
            "st-bon",
            "early-stop",
            "adaptive",
        ] {
            assert!(build(name, &Params::new(0)).is_err(), "{name} took width 0");
            let typo = Params::new(4).set("max_token", 2);
            let err = build(name, &typo).err().unwrap_or_default();
            assert!(
                err.contains("unknown parameter 'max_token'"),
                "{name}: {err}"
            );
            let bad = Params::new(4).set("max_tokens", "many");
            assert!(build(name, &bad).is_err(), "{name} took max_tokens=many");
        }
    }

    #[test]
    fn common_params() {
        let p = Params::new(2).set("stop", "\\n\\nQ:").set("max_tokens", 64);
        let u = sample_until(&p).unwrap();
        assert_eq!((u.max_tokens, u.stop), (64, vec!["\n\nQ:".to_string()]));
        assert_eq!(sample_until(&Params::new(1)).unwrap(), Until::tokens(512));
    }

    /// A root with one child per (score, group, token log-probs).
    fn scored(samples: &[(f64, Option<u64>, &[f32])]) -> (SearchTree, ScoreEach) {
        let mut tree = SearchTree::new(vec![1]);
        let mut each = ScoreEach::default();
        for &(score, group, lps) in samples {
            let id = tree.add_child(0, vec![], 0.0).unwrap();
            for &lp in lps {
                tree.push_token(id, 7, "x", lp, 0.0);
            }
            tree.node_mut(id).unwrap().group = group;
            each.on_expanded(&tree, 0, id);
            assert!(each.on_scored(id, 0, score));
        }
        (tree, each)
    }

    #[test]
    fn best_prefers_score_then_group_size_then_likelihood() {
        let (a, b, c) = (Some(10), Some(11), Some(12));
        let (tree, each) = scored(&[
            (1.0, a, &[-0.5, -0.5]), // 1
            (1.0, b, &[-0.01]),      // 2: likeliest, but its group is small
            (1.0, a, &[-0.2, -0.2]), // 3: likeliest of the largest group
            (0.5, c, &[-0.1]),       // 4
            (0.5, c, &[-0.1]),       // 5
            (0.5, c, &[-0.1]),       // 6: group c is larger, but scores less
            (f64::NAN, a, &[0.0]),   // 7: NaN never wins, nor counts
            (1.0, a, &[-0.9, -0.1]), // 8
        ]);
        assert_eq!(each.best(&tree), Some(3));
        // Without groups: the likeliest of the best score; equal likelihood: the lower id.
        let (tree, each) = scored(&[
            (1.0, None, &[-0.5]),
            (1.0, None, &[-0.2]),
            (0.0, None, &[0.0]),
        ]);
        assert_eq!(each.best(&tree), Some(2));
        let (tree, each) = scored(&[(2.0, None, &[-1.0]), (2.0, None, &[-1.0, -1.0])]);
        assert_eq!(each.best(&tree), Some(1));
        // Two groups of equal size: the likeliest member of either.
        let (tree, each) = scored(&[
            (1.0, a, &[-0.3]),
            (1.0, b, &[-0.1]),
            (1.0, a, &[-0.3]),
            (1.0, b, &[-0.9]),
        ]);
        assert_eq!(each.best(&tree), Some(2));
        assert_eq!(ScoreEach::default().best(&tree), None);
    }

    #[test]
    fn argmax_prefers_lower_ids_and_numbers_over_nan() {
        assert_eq!(argmax([(3, 1.0), (1, 1.0), (2, 0.5)]), Some(1));
        assert_eq!(argmax([(1, f64::NAN), (2, -5.0)]), Some(2));
        assert_eq!(argmax([(4, f64::NAN)]), Some(4));
        assert_eq!(argmax([]), None);
    }
}
