//! `backtrack`: step-level greedy search with dynamic backtracking (verifier-triggered
//! backtracking as in the "dynamic backtracking" line of work surveyed in seed 001, e.g.
//! SRLCG's prune-and-regenerate of failing components).
//!
//! One path is grown a step at a time (one sample per expansion); each step is scored by
//! verifier 0. A step passes when its score is at least `threshold` and falls by at most
//! `drop` from its parent step's score (the first step has no parent score). A passing
//! finished step ends the search: its path is the answer. A passing open step is expanded
//! further; one at `max_steps` counts as failing. A failing step is pruned ("backtrack: …")
//! and its parent is expanded again, up to `retries` times per node; when a node's retries
//! are spent the node itself is pruned ("backtrack: retries exhausted") and its parent
//! retried in turn, up to the root. The search also stops after `budget` expansions.
//! Answer: the first finished path whose steps all pass, else the best-scored finished
//! candidate, else the best-scored step (a partial solution, possibly pruned).
//!
//! Parameters: `threshold` (default 0.3); `drop` (default 0.3); `retries` (default 3);
//! `budget` expansions (default max_steps × (retries + 1)); `delimiter`, `step_tokens`,
//! `max_steps`. `width` must be at least 1 but is not otherwise used: one path runs at a
//! time.

use super::{best, check, score, Steps};
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy};
use crate::tree::{NodeId, SearchTree};
use std::collections::HashMap;

pub struct Backtrack {
    steps: Steps,
    threshold: f64,
    drop: f64,
    retries: usize,
    budget: usize,
    used: usize,
    /// Failed children per node.
    fails: HashMap<NodeId, usize>,
    scored: Vec<NodeId>,
}

impl Backtrack {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        check(p, &["threshold", "drop", "retries", "budget"], true)?;
        let steps = Steps::from_params(p)?;
        let retries = p.usize("retries", 3)?;
        let threshold = p.f64("threshold", 0.3)?;
        let drop = p.f64("drop", 0.3)?;
        if !threshold.is_finite() || !drop.is_finite() || drop < 0.0 {
            return Err(format!(
                "threshold {threshold} and drop {drop} must be numbers, drop ≥ 0"
            ));
        }
        let budget = p.usize("budget", steps.max_steps * (retries + 1))?;
        if budget == 0 {
            return Err("budget must be at least 1".into());
        }
        Ok(Backtrack {
            steps,
            threshold,
            drop,
            retries,
            budget,
            used: 0,
            fails: HashMap::new(),
            scored: vec![],
        })
    }

    fn expand(&mut self, tree: &SearchTree, node: NodeId) -> Action {
        if self.used >= self.budget {
            return self.finish(tree);
        }
        self.used += 1;
        Action::Expand {
            node,
            k: 1,
            until: self.steps.until(),
        }
    }

    fn finish(&self, tree: &SearchTree) -> Action {
        let by_score = |n: NodeId| score(tree, n);
        let done = self
            .scored
            .iter()
            .copied()
            .filter(|&n| tree.node(n).is_some_and(|x| x.is_finished()));
        let answer = best(done, by_score).or_else(|| best(self.scored.iter().copied(), by_score));
        Action::Finish { answer, text: None }
    }

    /// Why `node` fails, if it does.
    fn verdict(&self, tree: &SearchTree, node: NodeId, s: f64) -> Option<String> {
        let parent = tree.node(node).and_then(|n| n.parent);
        let ps = parent.and_then(|p| tree.node(p)).and_then(|p| p.score);
        let finished = tree.node(node).is_some_and(|n| n.is_finished());
        if s.is_nan() || s < self.threshold {
            Some(format!(
                "backtrack: score {s} below threshold {}",
                self.threshold
            ))
        } else if let Some(ps) = ps.filter(|ps| ps - s > self.drop) {
            Some(format!("backtrack: score fell from {ps} to {s}"))
        } else if !finished && tree.depth(node) >= self.steps.max_steps {
            Some("backtrack: max_steps without an answer".into())
        } else {
            None
        }
    }

    /// A child of `node` failed: expand `node` again, or give it up and go one level up.
    fn retry(&mut self, tree: &SearchTree, mut node: NodeId) -> Vec<Action> {
        let mut out = vec![];
        loop {
            let fails = self.fails.entry(node).or_default();
            *fails += 1;
            if *fails <= self.retries {
                out.push(self.expand(tree, node));
                return out;
            }
            match tree.node(node).and_then(|n| n.parent) {
                Some(parent) => {
                    out.push(Action::Prune {
                        node,
                        reason: "backtrack: retries exhausted".into(),
                    });
                    node = parent;
                }
                None => {
                    out.push(self.finish(tree));
                    return out;
                }
            }
        }
    }
}

impl Strategy for Backtrack {
    fn name(&self) -> &str {
        "backtrack"
    }

    fn start(&mut self, tree: &SearchTree) -> Vec<Action> {
        vec![self.expand(tree, tree.root())]
    }

    fn on_event(&mut self, tree: &SearchTree, event: Event) -> Vec<Action> {
        match event {
            Event::Expanded { child, .. } => vec![Action::Score {
                node: child,
                verifier: 0,
            }],
            Event::Scored { node, score, .. } => {
                self.scored.push(node);
                let Some(n) = tree.node(node) else {
                    return vec![];
                };
                let parent = n.parent.unwrap_or(tree.root());
                match self.verdict(tree, node, score) {
                    None if n.is_finished() => vec![Action::finish(node)],
                    None => vec![self.expand(tree, node)],
                    Some(reason) => {
                        let mut out = vec![];
                        if n.is_open() {
                            out.push(Action::Prune { node, reason });
                        }
                        out.extend(self.retry(tree, parent));
                        out
                    }
                }
            }
            Event::TopK { .. } | Event::Extended { .. } => vec![],
        }
    }

    fn width(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{log, policy, verifier};
    use super::*;
    use crate::sim::Simulator;

    fn run(p: Params, ends: &[&str], scores: &str) -> String {
        let mut s = Backtrack::from_params(&p).unwrap();
        let out = Simulator::new(policy(ends, ""))
            .with_verifier(verifier(scores))
            .run(&mut s, "q")
            .unwrap();
        log(&out)
    }

    #[test]
    fn backtracks_on_a_low_score_or_a_fall_and_climbs_when_retries_run_out() {
        let p = Params::new(1).set("retries", 1).set("max_steps", 3);
        let want = "E root:1, S a, E a:1, S aa, P aa backtrack: score fell from 0.8 to 0.4, \
                    E a:1, S ab, P ab backtrack: score 0.2 below threshold 0.3, \
                    P a backtrack: retries exhausted, E root:1, S b, E b:1, S ba, F ba";
        assert_eq!(run(p, &["ba"], "a=.8 aa=.4 ab=.2 b=.6 ba=.5"), want);
    }

    #[test]
    fn when_every_candidate_fails_the_best_finished_one_is_the_answer() {
        let p = Params::new(1).set("retries", 1);
        let want = "E root:1, S a, E root:1, S b, F b";
        assert_eq!(run(p, &["a", "b"], "a=.1 b=.2"), want);
    }

    #[test]
    fn stops_at_the_budget_and_at_max_steps() {
        let p = Params::new(1).set("budget", 2);
        let want = "E root:1, S a, E a:1, S aa, P aa backtrack: score 0.1 below threshold 0.3, F a";
        assert_eq!(run(p, &[], "a=.9 aa=.1"), want);
        let p = Params::new(1).set("max_steps", 1).set("retries", 0);
        let want = "E root:1, S a, P a backtrack: max_steps without an answer, F a";
        assert_eq!(run(p, &[], "a=.9"), want);
    }

    #[test]
    fn rejects_bad_params() {
        let bad = |p: Params| Backtrack::from_params(&p).is_err();
        assert!(bad(Params::new(1).set("drop", -0.1)));
        assert!(bad(Params::new(1).set("budget", 0)));
        assert!(bad(Params::new(1).set("threshold", "high")));
        assert!(bad(Params::new(1).set("beam_width", 1)));
    }
}
