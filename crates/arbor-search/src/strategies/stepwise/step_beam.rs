//! `step-beam`: step-level beam search guided by a PRM (Snell et al. 2024, "Scaling LLM
//! Test-Time Compute Optimally…", arXiv 2408.03314; HF search-and-learn's `beam_search`).
//!
//! The root is expanded `width` = N ways by one step; every new step is scored by verifier
//! 0. Once the whole round is scored, finished candidates are set aside and the open ones
//! ranked by their step's score: the top N/M survive and are expanded M ways each, the rest
//! are pruned ("beam cut", with any step left without a wanted child). Finished candidates
//! are not replaced: a round with fewer open survivors expands fewer steps. This repeats
//! until no open candidate is left or the survivors are `max_steps` deep. Answer: the best-scored finished candidate (else the best surviving
//! partial solution).
//!
//! Parameters: `width` N; `beam_width` M (default: the largest divisor of N not above 4;
//! N must be a multiple of M); `delimiter`, `step_tokens`, `max_steps` (see the module).
//!
//! The engine here also runs [`super::Dvts`] (N/M independent subtrees of one survivor
//! each) and [`super::Lookahead`] (each candidate valued by a greedy rollout).

use super::{best, check, prune_dead, rank, Steps};
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy};
use crate::tree::{NodeId, SearchTree};
use std::collections::HashMap;

/// The shared engine: `groups` independent beams, each keeping `survivors` candidates per
/// step and expanding each `expand` ways, candidates valued by their own score or, with
/// `lookahead` > 0, by the score at the end of a greedy rollout that many steps deeper.
pub struct StepBeam {
    name: &'static str,
    steps: Steps,
    width: usize,
    survivors: usize,
    expand: usize,
    lookahead: usize,
    groups: Vec<Group>,
    group_of: HashMap<NodeId, usize>,
    /// Rollouts under way: the node being extended → the candidate it values.
    rolling: HashMap<NodeId, NodeId>,
    /// Scores awaited: the scored node → the candidate it values.
    scoring: HashMap<NodeId, NodeId>,
    value: HashMap<NodeId, f64>,
    finished: Vec<NodeId>,
    /// Open candidates left when a group stopped at `max_steps`.
    partial: Vec<NodeId>,
}

#[derive(Default)]
struct Group {
    /// Candidates of the current step whose value is still unknown.
    waiting: usize,
    cands: Vec<NodeId>,
    done: bool,
}

/// M's default: the largest divisor of `n` not above 4.
pub(crate) fn default_beam_width(n: usize) -> usize {
    (1..=4.min(n))
        .rev()
        .find(|&m| n.is_multiple_of(m))
        .unwrap_or(1)
}

/// Reads `width` and `beam_width` (and `extra`); returns (N, M, steps).
pub(crate) fn beam_params(p: &Params, extra: &[&str]) -> Result<(usize, usize, Steps), String> {
    let mut own = vec!["beam_width"];
    own.extend(extra);
    let n = check(p, &own, true)?;
    let m = p.usize("beam_width", default_beam_width(n))?;
    if m == 0 || m > n || !n.is_multiple_of(m) {
        return Err(format!(
            "beam_width {m} must divide width {n} (N beams: N/M survivors expand M ways)"
        ));
    }
    Ok((n, m, Steps::from_params(p)?))
}

impl StepBeam {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        let (n, m, steps) = beam_params(p, &[])?;
        Ok(Self::new("step-beam", steps, 1, n / m, m, 0))
    }

    /// `groups` beams of `survivors` × `expand` candidates a step, rolled out `lookahead`.
    pub(crate) fn new(
        name: &'static str,
        steps: Steps,
        groups: usize,
        survivors: usize,
        expand: usize,
        lookahead: usize,
    ) -> Self {
        StepBeam {
            name,
            steps,
            width: groups * survivors * expand,
            survivors,
            expand,
            lookahead,
            groups: (0..groups).map(|_| Group::default()).collect(),
            group_of: HashMap::new(),
            rolling: HashMap::new(),
            scoring: HashMap::new(),
            value: HashMap::new(),
            finished: vec![],
            partial: vec![],
        }
    }

    fn value(&self, n: NodeId) -> f64 {
        self.value.get(&n).copied().unwrap_or(f64::NEG_INFINITY)
    }

    /// Starts valuing a new candidate: a rollout, or a score of the step itself.
    fn evaluate(&mut self, tree: &SearchTree, cand: NodeId) -> Action {
        let open = tree.node(cand).is_some_and(|n| n.is_open());
        if self.lookahead > 0 && open && tree.depth(cand) < self.steps.max_steps {
            self.rolling.insert(cand, cand);
            return self.expand_one(cand);
        }
        self.scoring.insert(cand, cand);
        Action::Score {
            node: cand,
            verifier: 0,
        }
    }

    fn expand_one(&self, node: NodeId) -> Action {
        Action::Expand {
            node,
            k: 1,
            until: self.steps.until(),
        }
    }

    /// A rollout step `r` of `cand` stopped: go on, or score its end.
    fn rolled(&mut self, tree: &SearchTree, cand: NodeId, r: NodeId) -> Action {
        let depth = tree.depth(r);
        let open = tree.node(r).is_some_and(|n| n.is_open());
        if open && depth - tree.depth(cand) < self.lookahead && depth < self.steps.max_steps {
            self.rolling.insert(r, cand);
            return self.expand_one(r);
        }
        self.scoring.insert(r, cand);
        Action::Score {
            node: r,
            verifier: 0,
        }
    }

    /// `node`'s value is in: a rollout that stayed open is pruned, and the group moves on
    /// once its step is valued.
    fn valued(&mut self, tree: &SearchTree, node: NodeId, cand: NodeId, score: f64) -> Vec<Action> {
        let mut out = vec![];
        self.value.insert(cand, score);
        if node != cand {
            if tree.node(node).is_some_and(|n| n.is_finished()) {
                // A rollout that completed is a candidate answer of its own.
                self.value.insert(node, score);
                self.finished.push(node);
            } else if let Some(&first) = tree.path(node).get(tree.depth(cand) + 1) {
                out.push(Action::Prune {
                    node: first,
                    reason: "lookahead rollout".into(),
                });
            }
        }
        let Some(&g) = self.group_of.get(&cand) else {
            return out;
        };
        self.groups[g].waiting = self.groups[g].waiting.saturating_sub(1);
        if self.groups[g].waiting == 0 {
            out.extend(self.select(tree, g));
        }
        out
    }

    /// Group `g`'s step is valued: keep the best open candidates and expand them.
    fn select(&mut self, tree: &SearchTree, g: usize) -> Vec<Action> {
        let cands = std::mem::take(&mut self.groups[g].cands);
        let (done, mut open): (Vec<NodeId>, Vec<NodeId>) = cands
            .into_iter()
            .partition(|&c| tree.node(c).is_some_and(|n| n.is_finished()));
        self.finished.extend(done);
        open.sort_unstable();
        rank(&mut open, |n| self.value(n));
        let dropped = open.split_off(self.survivors.min(open.len()));
        let mut out = prune_dead(tree, &dropped, |_| true, "beam cut");
        let deep = open
            .first()
            .is_some_and(|&n| tree.depth(n) >= self.steps.max_steps);
        if open.is_empty() || deep {
            self.partial.extend(open);
            self.groups[g].done = true;
            if self.groups.iter().all(|g| g.done) {
                out.push(self.finish());
            }
            return out;
        }
        self.groups[g].waiting = open.len() * self.expand;
        out.extend(open.into_iter().map(|node| Action::Expand {
            node,
            k: self.expand,
            until: self.steps.until(),
        }));
        out
    }

    fn finish(&self) -> Action {
        let answer = best(self.finished.iter().copied(), |n| self.value(n))
            .or_else(|| best(self.partial.iter().copied(), |n| self.value(n)));
        Action::Finish { answer, text: None }
    }
}

impl Strategy for StepBeam {
    fn name(&self) -> &str {
        self.name
    }

    fn start(&mut self, tree: &SearchTree) -> Vec<Action> {
        let per = self.survivors * self.expand;
        for g in &mut self.groups {
            g.waiting = per;
        }
        vec![Action::Expand {
            node: tree.root(),
            k: self.width,
            until: self.steps.until(),
        }]
    }

    fn on_event(&mut self, tree: &SearchTree, event: Event) -> Vec<Action> {
        match event {
            Event::Expanded { node, child } => {
                if let Some(cand) = self.rolling.remove(&node) {
                    return vec![self.rolled(tree, cand, child)];
                }
                let g = if node == tree.root() {
                    // The root's children are shared out in order: the first
                    // survivors × expand to group 0, and so on.
                    let i = tree.node(node).map_or(0, |n| {
                        n.children.iter().position(|&c| c == child).unwrap_or(0)
                    });
                    i / (self.survivors * self.expand)
                } else {
                    match self.group_of.get(&node) {
                        Some(&g) => g,
                        None => return vec![],
                    }
                };
                let g = g.min(self.groups.len() - 1);
                self.group_of.insert(child, g);
                self.groups[g].cands.push(child);
                vec![self.evaluate(tree, child)]
            }
            Event::Scored { node, score, .. } => match self.scoring.remove(&node) {
                Some(cand) => self.valued(tree, node, cand, score),
                None => vec![],
            },
            Event::TopK { .. } | Event::Extended { .. } => vec![],
        }
    }

    fn width(&self) -> usize {
        self.width
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{log, policy, verifier};
    use super::*;
    use crate::sim::Simulator;

    fn run(p: Params, ends: &[&str], scores: &str) -> String {
        let mut s = StepBeam::from_params(&p).unwrap();
        let out = Simulator::new(policy(ends, ""))
            .with_verifier(verifier(scores))
            .run(&mut s, "q")
            .unwrap();
        log(&out)
    }

    #[test]
    fn keeps_the_top_n_over_m_and_expands_each_m_ways() {
        let p = Params::new(4).set("beam_width", 2).set("max_steps", 3);
        let scores = "a=.9 b=.2 c=.6 d=.1 aa=.5 ab=.8 ca=.7 cb=.3 caa=.4 cab=.6 aaa=.2 aab=.1";
        // Round 2: ab finished; of aa, ca, cb the top two go on. Round 3: both children of
        // aa are cut, so aa goes instead; depth 3 ends the search and the finished ab
        // (0.8) wins over the partial cab.
        let want = "E root:4, S a, S b, S c, S d, P b beam cut, P d beam cut, E a:2, E c:2, \
                    S aa, S ab, S ca, S cb, P cb beam cut, E ca:2, E aa:2, \
                    S caa, S cab, S aaa, S aab, P aa beam cut, F ab";
        assert_eq!(run(p, &["ab"], scores), want);
    }

    #[test]
    fn with_nothing_finished_the_best_partial_wins() {
        let p = Params::new(2).set("beam_width", 2).set("max_steps", 2);
        let want = "E root:2, S a, S b, P a beam cut, E b:2, S ba, S bb, P ba beam cut, F bb";
        assert_eq!(run(p, &[], "a=.1 b=.3 ba=.2 bb=.25"), want);
    }

    #[test]
    fn ends_when_every_candidate_finished() {
        let want = "E root:2, S a, S b, F b";
        assert_eq!(run(Params::new(2), &["a", "b"], "a=.1 b=.3"), want);
        // Width 1: M = 1, a chain of scored steps.
        let want = "E root:1, S a, E a:1, S aa, F aa";
        assert_eq!(run(Params::new(1), &["aa"], "a=.1 aa=.3"), want);
    }

    #[test]
    fn rejects_bad_params() {
        assert_eq!(default_beam_width(4), 4);
        assert_eq!(default_beam_width(6), 3);
        assert_eq!(default_beam_width(16), 4);
        assert_eq!(default_beam_width(1), 1);
        let bad = |p: Params| StepBeam::from_params(&p).is_err();
        assert!(bad(Params::new(6).set("beam_width", 4)));
        assert!(bad(Params::new(2).set("beam_width", 4)));
        assert!(bad(Params::new(4).set("beam_width", 0)));
        assert!(bad(Params::new(4).set("lookahead", 1)));
        assert!(bad(Params::new(4).set("max_steps", 0)));
    }
}
