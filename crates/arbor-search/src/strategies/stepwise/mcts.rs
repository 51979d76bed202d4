//! `mcts`: Monte Carlo tree search over steps with PUCT selection and PRM values (as in
//! AlphaZero's PUCT, applied to reasoning steps by e.g. rStar and ReST-MCTS*).
//!
//! A simulation walks down from the root, at each node taking the valued child with the
//! highest `Q + c_puct · P · √N(parent) / (1 + N(child))`, where Q is the child's mean value,
//! N counts visits and the prior P is `exp(step mean logprob)` normalised among the valued
//! siblings. At a leaf it expands `expand` children by one step; each child is evaluated by
//! verifier 0 (its value) and backed up as one visit of every node above it (values are
//! averaged). A finished node, or one `max_steps` deep, is terminal: reaching it backs its
//! value up again without model work. `width` simulations run at once, kept apart by a
//! virtual loss (a pending visit of value 0 on the selected path, undone when the expansion
//! is valued); `simulations` in all.
//!
//! Answer: the finished node with the best mean value (ties: the earlier). When nothing
//! finished, the most visited path (ties: higher mean value) is completed one sample at a
//! time (k = 1, unscored) until it finishes or reaches `max_steps`, and that completion is
//! the answer.
//!
//! Parameters: `width` simulations in flight; `simulations` (default 4 × width); `expand`
//! children per expansion (default 3); `c_puct` (default 1.0); `delimiter`, `step_tokens`,
//! `max_steps`.

use super::{best, check, Steps};
use crate::params::Params;
use crate::strategy::{Action, Event, Strategy};
use crate::tree::{NodeId, SearchTree};
use std::collections::HashMap;

pub struct Mcts {
    steps: Steps,
    width: usize,
    simulations: usize,
    expand: usize,
    c_puct: f64,
    started: usize,
    visits: HashMap<NodeId, f64>,
    total: HashMap<NodeId, f64>,
    /// The verifier's value of each evaluated node.
    value: HashMap<NodeId, f64>,
    /// Expansions in flight: the leaf → (its path, children not yet valued).
    flight: HashMap<NodeId, (Vec<NodeId>, usize)>,
    completing: bool,
}

enum Pick {
    Leaf(Vec<NodeId>),
    Terminal(Vec<NodeId>),
    Busy,
}

impl Mcts {
    pub fn from_params(p: &Params) -> Result<Self, String> {
        let width = check(p, &["simulations", "expand", "c_puct"], true)?;
        let simulations = p.usize("simulations", width * 4)?;
        let expand = p.usize("expand", 3)?;
        let c_puct = p.f64("c_puct", 1.0)?;
        if simulations == 0 || expand == 0 {
            return Err("simulations and expand must be at least 1".into());
        }
        if !(c_puct.is_finite() && c_puct >= 0.0) {
            return Err(format!("c_puct {c_puct} must be a number ≥ 0"));
        }
        Ok(Mcts {
            steps: Steps::from_params(p)?,
            width,
            simulations,
            expand,
            c_puct,
            started: 0,
            visits: HashMap::new(),
            total: HashMap::new(),
            value: HashMap::new(),
            flight: HashMap::new(),
            completing: false,
        })
    }

    fn n(&self, id: NodeId) -> f64 {
        self.visits.get(&id).copied().unwrap_or(0.0)
    }

    fn q(&self, id: NodeId) -> f64 {
        match self.n(id) {
            n if n > 0.0 => self.total.get(&id).copied().unwrap_or(0.0) / n,
            _ => 0.0,
        }
    }

    fn valued_children(&self, tree: &SearchTree, id: NodeId) -> Vec<NodeId> {
        tree.node(id).map_or(vec![], |n| {
            n.children
                .iter()
                .copied()
                .filter(|c| self.value.contains_key(c))
                .collect()
        })
    }

    fn select(&self, tree: &SearchTree) -> Pick {
        let mut path = vec![tree.root()];
        loop {
            let cur = *path.last().expect("the path holds the root");
            let Some(node) = tree.node(cur) else {
                return Pick::Busy;
            };
            let terminal = node.is_finished() || tree.depth(cur) >= self.steps.max_steps;
            if cur != tree.root() && terminal {
                return Pick::Terminal(path);
            }
            if node.children.is_empty() {
                let free = node.is_open() && !self.flight.contains_key(&cur);
                return if free { Pick::Leaf(path) } else { Pick::Busy };
            }
            let kids = self.valued_children(tree, cur);
            let mean = |c: NodeId| tree.node(c).map_or(0.0, |n| n.mean_logprob());
            let top = kids
                .iter()
                .map(|&c| mean(c))
                .fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = kids.iter().map(|&c| (mean(c) - top).exp()).sum();
            let sqrt_n = self.n(cur).sqrt();
            let puct = |c: NodeId| {
                let prior = (mean(c) - top).exp() / sum;
                self.q(c) + self.c_puct * prior * sqrt_n / (1.0 + self.n(c))
            };
            match best(kids.iter().copied(), puct) {
                Some(c) => path.push(c),
                None => return Pick::Busy,
            }
        }
    }

    fn backup(&mut self, path: &[NodeId], visits: f64, value: f64) {
        for &n in path {
            *self.visits.entry(n).or_default() += visits;
            *self.total.entry(n).or_default() += value;
        }
    }

    /// Starts simulations until `width` are in flight or the budget is spent; finishes when
    /// nothing is left to wait for.
    fn fill(&mut self, tree: &SearchTree) -> Vec<Action> {
        let mut out = vec![];
        while self.flight.len() < self.width && self.started < self.simulations {
            match self.select(tree) {
                Pick::Leaf(path) => {
                    self.started += 1;
                    self.backup(&path, 1.0, 0.0);
                    let leaf = *path.last().expect("a leaf path is not empty");
                    self.flight.insert(leaf, (path, self.expand));
                    out.push(Action::Expand {
                        node: leaf,
                        k: self.expand,
                        until: self.steps.until(),
                    });
                }
                Pick::Terminal(path) => {
                    self.started += 1;
                    let v = path.last().map_or(0.0, |t| self.value[t]);
                    self.backup(&path, 1.0, v);
                }
                Pick::Busy => break,
            }
        }
        if self.flight.is_empty() {
            out.push(self.finish(tree));
        }
        out
    }

    /// The best finished node, or the first step completing the most visited path.
    fn finish(&mut self, tree: &SearchTree) -> Action {
        let done = tree
            .finished()
            .into_iter()
            .filter(|n| self.value.contains_key(n));
        if let Some(answer) = best(done, |n| self.q(n)) {
            return Action::finish(answer);
        }
        let mut cur = tree.root();
        loop {
            let mut kids = self.valued_children(tree, cur);
            kids.sort_by(|&a, &b| {
                self.n(b)
                    .total_cmp(&self.n(a))
                    .then(self.q(b).total_cmp(&self.q(a)))
            });
            match kids.first() {
                Some(&c) => cur = c,
                None => break,
            }
        }
        if cur == tree.root() {
            return Action::Finish {
                answer: None,
                text: None,
            };
        }
        self.complete(tree, cur)
    }

    fn complete(&mut self, tree: &SearchTree, node: NodeId) -> Action {
        let end = tree.node(node).is_none_or(|n| !n.is_open());
        if end || tree.depth(node) >= self.steps.max_steps {
            return Action::finish(node);
        }
        self.completing = true;
        Action::Expand {
            node,
            k: 1,
            until: self.steps.until(),
        }
    }
}

impl Strategy for Mcts {
    fn name(&self) -> &str {
        "mcts"
    }

    fn start(&mut self, tree: &SearchTree) -> Vec<Action> {
        self.fill(tree)
    }

    fn on_event(&mut self, tree: &SearchTree, event: Event) -> Vec<Action> {
        match event {
            Event::Expanded { child, .. } if self.completing => vec![self.complete(tree, child)],
            Event::Expanded { child, .. } => vec![Action::Score {
                node: child,
                verifier: 0,
            }],
            Event::Scored { node, score, .. } => {
                let Some(leaf) = tree.node(node).and_then(|n| n.parent) else {
                    return vec![];
                };
                let Some((path, pending)) = self.flight.get_mut(&leaf) else {
                    return vec![];
                };
                *pending -= 1;
                let (path, last) = (path.clone(), *pending == 0);
                self.value.insert(node, score);
                self.backup(&[node], 1.0, score);
                self.backup(&path, 1.0, score);
                if !last {
                    return vec![];
                }
                self.flight.remove(&leaf);
                self.backup(&path, -1.0, 0.0);
                self.fill(tree)
            }
            Event::TopK { .. } | Event::Extended { .. } => vec![],
        }
    }

    fn width(&self) -> usize {
        self.width * self.expand
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{log, policy, verifier};
    use super::*;
    use crate::sim::Simulator;

    fn run(p: Params, ends: &[&str], lps: &str, scores: &str) -> String {
        let mut s = Mcts::from_params(&p.set("expand", 2)).unwrap();
        let out = Simulator::new(policy(ends, lps))
            .with_verifier(verifier(scores))
            .run(&mut s, "q")
            .unwrap();
        log(&out)
    }

    const SCORES: &str = "a=.4 b=.8 aa=.6 ab=.9 ba=.3 bb=.5";

    #[test]
    fn puct_selects_expands_backs_up_and_answers_the_best_finished() {
        // Simulation 2: N(root) = 2, equal priors: a 0.4 + 0.354, b 0.8 + 0.354 → b.
        // Simulation 3: N(root) = 4: a 0.4 + 0.5 = 0.9, b (0.8+0.3+0.5)/3 + 0.25 = 0.783 → a.
        let p = Params::new(1).set("simulations", 3);
        let want = "E root:2, S a, S b, E b:2, S ba, S bb, E a:2, S aa, S ab, F ab";
        assert_eq!(run(p, &["ab"], "", SCORES), want);
    }

    #[test]
    fn without_a_finished_node_the_most_visited_path_is_completed() {
        // After two simulations b has 3 visits; its children tie on visits and bb's value
        // is higher; bb is completed one step at a time until it finishes.
        let p = Params::new(1).set("simulations", 2);
        let want = "E root:2, S a, S b, E b:2, S ba, S bb, E bb:1, E bba:1, F bbaa";
        assert_eq!(run(p, &["bbaa"], "", SCORES), want);
    }

    #[test]
    fn priors_from_step_logprobs_steer_selection() {
        // P(a) = 0.948, P(b) = 0.052: with c_puct 4 the prior outweighs b's value; with 0
        // it counts for nothing. The most visited path is then completed to max_steps.
        let (lps, scores) = ("a=-0.1 b=-3", "a=.2 b=.8 aa=.1 ab=.1 ba=.1 bb=.1");
        let p = Params::new(1).set("simulations", 2).set("max_steps", 3);
        let want = "E root:2, S a, S b, E a:2, S aa, S ab, E aa:1, F aaa";
        assert_eq!(run(p.clone().set("c_puct", 4), &[], lps, scores), want);
        let want = "E root:2, S a, S b, E b:2, S ba, S bb, E ba:1, F baa";
        assert_eq!(run(p.set("c_puct", 0), &[], lps, scores), want);
    }

    #[test]
    fn parallel_simulations_are_kept_apart_by_virtual_loss() {
        // With b pending (a visit of value 0), a's 0.833 beats b's 0.689.
        let p = Params::new(2).set("simulations", 3);
        let want = "E root:2, S a, S b, E b:2, E a:2, S ba, S bb, S aa, S ab, F ab";
        assert_eq!(run(p, &["ab"], "", SCORES), want);
    }

    #[test]
    fn terminal_nodes_are_revisited_without_model_work() {
        let p = Params::new(1).set("simulations", 5).set("max_steps", 1);
        assert_eq!(run(p, &[], "", "a=.5 b=.1"), "E root:2, S a, S b, F a");
    }

    #[test]
    fn rejects_bad_params() {
        let bad = |p: Params| Mcts::from_params(&p).is_err();
        assert!(bad(Params::new(1).set("c_puct", -1)));
        assert!(bad(Params::new(1).set("simulations", 0)));
        assert!(bad(Params::new(1).set("expand", 0)));
        assert!(bad(Params::new(1).set("rollouts", 2)));
    }
}
